"""The worker loop (runs inside a framework's environment, one process per rank).

Protocol, through files in the worker's directory so it works the same under torchrun at any world size:
the harness writes `req-NNNN.json` ({"spec", "init", "out", "options"} or {"shutdown": true}); every rank runs it;
rank 0 saves the record to `out`; then EVERY rank writes its own `res-NNNN.rank<R>.json` ({"ok": true} or
{"ok": false, "error": ..., "traceback": ...}). The harness accepts a result only when every rank said ok, so a
failure on any rank reaches the verdict (one rank's success cannot overwrite another's failure). One process serves
requests until shutdown, so a framework's import and distributed start-up are paid once (fuzzing depends on it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def result_path(directory: Path, request: int, rank: int) -> Path:
    return directory / f"res-{request:04d}.rank{rank}.json"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _wait_for(path: Path, poll: float = 0.02) -> dict:
    while not path.exists():
        time.sleep(poll)
    return json.loads(path.read_text())


def _cuda_numerics_fixed() -> None:
    """TF32 off for matmuls and cuDNN in every worker (reference and frameworks alike): float32 means float32. A
    framework that turns it back on is recorded by _cuda_facts, not hidden."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _cuda_facts() -> dict:
    """What the report states about a CUDA run: the device, peak memory of this request, TF32 as it ended."""
    import torch

    return {"cuda_device": torch.cuda.get_device_name(),
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}


PROFILE_DIR = "STEPDIFF_PROFILE_DIR"
"""Set to a folder: each request runs under cProfile, one stats file per request and rank (where a worker's time
goes: imports, framework set-up, the step)."""


def _profiler() -> Any:
    if not os.environ.get(PROFILE_DIR):
        return None
    import cProfile

    return cProfile.Profile()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stepdiff-worker")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)

    from stepdiff.adapters.base import Unsupported, WorkerContext
    from stepdiff.harness.registry import get_adapter
    from stepdiff.harness.spec import from_dict

    rank = int(os.environ.get("RANK", "0"))
    ctx = WorkerContext(rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=args.device,
                        scratch=args.dir / f"scratch-rank{rank}")
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.device == "cuda":
        _cuda_numerics_fixed()
    adapter = get_adapter(args.adapter)()
    adapter.setup(ctx)
    setup_s = time.perf_counter() - t0
    (args.dir / f"ready.{rank}").write_text(str(setup_s))
    i = 0
    while True:
        req = _wait_for(args.dir / f"req-{i:04d}.json")
        if req.get("shutdown"):
            # every result is on disk before its request is answered; the interpreter's teardown with a framework
            # loaded takes ~1 s that the harness would wait for at the end of every command, so skip it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        res_path = result_path(args.dir, i, rank)
        try:
            t1 = time.perf_counter()
            spec = from_dict(req["spec"])
            if args.device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
            profiler = _profiler()
            with profiler or contextlib.nullcontext():
                record = adapter.run(spec, Path(req["init"]), ctx, **req.get("options", {}))
            if profiler is not None:
                profile_dir = Path(os.environ[PROFILE_DIR])
                profile_dir.mkdir(parents=True, exist_ok=True)
                profiler.dump_stats(profile_dir / f"{args.adapter}-req{i:04d}-rank{rank}.prof")
            if rank == 0:
                if record is None:
                    raise RuntimeError("the adapter returned no record on rank 0")
                record.meta.timings.setdefault("worker_setup_s", setup_s)
                record.meta.timings["run_s"] = time.perf_counter() - t1
                if args.device == "cuda":
                    record.meta.extra.update(_cuda_facts())
                record.save(req["out"])
            _write_json(res_path, {"ok": True, "out": req["out"], "rank": rank})
        except Exception as e:  # reported to the harness as an error verdict, with the traceback
            tb = traceback.format_exc()
            print(tb, flush=True)
            _write_json(res_path, {"ok": False, "error": f"{type(e).__name__}: {e}", "rank": rank, "traceback": tb,
                                   "unsupported": str(e) if isinstance(e, Unsupported) else None})
        i += 1
