"""`make demo`: a broker and two workers on loopback, a real workflow, live status.

Everything runs in a temporary BANYAN_HOME with its own keys and state, on free loopback ports,
and every process the demo starts is stopped by its PID before it exits. Each step prints the
command it runs, so the output doubles as a tour of the command line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from banyan.client import Client

SWEEP = [f"{m}e-{e}" for e in range(1, 6) for m in (1, 2, 5, 8)]  # 20 learning rates
# A sweep job: five "epochs", each reporting progress, then a made-up score for its parameter.
TRAIN = (
    'for e in 1 2 3 4 5; do echo "$((e * 20)) epoch $e/5" > "$BANYAN_PROGRESS_FILE"; '
    'sleep 0.3; done; echo "{} $(( ${#BANYAN_JOB_ID} * 7 + $BANYAN_JOB_ID % 13 ))"'
)


# How each job of the tour ends, by name: the tour checks it at the end, and so does its test.
ENDS = {
    "long-render": "cancelled",
    **{f"train-{rate}": "success" for rate in SWEEP},
    "reduce": "success",
    "flaky": "success",  # on its second attempt
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.client_port, self.worker_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "BANYAN_HOME": str(root / "home"),
            "BANYAN_BROKER": f"127.0.0.1:{self.client_port}",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.bin = Path(sys.executable).parent

    def start(self, *args: str) -> None:
        log = open(self.root / f"{args[0]}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        )
        log.close()

    def run(self, *argv: str, check: bool = True) -> str:
        """Run one of the tools as a user would, echoing the command line."""
        print(f"\n$ {shlex.join(argv)}", flush=True)
        tool = argv[0].removeprefix("banyan-")
        done = subprocess.run(
            [sys.executable, "-m", "banyan.cli.main", tool, *argv[1:]],
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        sys.stdout.write(done.stdout)
        sys.stdout.flush()
        if check and done.returncode != 0:
            raise SystemExit(f"demo: {argv[0]} exited {done.returncode}")
        return done.stdout

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="banyan-demo-"))
    demo = Demo(root)
    try:
        return tour(demo, root)
    finally:
        demo.stop()
        shutil.rmtree(root, ignore_errors=True)


def tour(demo: Demo, root: Path) -> int:
    print(f"Banyan demo in {root} (BANYAN_HOME={root / 'home'})")
    demo.start(
        "banyan.cli.broker",
        "--client-port",
        str(demo.client_port),
        "--worker-port",
        str(demo.worker_port),
        "--state-dir",
        str(root / "state"),
    )
    client = Client(f"127.0.0.1:{demo.client_port}", root / "home", timeout=1.0)

    def answers() -> bool:
        try:
            client.ping()
            return True
        except Exception:
            return False

    until(answers, "the broker")
    for name in ("node-a", "node-b"):
        demo.start(
            "banyan.cli.worker",
            "--broker",
            f"127.0.0.1:{demo.worker_port}",
            "--name",
            name,
            "--cpus",
            "2",
            "--memory",
            "2048",
            "--spool",
            str(root / "spool" / name),
            # The demo's jobs are its own account's; where that is root, say root may run them.
            *(["--allow-root-jobs"] if os.geteuid() == 0 else []),
        )
    until(lambda: len(client.workers()) == 2, "two workers")
    print("broker and two workers (2 cpus each) are up on loopback")

    params = root / "params.txt"
    params.write_text("\n".join(SWEEP) + "\n")
    marker = root / "flaky-ran-once"
    long_id = demo.run("banyan-submit", "--name", "long-render", "--", "sleep 600").split()[0]
    demo.run(
        "banyan-submit",
        "--each",
        str(params),
        "--group",
        "sweep",
        "--name",
        "train-{}",
        "--",
        TRAIN,
    )
    demo.run(
        "banyan-submit",
        "--after",
        "sweep",
        "--name",
        "reduce",
        "--",
        "echo best learning rate: 1e-3",
    )
    demo.run(
        "banyan-submit",
        "--name",
        "flaky",
        "--attempts",
        "2",
        "--",
        f"if [ -e {marker} ]; then echo second time lucky; "
        f"else touch {marker}; echo transient failure >&2; exit 1; fi",
    )

    until(lambda: client.job(int(long_id)).state == "running", "the long job to start")
    demo.run("banyan-cancel", "--reason", "not needed after all", long_id)
    demo.run("banyan-status", "--watch", "--until-done", "--interval", "0.5")
    print()
    demo.run("banyan-status", "--all")
    demo.run("banyan-workers")
    demo.run("banyan-stats")
    jobs = {j.name: j for j in client.status(all=True).jobs}
    ends = {name: "success" if j.succeeded else j.state for name, j in jobs.items()}
    ok = ends == ENDS and jobs["flaky"].attempts == 2
    client.close()
    print("\ndemo finished: " + ("every outcome as expected" if ok else "UNEXPECTED OUTCOMES"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
