"""The Snakemake executor plugin: a 40-sample, 81-job workflow through Banyan against
`snakemake --cores 2` on this machine, and how soon Snakemake acts on a job's end.

The workflow: per sample, `simulate` (about 0.9 s of CPU) then `summarize` (about 0.2 s),
then one `merge` of all 40: 81 jobs. Run locally with `--cores 2`, then with `--executor
banyan --jobs 100` against a broker and one worker with 2 cpus (the machine's 2 cores), each
from a clean directory. The ratio of the two times is the figure (target <= 1.3).

Learning: for every job, from the broker's record of its end to the plugin's report of it to
Snakemake (the plugin's debug line, with `--verbose`; one machine, one clock). Reaction: for
every sample, from the broker's record of `simulate`'s end to its record of the submission of
the `summarize` that waited for it: the whole way round, learning, Snakemake's bookkeeping
and scheduling round, and the submit.

    python bench/snakemake_workflow.py            # 40 samples, 3 runs
    python bench/snakemake_workflow.py --quick    # 2 samples
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.common import Figure, Report, cluster, median, parser, percentile, repeated, workdir

RATIO_TARGET = 1.3
REACTION_TARGET_MS = 100.0

SNAKEFILE = """
SAMPLES = [f"s{i:02d}" for i in range(int(config["samples"]))]

rule all:
    input: "merged.txt"

rule simulate:
    output: "sim/{s}.txt"
    shell: "awk -v n=20000000 'BEGIN {{ for (i = 0; i < n; i++) t += i % 7; print t }}' > {output}"

rule summarize:
    input: "sim/{s}.txt"
    output: "sum/{s}.txt"
    shell:
        "awk -v n=5000000 'BEGIN {{ for (i = 0; i < n; i++) t += i % 5; print t }}' > {output}; "
        "cat {input} >> {output}"

rule merge:
    input: expand("sum/{s}.txt", s=SAMPLES)
    output: "merged.txt"
    shell: "cat {input} > {output}"
"""


def snakemake(wd: Path, args: list[str], env: dict[str, str]) -> float:
    """Seconds for one run from a clean directory; raises if it failed."""
    wd.mkdir(parents=True)
    (wd / "Snakefile").write_text(SNAKEFILE)
    argv = [sys.executable, "-m", "snakemake", "--nocolor", "all", *args]
    started = time.perf_counter()
    with open(wd / "snakemake.out", "w") as out:
        done = subprocess.run(argv, cwd=wd, env=env, stdout=out, stderr=out, timeout=1800)
    took = time.perf_counter() - started
    if done.returncode != 0:
        text = (wd / "snakemake.out").read_text()
        raise RuntimeError(f"snakemake failed in {wd}:\n{text[-3000:]}")
    return took


def learned(wd: Path) -> list[float]:
    """Milliseconds from each job's end to the plugin's report of it, from its debug lines."""
    lines = (wd / "snakemake.out").read_text().splitlines()
    return [float(x.split(" ended ")[1].split(" ms ")[0]) for x in lines if " ms before " in x]


def reactions(client: Any, group: str) -> list[float]:
    """Per sample: summarize's submission minus simulate's end, on the broker's clock."""
    jobs = [j.raw for j in client.status(group=group, all=True).jobs]
    by_sample: dict[str, dict[str, dict[str, Any]]] = {}
    for j in jobs:
        rule = str(j["name"]).split(".")[0]
        if rule not in ("simulate", "summarize"):
            continue
        detail = client.job(int(j["id"])).raw
        sample = re.findall(r"s\d\d", str(detail["command"]))[0]  # s00 .. s39
        by_sample.setdefault(sample, {})[rule] = j
    return [
        s["summarize"]["submitted"] - s["simulate"]["ended"]
        for s in by_sample.values()
        if "simulate" in s and "summarize" in s
    ]


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--samples", type=int, help="samples (default 40; --quick 2)")
    p.add_argument(
        "--spawn-snakemake", action="store_true", help="every job as `python -m snakemake`"
    )
    args = p.parse_args()
    samples = args.samples or (2 if args.quick else 40)
    jobs = 2 * samples + 1
    params = {"samples": samples, "jobs": jobs, "worker_cpus": 2, "local_cores": 2}
    params["spawn_snakemake"] = args.spawn_snakemake
    report = Report("snakemake_workflow", args.quick, args.repeat, params)
    with workdir(args.keep, "snakemake") as root, cluster(root) as c:
        c.start_broker()
        c.start_worker("w1", cpus=2)
        env = {**os.environ, "BANYAN_HOME": str(c.home)}
        config = ["--config", f"samples={samples}"]
        banyan_args = ["--executor", "banyan", "--jobs", "100", "--banyan-broker", c.address]
        banyan_args.append("--verbose")  # the plugin's debug lines say when it reported
        if args.spawn_snakemake:
            banyan_args.append("--banyan-spawn-snakemake")

        def run(i: int) -> dict[str, Any]:
            local = snakemake(root / f"local-{i}", ["--cores", "2", *config], env)
            through = snakemake(root / f"banyan-{i}", [*banyan_args, *config], env)
            with c.client() as client:
                newest = client.status(all=True, limit=1).jobs[0].raw
                group = next(g for g in newest["groups"] if g.startswith("snakemake-"))
                waits = reactions(client, group)
                total = len(client.status(group=group, all=True).jobs)
            return {
                "local_s": local,
                "banyan_s": through,
                "banyan_jobs": total,
                "reaction_ms": sorted(w * 1e3 for w in waits),
                "learned_ms": sorted(learned(root / f"banyan-{i}")),
            }

        report.runs = repeated(args.repeat, run)
    local = median([r["local_s"] for r in report.runs])
    through = median([r["banyan_s"] for r in report.runs])
    waits = [w for r in report.runs for w in r["reaction_ms"]]
    p50, p99 = percentile(waits, 50), percentile(waits, 99)
    learn = [w for r in report.runs for w in r["learned_ms"]]
    # Each run's own ratio: the machine's load moves both of a run's times together.
    ratio = median([r["banyan_s"] / r["local_s"] for r in report.runs])
    report.add(
        Figure(
            f"{jobs}-job workflow through Banyan",
            through,
            "s",
            "snakemake --cores 2",
            local,
            ratio,
            f"<= {RATIO_TARGET}x",
            ratio <= RATIO_TARGET,
        ),
        Figure("job end -> Snakemake told, p50", percentile(learn, 50), "ms"),
        Figure(
            "job end -> Snakemake told, p99",
            percentile(learn, 99),
            "ms",
            target=f"<= {REACTION_TARGET_MS:g} ms",
            met=percentile(learn, 99) <= REACTION_TARGET_MS,
        ),
        Figure("job end -> next job submitted, p50", p50, "ms"),
        Figure("job end -> next job submitted, p99", p99, "ms"),
    )
    report.notes.append(f"Banyan jobs per run: {[r['banyan_jobs'] for r in report.runs]}")
    report.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
