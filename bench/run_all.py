"""Run every benchmark, one after another, and print one table of every figure.

Each benchmark runs as its own process with the flags given here, writes its JSON under
--out, and this script then gathers them into `summary.json` and `summary.md` (the table
docs/performance.md quotes).

    python bench/run_all.py            # full sizes: about 20 minutes on 2 cores (soak: 10)
    python bench/run_all.py --quick    # small sizes, about 90 s: proves every benchmark works
    python bench/run_all.py --only throughput,latency
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from bench.common import Figure, fmt, machine, parser, table

HERE = Path(__file__).parent
BENCHES = (
    "throughput",
    "latency",
    "start_cost",
    "overhead",
    "submit_rate",
    "broker_cpu",
    "claim_scaling",
    "many_workers",
    "restart",
    "soak",
    "futures_map",
    "snakemake_workflow",
)


def markdown(figures: list[tuple[str, Figure]]) -> str:
    head = "| bench | figure | value | reference | ratio | target | met |\n"
    head += "|---|---|---|---|---|---|---|\n"
    rows = []
    for bench, f in figures:
        ref = f"{f.reference} {fmt(f.reference_value)}" if f.reference else ""
        met = {True: "yes", False: "**no**", None: ""}[f.met]
        rows.append(
            f"| {bench} | {f.name} | {fmt(f.value)} {f.unit} | {ref} | {fmt(f.ratio)} "
            f"| {f.target} | {met} |"
        )
    return head + "\n".join(rows) + "\n"


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--only", help="comma-separated names among: " + ", ".join(BENCHES))
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    flags = ["--repeat", str(args.repeat), "--out", str(args.out)]
    flags += ["--quick"] * args.quick + ["--keep"] * args.keep
    if args.profile:
        flags += ["--profile", str(args.profile)]
    failed, timings, figures = [], {}, []
    for name in names:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *flags])
        timings[name] = round(time.perf_counter() - started, 1)
        if code:
            failed.append(name)
            continue
        doc: dict[str, Any] = json.loads((args.out / f"{name}.json").read_text())
        figures += [(name, Figure(**f)) for f in doc["figures"]]
    print(f"\n== all ({', '.join(f'{n} {s:g} s' for n, s in timings.items())})")
    print(table([f for _, f in figures]))
    summary = {
        "quick": args.quick,
        "repeat": args.repeat,
        "machine": machine(),
        "seconds": timings,
        "failed": failed,
        "figures": [{"bench": b, **vars(f)} for b, f in figures],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(markdown(figures))
    print(f"wrote {args.out / 'summary.json'} and summary.md")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
