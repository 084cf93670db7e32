"""Set up the peers the W1-W3 benchmarks measure beside Banyan: `make bench-peers-setup`.

- `redis-server` from the system's packages (as root with apt-get: `apt-get install
  redis-server`; otherwise it has to be on PATH already);
- Celery and HyperQueue from PyPI, at the versions in requirements.txt, into their own virtual
  environment, bench/peers/.venv (Banyan's .venv never gets them);
- a check of each: Celery imports and redis-server runs; HyperQueue runs one job in a network
  namespace that has only loopback, as the benchmarks run it.

Each peer that passes gets a stamp file (.venv/.ready-NAME) the benchmarks look for. Running it
again redoes only what is missing. Exits 0 when every peer is ready, 1 otherwise, after saying
what failed and what to do; the benchmarks then run without that peer.

    python bench/peers/install.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
PYTHON = VENV / "bin" / "python"
REQUIREMENTS = HERE / "requirements.txt"
PEERS = ("celery", "hyperqueue")


def stamp(name: str) -> Path:
    return VENV / f".ready-{name}"


def say(text: str) -> None:
    print(f"bench-peers-setup: {text}", flush=True)


def run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def redis_server() -> str | None:
    """Path of redis-server, installing Debian's package first where that is possible."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        say("redis-server is not installed; install it (Debian: apt-get install redis-server)")
        return None
    say("installing redis-server with apt-get (it may also start the system's own service)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "redis-server"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # an old or missing package list: fetch it once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        say(f"apt-get install redis-server failed:\n{done.stderr.strip()[-2000:]}")
        return None
    return shutil.which("redis-server")


def venv() -> bool:
    """bench/peers/.venv with requirements.txt installed (again only when the file changed)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    marker = VENV / ".requirements-sha256"
    if PYTHON.exists() and marker.exists() and marker.read_text() == digest:
        return True
    for name in PEERS:
        stamp(name).unlink(missing_ok=True)
    if not PYTHON.exists():
        say(f"creating {VENV}")
        done = run([sys.executable, "-m", "venv", str(VENV)])
        if done.returncode != 0:
            say(f"python -m venv failed:\n{done.stderr.strip()[-2000:]}")
            return False
    say(f"installing {', '.join(pins())} from PyPI into {VENV}")
    done = run([str(PYTHON), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)])
    if done.returncode != 0:
        say(f"pip install failed:\n{(done.stdout + done.stderr).strip()[-3000:]}")
        return False
    marker.write_text(digest)
    return True


def pins() -> list[str]:
    lines = REQUIREMENTS.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def check_celery(redis: str | None) -> bool:
    if redis is None:
        say("celery: not ready: no redis-server")
        return False
    done = run([str(PYTHON), "-c", "import celery, redis; print(celery.__version__)"], 120)
    if done.returncode != 0:
        say(f"celery: does not import:\n{done.stderr.strip()[-2000:]}")
        return False
    version = run([redis, "--version"], 30).stdout.split()
    say(f"celery {done.stdout.strip()} and {' '.join(version[:3])}: ready")
    return True


def check_hyperqueue() -> bool:
    """One job through a HyperQueue server and worker in a namespace with only loopback."""
    with tempfile.TemporaryDirectory(prefix="banyan-peers-") as d:
        server_dir = Path(d) / "hq-server"
        server_dir.mkdir()
        argv = [str(PYTHON), str(HERE / "driver.py"), "selftest", str(server_dir)]
        done = run(isolated(argv), 120)
    if done.returncode != 0 or "ran one job" not in done.stdout:
        say(
            "hyperqueue: could not run one job (in network and UTS namespaces of its own, "
            "which needs root, unshare, ip and hostname):\n"
            f"{(done.stdout + done.stderr).strip()[-2000:]}"
        )
        return False
    version = run([str(PYTHON), "-c", "import hyperqueue.ffi as f; print(f.get_version())"], 60)
    say(f"hyperqueue {version.stdout.strip()}: ready (server and worker from the wheel)")
    return True


def isolated(argv: list[str]) -> list[str]:
    """argv run in new network and UTS namespaces with only loopback up and `localhost` as
    the host name: HyperQueue's server listens on every interface and tells its clients and
    workers to dial the host name, so inside, both reach it on loopback and nothing else can."""
    script = 'ip link set lo up && hostname localhost && exec "$@"'
    return ["unshare", "--net", "--uts", "--", "sh", "-c", script, "sh", *argv]


def main() -> int:
    redis = redis_server()
    if not venv():
        say("no peer is ready; the benchmarks will run Banyan alone")
        return 1
    ready = {"celery": check_celery(redis), "hyperqueue": check_hyperqueue()}
    for name, ok in ready.items():
        if ok:
            stamp(name).write_text("ok\n")
        else:
            stamp(name).unlink(missing_ok=True)
    missing = [n for n, ok in ready.items() if not ok]
    if missing:
        say(f"not ready: {', '.join(missing)}; the benchmarks will run without them")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
