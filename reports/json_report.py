"""The JSON report: the one document every other report is rendered from.

A run builds this document once; the terminal table, Markdown, JUnit XML and HTML are all rendered from it, and
`stepdiff report RESULT.json` renders them again from the stored file alone, identically. Its shape is published as a
versioned JSON Schema shipped in the package (`stepdiff.reports.schema`, file `schema/result-<N>.schema.json`).
Non-finite numbers are written as the strings "nan", "inf", "-inf" (JSON has no NaN).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepdiff.harness.outcome import exit_code, worst_verdict

if TYPE_CHECKING:
    from stepdiff.harness.compare import RunResult
    from stepdiff.harness.runner import CaseResult

SCHEMA = 2
"""Version of the document's shape; bumped on any change that is not a new optional field."""

HASH_IGNORES = (("case", "frameworks"), ("case", "description"), ("run", "timeout_s"))
"""Spec fields that do not change the work compared: which framework releases ran, prose, the time limit."""


def _f(x: float | None) -> float | str | None:
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the spec's canonical JSON without HASH_IGNORES: two runs with the same hash did the same work (only
    the framework releases may differ)."""
    work = json.loads(json.dumps(spec))
    for section, key in HASH_IGNORES:
        work.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(work, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_dict(r: RunResult, knobs: dict[str, Any] | None = None, optimizer: str | None = None) -> dict[str, Any]:
    worst = r.worst_param
    out: dict[str, Any] = {
        "label": r.label,
        "framework": r.framework,
        "version": r.version,
        "extra_pins": list(r.extra_pins),
        "verdict": r.verdict,
        "reason": r.reason,
        "bound": r.bound.value if r.bound else None,
        "bound_source": r.bound.source if r.bound else None,
        "update_bound": r.bound.update_bound(optimizer) if r.bound and optimizer else None,
        "update_bound_source": r.bound.update_source if r.bound else None,
        "weights_bound": r.bound.weights if r.bound else None,
        "optimizer": (r.meta or {}).get("optimizer") or None,
        "sources": dict((r.meta or {}).get("sources") or {}),
        "compared": dict(r.compared),
        "optimizer_isolation": None if r.optimizer is None else {
            "name": r.optimizer.name, "text": r.optimizer.text, "residual": _f(r.optimizer.residual),
            "correct_residual": _f(r.optimizer.correct_residual), "also": list(r.optimizer.also)},
        "max_rel_grad_error": _f(r.max_rel_grad_error),
        "max_rel_update_error": _f(max((s.update.total.rel for s in r.steps), default=None)) if r.steps else None,
        "worst_parameter": {"name": worst[0], "rel": _f(worst[1])} if worst else None,
        "first_diverging_step": r.first_diverging_step,
        "microbatch_weights": [_f(w) for w in r.fit.weights] if r.fit else None,
        "microbatch_undetermined": [r.fit.labels[i] for i in r.fit.undetermined] if r.fit else None,
        "microbatch_labels": list(r.fit.labels) if r.fit else None,
        "fit_residual": _f(r.fit.residual) if r.fit else None,
        "fit_step": r.fit_step if r.fit else None,
        "signature": r.signature.name if r.signature else None,
        "signature_text": r.signature.text if r.signature else None,
        "supervision_mismatches": list(r.supervision),
        "token_signature": r.tokens.name if r.tokens else None,
        "token_signature_text": r.tokens.text if r.tokens else None,
        "token_fit_residual": _f(r.tokens.residual) if r.tokens else None,
        "token_weights": ({str(s): {str(p): _f(w) for p, w in pos.items()} for s, pos in r.tokens.relative.items()}
                          if r.tokens else None),
        "knobs": knobs,
        "steps": [
            {
                "step": s.step, "loss": _f(s.loss), "loss_ref": _f(s.loss_ref), "loss_rel": _f(s.loss_rel),
                "grad_norm": _f(s.grad_norm), "grad_norm_ref": _f(s.grad_norm_ref),
                "grad_norm_rel": _f(s.grad_norm_rel),
                "grad_rel": _f(s.grad.total.rel), "grad_max_abs": _f(s.grad.total.max_abs),
                "grad_cosine": _f(s.grad.total.cosine), "update_rel": _f(s.update.total.rel),
                "update_max_abs": _f(s.update.total.max_abs),
                "state_rel": {k: _f(d.total.rel) for k, d in s.state.items()}, "opt_step": s.opt_step,
                "opt_step_ref": s.opt_step_ref, "weights_dev": _f(s.weights_dev), "carried": _f(s.carried),
                "diverged": s.diverged, "reasons": list(s.reasons), "failed": list(s.kinds),
                "params_by_grad_error": [{"name": p.name, "rel": _f(p.rel), "max_abs": _f(p.max_abs),
                                          "cosine": _f(p.cosine)} for p in s.grad.per_param],
                "params_by_update_error": [{"name": p.name, "rel": _f(p.rel), "max_abs": _f(p.max_abs)}
                                           for p in s.update.per_param],
            }
            for s in r.steps
        ],
        "meta": r.meta,
        "env_versions": dict(r.env_versions),
        "timings": dict(r.timings),
        "log_tail": r.log_tail if r.verdict == "error" else None,
    }
    return out


def _knobs(spec: Any, framework: str) -> dict[str, Any] | None:
    """Every knob the framework was given, defaults included (None for adapters without knobs)."""
    from stepdiff.harness.errors import UsageError
    from stepdiff.harness.spec import to_dict

    try:
        k = spec.knobs_for(framework)
    except (UsageError, ImportError):  # an adapter not registered or not importable here: no knob table
        return None
    return to_dict(k) if k is not None else None


def case_dict(result: CaseResult) -> dict[str, Any]:
    from stepdiff import __version__
    from stepdiff.harness.spec import to_dict

    spec = to_dict(result.spec)
    return {
        "schema": SCHEMA,
        "stepdiff_version": __version__,
        "created": getattr(result, "created", None) or now(),
        "case": result.case,
        "spec_hash": spec_hash(spec),
        "verdict": result.verdict,
        "exit_code": result.exit_code,
        "bound": result.bound.value,
        "bound_source": result.bound.source,
        "reference_self_error": _f(result.bound.reference_self_error),
        "update_bound": result.bound.update_bound(),
        "update_bound_source": result.bound.update_source,
        "reference_update_error": _f(result.bound.reference_update_error),
        "weights_bound": result.bound.weights,
        "weights_bound_source": result.bound.weights_source,
        "reference_versions": dict(result.reference_versions),
        "runs": [run_dict(r, _knobs(result.spec, r.framework), result.spec.optimizer.name) for r in result.runs],
        "pairwise_max_rel_grad_error": result.pairwise,
        "odd_one_out": result.odd_one_out,
        "same_numbers": result.same_numbers,
        "elapsed_s": result.elapsed_s,
        "reference_cached": result.reference_cached,
        "spec": spec,
    }


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def document(results: list[CaseResult] | list[dict[str, Any]]) -> dict[str, Any]:
    """The report of one case (a case document) or of several (a multi-case document with `cases` and a flat
    `runs` list whose entries also carry `case`)."""
    from stepdiff import __version__

    cases = [c if isinstance(c, dict) else case_dict(c) for c in results]
    if len(cases) == 1:
        return cases[0]
    verdicts = [run["verdict"] for c in cases for run in c["runs"]]  # error > diverge > unsupported > agree
    return {"schema": SCHEMA, "stepdiff_version": __version__, "created": cases[0]["created"],
            "verdict": worst_verdict(verdicts), "exit_code": exit_code(verdicts), "cases": cases,
            "runs": [run | {"case": c["case"]} for c in cases for run in c["runs"]]}


def cases_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The case documents of a single- or multi-case document."""
    return list(doc["cases"]) if "cases" in doc else [doc]


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1)


def write(results: list[CaseResult] | dict[str, Any], path: str | Path) -> dict[str, Any]:
    doc = results if isinstance(results, dict) else document(results)
    Path(path).write_text(dumps(doc))
    return doc


def load(path: str | Path) -> dict[str, Any]:
    """A stored report, checked to be one this stepdiff can render. Raises UsageError (one line) otherwise."""
    from stepdiff.harness.errors import UsageError

    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give the path of a JSON report written by `stepdiff run --json`"
                         ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a JSON report ({e}); give a file written by `stepdiff run --json`") from None
    if not isinstance(doc, dict) or "schema" not in doc:
        raise UsageError(f"{path}: not a stepdiff report (no 'schema' key); give a file written by `stepdiff run "
                         "--json`")
    if doc["schema"] != SCHEMA:
        raise UsageError(f"{path}: report schema {doc['schema']!r}, this stepdiff {__import__('stepdiff').__version__} "
                         f"reads schema {SCHEMA}; rerun the case with this stepdiff to get a current report")
    from .schema import problems

    bad = problems(doc)
    if bad:
        raise UsageError(f"{path}: does not match the report schema: {bad[0]}")
    return doc
