"""The JSON report: machine-readable, stable keys (documented in README), storable and comparable across runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stepdiff.harness.compare import RunResult
from stepdiff.harness.runner import CaseResult
from stepdiff.harness.spec import to_dict

SCHEMA = 1


def _f(x: float | None) -> float | str | None:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


def run_dict(r: RunResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "framework": r.framework,
        "version": r.version,
        "extra_pins": list(r.extra_pins),
        "label": r.label,
        "verdict": r.verdict,
        "reason": r.reason,
        "bound": r.bound.value if r.bound else None,
        "bound_source": r.bound.source if r.bound else None,
        "max_rel_grad_error": _f(r.max_rel_grad_error),
        "first_diverging_step": r.first_diverging_step,
        "microbatch_weights": list(r.fit.weights) if r.fit else None,
        "microbatch_labels": list(r.fit.labels) if r.fit else None,
        "fit_residual": _f(r.fit.residual) if r.fit else None,
        "fit_step": r.fit_step if r.fit else None,
        "signature": r.signature.name if r.signature else None,
        "signature_text": r.signature.text if r.signature else None,
        "supervision_mismatches": r.supervision,
        "token_signature": r.tokens.name if r.tokens else None,
        "token_signature_text": r.tokens.text if r.tokens else None,
        "token_fit_residual": _f(r.tokens.residual) if r.tokens else None,
        "steps": [
            {
                "step": s.step, "loss": _f(s.loss), "loss_ref": _f(s.loss_ref), "loss_rel": _f(s.loss_rel),
                "grad_norm": _f(s.grad_norm), "grad_norm_ref": _f(s.grad_norm_ref),
                "grad_norm_rel": _f(s.grad_norm_rel),
                "grad_rel": _f(s.grad.total.rel), "grad_max_abs": _f(s.grad.total.max_abs),
                "grad_cosine": _f(s.grad.total.cosine), "update_rel": _f(s.update.total.rel),
                "diverged": s.diverged, "reasons": s.reasons,
                "params_by_grad_error": [{"name": p.name, "rel": _f(p.rel), "max_abs": _f(p.max_abs),
                                          "cosine": _f(p.cosine)} for p in s.grad.per_param],
            }
            for s in r.steps
        ],
        "meta": r.meta,
        "env_versions": r.env_versions,
        "timings": r.timings,
    }
    if r.verdict == "error":
        out["log_tail"] = r.log_tail
    return out


def case_dict(result: CaseResult) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "case": result.case,
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "bound": result.bound.value,
        "bound_source": result.bound.source,
        "reference_self_error": _f(result.bound.reference_self_error),
        "reference_versions": result.reference_versions,
        "runs": [run_dict(r) for r in result.runs],
        "pairwise_max_rel_grad_error": result.pairwise,
        "odd_one_out": result.odd_one_out,
        "same_numbers": result.same_numbers,
        "elapsed_s": result.elapsed_s,
        "spec": to_dict(result.spec),
    }


def write(results: list[CaseResult], path: str | Path) -> None:
    doc: dict[str, Any]
    if len(results) == 1:
        doc = case_dict(results[0])
    else:
        worst = max(results, key=lambda r: r.exit_code)
        doc = {"schema": SCHEMA, "verdict": worst.verdict, "cases": [case_dict(r) for r in results],
               "runs": [run | {"case": c.case} for c in results for run in case_dict(c)["runs"]]}
    Path(path).write_text(json.dumps(doc, indent=1))
