"""The terminal report: one table per case, then per-run detail for what did not agree.

Rendered from the JSON document (reports.json_report), so `stepdiff report RESULT.json` prints exactly what the run
printed. CaseResult / RunResult objects are accepted too and converted first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MARK = {"agree": "AGREE", "diverge": "DIVERGE", "error": "ERROR", "unsupported": "UNSUPPORTED"}

Doc = dict[str, Any]


def num(x: Any, fmt: str = ".2e", none: str = "-") -> str:
    """A number of the document: finite floats formatted, non-finite ones (stored as strings) as they are."""
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, fmt)


def weights_text(weights: Sequence[Any] | None) -> str:
    if weights is None:
        return "-"
    return "[" + ", ".join(("?" if x == "nan" else x) if isinstance(x, str)  # ? = undetermined (no contribution)
                           else f"{x:.2f}".rstrip("0").rstrip(".") if abs(x) >= 0.005 else "0"
                           for x in weights) + "]"


_w = weights_text  # older name, used by callers outside this module


def as_case(result: Any) -> Doc:
    if isinstance(result, dict):
        return result
    from .json_report import case_dict

    return case_dict(result)


def as_run(run: Any) -> Doc:
    if isinstance(run, dict):
        return run
    from .json_report import run_dict

    return run_dict(run)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _state(s: Doc) -> str:
    """Optimizer-state errors and the step counter of one step, when compared."""
    out = "".join(f"  {k} rel {num(v)}" for k, v in (s.get("state_rel") or {}).items())
    if s.get("opt_step") is not None:
        out += f"  step counter {s['opt_step']} (ref {s.get('opt_step_ref')})"
    return out


def header(c: Doc) -> str:
    sp = c["spec"]
    b = sp["batch"]
    return (f"micro_batch_size={b['micro_batch_size']} grad_accum={b['grad_accum']} world_size={b['world_size']} "
            f"steps={b['steps']} dtype={sp['model']['dtype']} optimizer={sp['optimizer']['name']} "
            f"device={sp['run']['device']}")


def same_number_lines(c: Doc) -> list[str]:
    verdict = {r["label"]: r["verdict"] for r in c["runs"]}
    out = []
    for g in c["same_numbers"]:
        if len(g) > 1:
            what = "the same wrong numbers" if {verdict.get(x) for x in g} == {"diverge"} else "the same numbers"
            out.append(f"{' and '.join(g)} produce {what} (pairwise within the bound)")
    return out


def odd_one_out_line(c: Doc) -> str | None:
    if not c["odd_one_out"]:
        return None
    return (f"odd one out: {c['odd_one_out']} disagrees with every other framework, which agree among "
            "themselves")


def render(result: Any) -> str:
    c = as_case(result)
    out = [f"case {c['case']}: {header(c)}", f"bound: relative error <= {c['bound_source']}"]
    if c.get("update_bound_source"):
        out.append(f"update bound: relative error beyond parameter rounding <= {c['update_bound_source']}")
    if c.get("weights_bound_source"):
        out.append(f"micro-batch weights: |w - 1| <= {c['weights_bound_source']}")
    out.append("")
    rows = [["framework", "verdict", "max rel grad err", "worst parameter", "micro-batch weights (1 = correct)"]]
    for r in c["runs"]:
        worst = r["worst_parameter"]
        rows.append([r["label"], MARK[r["verdict"]], num(r["max_rel_grad_error"]),
                     f"{worst['name']} ({num(worst['rel'])})" if worst else "-", weights_text(r["microbatch_weights"])])
    out.append(table(rows))
    for r in c["runs"]:
        out.append("")
        out.extend(detail(r))
    for line in same_number_lines(c):
        out += ["", line]
    odd = odd_one_out_line(c)
    if odd:
        out += ["", odd]
    out.append("")
    out.append(f"verdict: {c['verdict']} (exit {c['exit_code']}) in {c['elapsed_s']:.1f} s")
    return "\n".join(out)


def render_document(doc: Doc) -> str:
    """What `stepdiff run` prints on stdout for a whole document: each case's report, one print() each."""
    from .json_report import cases_of

    return "".join(render(c) + "\n" for c in cases_of(doc))


