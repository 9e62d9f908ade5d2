"""The terminal report: one table per case, then per-run detail for what did not agree."""

from __future__ import annotations

from stepdiff.harness.compare import RunResult
from stepdiff.harness.runner import CaseResult

MARK = {"agree": "AGREE", "diverge": "DIVERGE", "error": "ERROR", "unsupported": "UNSUPPORTED"}


def _w(weights: tuple[float, ...] | None) -> str:
    if weights is None:
        return "-"
    return "[" + ", ".join(f"{x:.2f}".rstrip("0").rstrip(".") if abs(x) >= 0.005 else "0" for x in weights) + "]"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(result: CaseResult) -> str:
    spec = result.spec
    b = spec.batch
    out = [f"case {result.case}: micro_batch_size={b.micro_batch_size} grad_accum={b.grad_accum} "
           f"world_size={b.world_size} steps={b.steps} dtype={spec.model.dtype} optimizer={spec.optimizer.name} "
           f"device={spec.run.device}",
           f"bound: relative error <= {result.bound.source}", ""]
    rows = [["framework", "verdict", "max rel grad err", "worst parameter", "micro-batch weights (1 = correct)"]]
    for r in result.runs:
        worst = r.worst_param
        rows.append([r.label, MARK[r.verdict],
                     f"{r.max_rel_grad_error:.2e}" if r.max_rel_grad_error is not None else "-",
                     f"{worst[0]} ({worst[1]:.2e})" if worst else "-", _w(r.fit.weights if r.fit else None)])
    out.append(_table(rows))
    for r in result.runs:
        out.append("")
        out.extend(detail(r))
    shared = [g for g in result.same_numbers if len(g) > 1]
    for g in shared:
        verdicts = {r.verdict for r in result.runs if r.label in g}
        what = "the same wrong numbers" if verdicts == {"diverge"} else "the same numbers"
        out.append("")
        out.append(f"{' and '.join(g)} produce {what} (pairwise within the bound)")
    if result.odd_one_out:
        out.append("")
        out.append(f"odd one out: {result.odd_one_out} disagrees with every other framework, which agree among "
                   "themselves")
    out.append("")
    out.append(f"verdict: {result.verdict} (exit {result.exit_code}) in {result.elapsed_s:.1f} s")
    return "\n".join(out)


def detail(r: RunResult) -> list[str]:
    lines = [f"{r.label}: {MARK[r.verdict]} - {r.reason}"]
    if r.verdict == "error" and r.log_tail:
        lines.append("  framework output (tail):")
        lines.extend("    " + ln for ln in r.log_tail.splitlines()[-15:])
    if r.verdict not in ("agree", "diverge"):
        return lines
    if r.meta:
        where = f"{r.meta.get('device')}, world size {r.meta.get('world_size')}"
        lines.append(f"  ran: {r.meta.get('code_path')} [{where}]")
    for s in r.steps:
        flag = "  <- diverges" if s.diverged else ""
        norm = f"{s.grad_norm:.6g}" if s.grad_norm is not None else "n/a"
        ref_norm = f"{s.grad_norm_ref:.6g}" if s.grad_norm_ref is not None else "n/a"
        lines.append(f"  step {s.step}: loss {s.loss:.6g} (ref {s.loss_ref:.6g})  grad norm {norm} (ref {ref_norm})  "
                     f"grad rel {s.grad.total.rel:.2e}  cos {s.grad.total.cosine:.6f}  update rel "
                     f"{s.update.total.rel:.2e}{flag}")
    if r.first_diverging_step is not None:
        s = r.steps[r.first_diverging_step]
        lines.append(f"  parameters by gradient error at step {s.step} (bound {r.bound.value:.1e}):" if r.bound else "")
        for p in s.grad.per_param[:5]:
            lines.append(f"    {p.name:45s} rel {p.rel:.3e}  max abs {p.max_abs:.3e}  cos {p.cosine:.5f}")
        if len(s.grad.per_param) > 5:
            over = sum(1 for p in s.grad.per_param if r.bound and p.rel > r.bound.value)
            lines.append(f"    ... {over} of {len(s.grad.per_param)} parameters over the bound")
    for finding in r.supervision:
        lines.append(f"  supervised tokens: {finding}")
    if r.fit and r.signature:
        lines.append(f"  micro-batch weights at step {r.fit_step} (fit residual {r.fit.residual:.1e}): "
                     + ", ".join(f"{lab}={w:.3f}" for lab, w in zip(r.fit.labels, r.fit.weights, strict=True)))
        lines.append(f"  signature: {r.signature.name}: {r.signature.text}")
    if r.tokens:
        lines.append(f"  token weights (fit residual {r.tokens.residual:.1e}): {r.tokens.name}: {r.tokens.text}")
    return lines
