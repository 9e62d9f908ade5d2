"""Hypothesis fuzzing of batch / sequence-length / accumulation configurations against one framework run.

Hypothesis draws configurations around a base case (micro-batch size, gradient accumulation, prompt and response
length ranges, data seed), a `Session` runs each through long-lived workers (the reference's and the framework's,
so imports and distributed start-up are paid once), and any configuration that does not agree is shrunk by
Hypothesis to a minimal one, reported with its verdict and signature.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import envs
from .compare import RunResult, compare
from .errors import UsageError, WorkerError
from .model import write_init_weights
from .record import Record
from .registry import get_adapter
from .runner import FrameworkPin, _environment, worker_env
from .spec import Spec, to_dict
from .tolerance import bound_for
from .workers import Worker


class Session:
    """Long-lived workers for one framework pin and the reference, serving many specs."""

    def __init__(self, pin: FrameworkPin, workdir: Path | None = None) -> None:
        self.pin = pin
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="stepdiff-session-"))
        self.env = _environment(pin)
        self.workers: dict[tuple[str, int], Worker] = {}
        self.count = 0

    def _worker(self, name: str, python: str, world_size: int, device: str, extra: dict[str, str]) -> Worker:
        key = (name, world_size)
        w = self.workers.get(key)
        if w is None or (w.proc is not None and not w.alive()):
            w = Worker(name, python, world_size, device, env=extra, workdir=self.dir / f"{name}-ws{world_size}")
            self.workers[key] = w
        return w

    def run(self, spec: Spec) -> RunResult:
        from safetensors.torch import load_file

        reason = get_adapter(self.pin.name).unsupported(spec, self.pin.version)
        if reason:
            return RunResult(self.pin.name, self.pin.version, "unsupported", reason, extra_pins=self.pin.extra)
        self.count += 1
        init = write_init_weights(spec, envs.cache_root() / "init")
        host = envs.host_environment()
        ref_out, fw_out = self.dir / f"ref-{self.count}", self.dir / f"fw-{self.count}"
        req = {"spec": to_dict(spec), "init": str(init)}
        bound = bound_for(spec.model.dtype, None, spec.run.rel_tolerance)
        try:
            self._worker("reference", host.python, 1, spec.run.device, {}).submit({**req, "out": str(ref_out)},
                                                                                  spec.run.timeout_s)
            fw = self._worker(self.pin.name, self.env.python, spec.batch.world_size, spec.run.device,
                              worker_env(self.env))
            fw.submit({**req, "out": str(fw_out)}, spec.run.timeout_s)
            rec = Record.load(fw_out)
            result = compare(spec, rec, Record.load(ref_out), load_file(str(init)), bound, self.pin.name,
                             self.pin.version)
            result.meta = asdict(rec.meta)
        except WorkerError as e:
            result = RunResult(self.pin.name, self.pin.version, "error", e.message, bound, log_tail=e.log_tail)
        result.extra_pins = self.pin.extra
        return result

    def close(self) -> None:
        for w in self.workers.values():
            w.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class FuzzResult:
    pin: str
    examples: int
    """Configurations run (including Hypothesis's shrinking)."""
    failing: dict[str, Any] | None = None
    """The minimal non-agreeing configuration (the drawn fields), or None when every example agreed."""
    result: RunResult | None = None
    tried: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def draw_fields(data: Any, base: Spec, max_grad_accum: int, max_micro_batch: int) -> dict[str, Any]:
    from hypothesis import strategies as st

    p_lo = data.draw(st.integers(1, 6), label="prompt_min")
    p_hi = data.draw(st.integers(p_lo, 10), label="prompt_max")
    r_lo = data.draw(st.integers(1, 8), label="response_min")
    r_hi = data.draw(st.integers(r_lo, 24), label="response_max")
    return {
        "batch__grad_accum": data.draw(st.integers(1, max_grad_accum), label="grad_accum"),
        "batch__micro_batch_size": data.draw(st.integers(1, max_micro_batch), label="micro_batch_size"),
        "data__prompt_len": (p_lo, p_hi),
        "data__response_len": (r_lo, r_hi),
        "data__seed": data.draw(st.integers(0, 2**16), label="data_seed"),
    }


def fuzz(base: Spec, pin: FrameworkPin, examples: int = 20, seed: int = 0, max_grad_accum: int = 4,
         max_micro_batch: int = 3, workdir: Path | None = None) -> FuzzResult:
    """Search configurations around `base` for one where `pin` does not agree with the reference."""
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import seed as hseed
        from hypothesis import strategies as st
    except ImportError:
        raise UsageError("stepdiff fuzz needs hypothesis: pip install hypothesis") from None
    if base.data.samples:
        raise UsageError("stepdiff fuzz draws its samples: remove data.samples from the base case")
    out = FuzzResult(pin.label, 0)
    last_failure: dict[str, Any] = {}

    with Session(pin, workdir) as session:

        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(st.data())
        def check(data: Any) -> None:
            fields = draw_fields(data, base, max_grad_accum, max_micro_batch)
            spec = base.replace(**fields)
            res = session.run(spec)
            out.examples += 1
            out.tried.append((fields, res.verdict))
            if res.verdict in ("diverge", "error"):
                last_failure["fields"], last_failure["result"] = fields, res
                raise AssertionError(f"{pin.label}: {res.verdict} at {fields}: {res.reason}")

        try:
            check()
        except AssertionError:
            out.failing, out.result = last_failure["fields"], last_failure["result"]
    return out
