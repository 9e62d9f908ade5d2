"""Benchmark: fuzzing throughput depends on one worker serving many specs instead of paying the framework's import
and distributed start-up per spec. Measures both in one run and reports the ratio (target: >= 2x).

    python benchmarks/worker_reuse.py [--framework deepspeed==0.19.8] [--specs 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from stepdiff.harness import envs
from stepdiff.harness.model import write_init_weights
from stepdiff.harness.runner import _environment, parse_pin, worker_env
from stepdiff.harness.spec import from_dict, to_dict
from stepdiff.harness.workers import Worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--framework", default="deepspeed==0.19.8")
    ap.add_argument("--specs", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args()
    pin = parse_pin(args.framework)
    env = _environment(pin)
    specs = [from_dict({"batch": {"grad_accum": 1 + i % 3}, "data": {"seed": i},
                        pin.name: {"zero_stage": 2}} if pin.name == "deepspeed" else {"data": {"seed": i}})
             for i in range(args.specs)]
    wd = Path(tempfile.mkdtemp(prefix="stepdiff-bench-"))
    init = write_init_weights(specs[0], envs.cache_root() / "init")
    extra = worker_env(env)

    t0 = time.perf_counter()
    with Worker(pin.name, env.python, 1, "cpu", env=extra, workdir=wd / "reuse") as w:
        for i, s in enumerate(specs):
            w.submit({"spec": to_dict(s), "init": str(init), "out": str(wd / f"reuse-{i}")}, 600)
    reuse = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i, s in enumerate(specs):
        with Worker(pin.name, env.python, 1, "cpu", env=extra, workdir=wd / f"fresh-{i}") as w:
            w.submit({"spec": to_dict(s), "init": str(init), "out": str(wd / f"fresh-out-{i}")}, 600)
    fresh = time.perf_counter() - t0

    result = {"framework": pin.label, "specs": len(specs), "one_worker_s": round(reuse, 2),
              "worker_per_spec_s": round(fresh, 2), "speedup": round(fresh / reuse, 2), "target_speedup": 2.0}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
