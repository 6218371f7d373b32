"""Experiments at scale: what `goemo exp run` adds per member, and `goemo exp show` over 500.

Usage: python3 scripts/bench_exp.py [path/to/goemo] [members]

A throw-away project of three cheap `command` stages (prep → fit → score; fit and score are
swept). A 500-member grid is run once (every fit and score runs: a shell each), then again
(everything cached). The per-member overhead is the sweep's wall time less the stages' own
wall times (as the cache manifests record them), divided by the members; the cached rerun is
pure overhead. Then `goemo exp show` (table and --json) over the 500 records, median of 20.
For scale: DVC's `dvc exp show` takes seconds on large projects (its issue tracker has
reports of 10 s and more with hundreds of experiments).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

goemo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/goemo")
members = int(sys.argv[2]) if len(sys.argv) > 2 else 500

PIPELINE = """stages:
  prep:
    kind: command
    params: {cmd: 'echo data > $GOEMO_OUT/data'}
  fit:
    kind: command
    deps: {prep: prep}
    params:
      cmd: 'echo $GOEMO_VAR_I > $GOEMO_OUT/model'
      vars: {i: 0}
  score:
    kind: command
    deps: {fit: fit}
    params:
      cmd: 'echo "{\\"dev_score\\": $(cat $GOEMO_IN_FIT/model)}" > $GOEMO_OUT/metrics.json'
    publish: {out/metrics.json: metrics.json}
"""


def run(args, cwd):
    t = time.perf_counter()
    r = subprocess.run([goemo, *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"goemo {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return wall, r.stdout


def stage_seconds(d):
    """The wall time of every stage that ran in this sweep (from the records)."""
    total = 0.0
    root = os.path.join(d, "experiments")
    for name in os.listdir(root):
        path = os.path.join(root, name, "experiment.json")
        if os.path.exists(path):
            with open(path) as f:
                rec = json.load(f)
            total += sum(s["wall_s"] for s in rec["stages"] if s["outcome"] == "ran")
    return total


with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "pipeline.yaml"), "w") as f:
        f.write(PIPELINE)
    run(["run", "-q"], d)
    grid = ",".join(str(i) for i in range(1, members + 1))
    sweep = ["exp", "run", "--name", "b", "--set", f"fit.vars.i={grid}", "--jobs", "1"]
    first, _ = run(sweep, d)
    stages = stage_seconds(d)
    again, _ = run(sweep, d)
    shows = [run(["exp", "show"], d)[0] for _ in range(20)]
    jsons = [run(["exp", "show", "--json"], d)[0] for _ in range(20)]
    _, out = run(["exp", "show", "--sort", "score.dev_score"], d)
    rows = len(out.splitlines()) - 2  # header, best line
    print(f"goemo {goemo}")
    print(f"{members}-member sweep, first run: {first:.2f} s wall, stages' own {stages:.2f} s")
    print(f"  overhead per member: {(first - stages) / members * 1000:.1f} ms (target < 50 ms)")
    print(f"  rerun, everything cached: {again:.2f} s, {again / members * 1000:.1f} ms per member")
    print(f"exp show over {rows - 1} experiments + baseline: median {statistics.median(shows) * 1000:.0f} ms"
          f" (min {min(shows) * 1000:.0f}, max {max(shows) * 1000:.0f}); target well under 200 ms")
    print(f"exp show --json: median {statistics.median(jsons) * 1000:.0f} ms")