def detail(run: Any) -> list[str]:
    r = as_run(run)
    lines = [f"{r['label']}: {MARK[r['verdict']]} - {r['reason']}"]
    if r["verdict"] == "error" and r.get("log_tail"):
        lines.append("  framework output (tail):")
        lines.extend("    " + ln for ln in r["log_tail"].splitlines()[-15:])
    if r["verdict"] not in ("agree", "diverge"):
        return lines
    meta = r.get("meta")
    if meta:
        lines.append(f"  ran: {meta.get('code_path')} [{meta.get('device')}, world size {meta.get('world_size')}]")
    if r.get("optimizer"):
        lines.append(f"  optimizer: {r['optimizer']}")
    for what, how in (r.get("compared") or {}).items():
        lines.append(f"  {what}: {how}")
    for s in r["steps"]:
        flag = "  <- diverges" if s["diverged"] else ""
        lines.append(f"  step {s['step']}: loss {num(s['loss'], '.6g')} (ref {num(s['loss_ref'], '.6g')})  grad norm "
                     f"{num(s['grad_norm'], '.6g', 'n/a')} (ref {num(s['grad_norm_ref'], '.6g', 'n/a')})  grad rel "
                     f"{num(s['grad_rel'])}  cos {num(s['grad_cosine'], '.6f')}  update rel "
                     f"{num(s['update_rel'])}{_state(s)}{flag}")
    first = r["first_diverging_step"]
    if first is not None:
        s = r["steps"][first]
        params = s["params_by_grad_error"]
        bound = r["bound"]
        lines.append(f"  parameters by gradient error at step {s['step']} (bound {num(bound, '.1e')}):"
                     if bound is not None else "")
        for p in params[:5]:
            lines.append(f"    {p['name']:45s} rel {num(p['rel'], '.3e')}  max abs {num(p['max_abs'], '.3e')}  "
                         f"cos {num(p['cosine'], '.5f')}")
        if len(params) > 5:
            over = sum(1 for p in params if bound is not None and _gt(p["rel"], bound))
            lines.append(f"    ... {over} of {len(params)} parameters over the bound")
    for finding in r["supervision_mismatches"]:
        lines.append(f"  supervised tokens: {finding}")
    if first is not None and "update" in (r["steps"][first].get("failed") or []):
        s = r["steps"][first]
        lines.append(f"  parameters by update error at step {s['step']} (bound {num(r.get('update_bound'), '.1e')}):")
        for p in (s.get("params_by_update_error") or [])[:5]:
            lines.append(f"    {p['name']:45s} rel {num(p['rel'], '.3e')}  max abs {num(p['max_abs'], '.3e')}")
    if r["microbatch_weights"] is not None and r["signature"]:
        pairs = ", ".join(f"{lab}=undetermined" if w == "nan" else f"{lab}={num(w, '.3f')}"
                          for lab, w in zip(r["microbatch_labels"], r["microbatch_weights"], strict=True))
        lines.append(f"  micro-batch weights at step {r['fit_step']} (fit residual {num(r['fit_residual'], '.1e')}): "
                     + pairs)
    iso = r.get("optimizer_isolation")
    if iso:
        lines.append(f"  optimizer isolation (the spec's optimizer on the framework's own gradients: off by "
                     f"{num(iso['correct_residual'], '.2e')}): {iso['name']}: {iso['text']}")
    if r["signature"]:
        lines.append(f"  signature: {r['signature']}: {r['signature_text']}")
    if r["token_signature"]:
        lines.append(f"  token weights (fit residual {num(r['token_fit_residual'], '.1e')}): {r['token_signature']}: "
                     f"{r['token_signature_text']}")
    return lines


def _gt(x: Any, bound: float) -> bool:
    """x > bound for document numbers ('nan' counts as over: a NaN error is never within a bound)."""
    if isinstance(x, str):
        return x != "-inf"
    return bool(x > bound)
