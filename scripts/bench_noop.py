"""No-op `goemo run` on a 7-stage pipeline with a ~4 MB input: the median wall time.

Usage: python3 scripts/bench_noop.py [path/to/goemo] [runs]
For scale (measured on these 2-core machines, issue #2): DVC 3.67 takes 1.43 s for the same
no-op `dvc repro`, 0.89 s for `dvc status`, 1.14 s for `dvc dag`.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

goemo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/goemo")
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 50

stages = ["stages:"]
prev = None
for i in range(7):
    stages.append(f"  s{i}:\n    kind: command")
    if prev is None:
        stages.append("    inputs: {src: input.txt}")
        stages.append('    params: {cmd: \'head -c 1000 "$GOEMO_IN_SRC" > "$GOEMO_OUT/x"\'}')
    else:
        stages.append(f"    deps: {{up: {prev}}}")
        stages.append('    params: {cmd: \'cat "$GOEMO_IN_UP/x" > "$GOEMO_OUT/x"\'}')
    prev = f"s{i}"
stages.append("    publish: {out/x: x}")

with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "pipeline.yaml"), "w") as f:
        f.write("\n".join(stages) + "\n")
    with open(os.path.join(d, "input.txt"), "wb") as f:
        f.write(os.urandom(4 * 1024 * 1024))
    env = dict(os.environ, RUST_LOG="warn")
    subprocess.run([goemo, "run", "-q"], cwd=d, check=True, env=env)
    time.sleep(2.1)  # let the stat cache trust the input (files changed within 2 s are re-read)
    subprocess.run([goemo, "run", "-q"], cwd=d, check=True, env=env)
    results = {}
    for cmd in (["run", "-q"], ["status"], ["dag"]):
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([goemo, *cmd], cwd=d, check=True, env=env, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t)
        results[" ".join(cmd)] = times
    for name, t in results.items():
        print(f"RESULT noop goemo {name:<7} median={statistics.median(t) * 1000:.1f}ms "
              f"min={min(t) * 1000:.1f}ms max={max(t) * 1000:.1f}ms runs={runs}")
