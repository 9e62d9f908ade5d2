"""Token-level fits of diverging SFT runs (stepdiff.harness.schedule): the reference's per-token contributions at the
first diverging step, computed on the reference's lane (cached like the reference unless replayed along a framework's
own parameters), and the fit of the framework's gradient on them (stepdiff.harness.compare.fit_tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .compare import RunResult
from .errors import WorkerError
from .lanes import REFERENCE_FIRST, Lanes, reference_timeout
from .record import Record
from .refcache import ReferenceCache, key_material
from .spec import Spec, to_dict


class TokenFits:
    """The token fits of one command: its lanes and its reference cache."""

    def __init__(self, lanes: Lanes, cache: ReferenceCache) -> None:
        self.lanes = lanes
        self.cache = cache

    def reference(self, spec: Spec, init: Path, step: int, out: Path, teacher: str | None = None) -> Record | None:
        """The reference's per-token contributions at `step` (cached like the reference unless replayed along a
        framework's own parameters, `teacher`), or None if it cannot run."""
        options: dict[str, Any] = {"token_step": step}
        if teacher:
            options["teacher"] = teacher
        material = key_material(spec, options)
        entry = None if teacher else self.cache.get(material)
        if entry is not None:
            try:
                return Record.load(entry.path)
            except Exception:
                pass
        timeout, field_name = reference_timeout(spec)
        try:
            with self.lanes.cores.hold(1, REFERENCE_FIRST):
                self.lanes.pool.submit(self.lanes.reference_key(spec.run.device),
                                       {"spec": to_dict(spec), "init": str(init), "out": str(out), "options": options},
                                       timeout, *field_name)
        except WorkerError:
            return None  # the token fit is an explanation, never a verdict: skip it if it cannot run
        if not teacher:
            self.cache.put(material, out)
        return Record.load(out)

    def fit(self, spec: Spec, runs: list[RunResult], init: Path, wd: Path) -> None:
        """For SFT runs that diverge, fit the first diverging step's gradient on per-token contributions (see
        stepdiff.harness.runner)."""
        import math

        from . import data as D
        from .compare import fit_tokens
        from .model import parameter_shapes
        from .runner import TOKEN_FIT_MAX_FLOATS, _dirname

        todo = [r for r in runs if r.verdict == "diverge" and r.first_diverging_step is not None
                and "gradient" in r.steps[r.first_diverging_step].kinds]
        if spec.loss.kind != "sft" or not todo:
            return
        n_params = sum(math.prod(s) for s in parameter_shapes(spec).values())
        n_tokens = sum(len(s.prompt) + len(s.response) for s in D.samples(spec)[: spec.samples_per_step])
        if n_params * n_tokens > TOKEN_FIT_MAX_FLOATS:
            return
        lane = self.lanes.lane(self.lanes.reference_key(spec.run.device))
        for r in todo:
            step = r.first_diverging_step
            assert step is not None
            teacher = str(wd / _dirname(r.label) / "record") if step > 0 else None  # the framework's own parameters
            out = wd / "reference-tokens" / (f"{_dirname(r.label)}-step{step}" if teacher else f"step{step}")
            token_ref = lane.submit(self.reference, spec, init, step, out, teacher).result()
            if token_ref is None:
                return
            rec = Record.load(wd / _dirname(r.label) / "record")
            r.tokens = fit_tokens(spec, rec.steps[step].grads, token_ref)
