"""The HTML report: one self-contained file that opens offline (plotly.js inlined, no CDN, no network).

Rendered from the JSON document with a Jinja2 template (templates/report.html.j2) and plotly figures, so
`stepdiff report RESULT.json --html PATH` writes the same bytes the run wrote. Above the fold: the overall verdict,
the verdict matrix (case x framework) and, for each run that does not agree, its signature. Per case below: the
pairwise error matrix between every run and the reference (odd one out and same-numbers groups marked), loss / grad
norm / gradient error / update error per step against the bound, and per run a heatmap of the relative gradient
error (layers down, parameter kinds across), the fitted micro-batch (and token) weights against 1.0, the exact code
path, patches, resolved versions, the knobs it was given, and the log tail of an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .json_report import cases_of
from .terminal import MARK, header, num, odd_one_out_line, same_number_lines, weights_text

COLORS = {"agree": "#1a7f37", "diverge": "#cf222e", "error": "#8250df", "unsupported": "#9a6700"}
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": False,
               "modeBarButtonsToRemove": ["lasso2d", "select2d", "toImage"]}
TEMPLATE = "plotly_white"
LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
KEY_PACKAGES = {"torch", "transformers", "deepspeed", "openrlhf", "trl", "verl", "accelerate", "peft", "flash-attn",
                "vllm", "ray", "numpy", "safetensors"}
"""Shown inline; every resolved version is in a folded list below them."""
RUN_COLORS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#1b7c83", "#6e7781", "#bf3989")


def _val(x: Any) -> float | None:
    """A document number as a float for plotting (non-finite strings become None: plotly leaves a gap)."""
    if x is None or isinstance(x, str):
        return None
    return float(x)


LOG_FLOOR = 1e-12


def _floor(x: Any) -> float | None:
    v = _val(x)
    return None if v is None else max(v, LOG_FLOOR)


def _log10(x: Any) -> float | None:
    v = _val(x)
    if v is None:
        return None
    return math.log10(max(v, 1e-16))


def _colorbar(bound: float | None, lo: float, hi: float) -> dict[str, Any]:
    """Decades of relative error on the colour bar, and the bound (the colour scale's midpoint) marked."""
    decades = [d for d in range(math.ceil(lo), math.floor(hi) + 1, 2) if bound is None or abs(d - bound) > 1.2]
    vals = [float(d) for d in decades] + ([bound] if bound is not None else [])
    text = [f"1e{d}" for d in decades] + (["bound"] if bound is not None else [])
    return {"title": {"text": "rel err"}, "tickvals": vals, "ticktext": text}


def _figure_html(fig: Any, div_id: str, height: int) -> str:
    import plotly.io as pio

    fig.update_layout(template=TEMPLATE, height=height, margin={"l": 60, "r": 20, "t": 56, "b": 50},
                      font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
                      title={"x": 0.01, "xanchor": "left", "y": 0.98, "yanchor": "top", "font": {"size": 14}})
    return str(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG,
                           default_height=f"{height}px", default_width="100%"))


# ---------------------------------------------------------------------------------------------------- figures
def pairwise_figure(c: dict[str, Any], div_id: str) -> str:
    """Max relative gradient error between every two runs and the reference; odd one out and same-numbers groups
    marked on the axis labels."""
    import plotly.graph_objects as go

    runs = [r for r in c["runs"] if r["max_rel_grad_error"] is not None]
    labels = ["reference"] + [r["label"] for r in runs]
    group_of: dict[str, str] = {}
    for i, g in enumerate(x for x in c["same_numbers"] if len(x) > 1):
        for label in g:
            group_of[label] = chr(ord("A") + i)

    def tick(label: str) -> str:
        mark = " ★ odd one out" if label == c["odd_one_out"] else ""
        group = f" [{group_of[label]}]" if label in group_of else ""
        return f"{label}{group}{mark}"

    err: dict[tuple[str, str], Any] = {}
    for r in runs:
        err[("reference", r["label"])] = err[(r["label"], "reference")] = r["max_rel_grad_error"]
    for a, row in c["pairwise_max_rel_grad_error"].items():
        for b, v in row.items():
            err[(a, b)] = v
    z = [[_log10(err.get((a, b))) if a != b else None for b in labels] for a in labels]
    text = [[num(err.get((a, b)), ".1e", "") if a != b else "" for b in labels] for a in labels]
    ticks = [tick(x) for x in labels]
    bound = _log10(c["bound"])
    fig = go.Figure(go.Heatmap(
        z=z, x=ticks, y=ticks, text=text, texttemplate="%{text}", colorscale="RdYlGn", reversescale=True,
        zmid=bound, zmin=min(-9.0, (bound or 0) - 4), zmax=max(1.0, (bound or 0) + 4), hoverongaps=False,
        hovertemplate="%{y} against %{x}: max rel grad error %{text}<extra></extra>",
        colorbar=_colorbar(bound, min(-9.0, (bound or 0) - 4), max(1.0, (bound or 0) + 4))))
    fig.update_yaxes(autorange="reversed", title_text="run")
    fig.update_xaxes(title_text="relative to", side="bottom")
    fig.update_layout(title={"text": f"pairwise max relative gradient error (bound {num(c['bound'], '.1e')})"})
    return _figure_html(fig, div_id, 120 + 60 * len(labels))


def steps_figure(c: dict[str, Any], div_id: str) -> str:
    """Loss and grad norm against the reference's, gradient and update relative error against the bound, per step."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=("reported loss", "reported grad norm",
                                                        "relative gradient error", "relative update error"),
                        horizontal_spacing=0.08, vertical_spacing=0.16)
    runs = [r for r in c["runs"] if r["steps"]]
    if runs:
        first = runs[0]["steps"]
        steps = [s["step"] for s in first]
        ref = {"dash": "dash", "color": "#24292f"}
        for key, col in (("loss_ref", 1), ("grad_norm_ref", 2)):
            fig.add_trace(go.Scatter(x=steps, y=[_val(s[key]) for s in first], name="reference", mode="lines+markers",
                                     line=ref, legendgroup="reference", showlegend=col == 1), row=1, col=col)
    for i, r in enumerate(runs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        xs = [s["step"] for s in r["steps"]]
        common = {"mode": "lines+markers", "line": {"color": color}, "legendgroup": r["label"]}
        fig.add_trace(go.Scatter(x=xs, y=[_val(s["loss"]) for s in r["steps"]], name=r["label"], **common),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[_val(s["grad_norm"]) for s in r["steps"]], name=r["label"],
                                 showlegend=False, **common), row=1, col=2)
        for key, col in (("grad_rel", 1), ("update_rel", 2)):
            # a log axis cannot show 0 (bitwise agreement): drawn at LOG_FLOOR, the hover says the real value
            fig.add_trace(go.Scatter(x=xs, y=[_floor(s.get(key)) for s in r["steps"]], name=r["label"],
                                     customdata=[num(s.get(key), ".3e") for s in r["steps"]], showlegend=False,
                                     hovertemplate=f"{r['label']} step %{{x}}: %{{customdata}}<extra></extra>",
                                     **common), row=2, col=col)
    bound = _val(c["bound"])
    update_bound = next((_val(r.get("update_bound")) for r in runs if r.get("update_bound") is not None), bound)
    for b, col, what in ((bound, 1, "bound"), (update_bound, 2, "update bound")):
        if b:
            fig.add_hline(y=b, line={"color": "#cf222e", "dash": "dot"}, annotation_text=f"{what} {b:.1e}",
                          annotation_position="top left", row=2, col=col)
    fig.update_yaxes(type="log", exponentformat="e", row=2, col=1)
    fig.update_yaxes(type="log", exponentformat="e", row=2, col=2)
    n_steps = max((len(r["steps"]) for r in runs), default=1)
    fig.update_xaxes(dtick=1, range=[-0.5, n_steps - 0.5])
    fig.update_xaxes(title_text="optimizer step", row=2)
    fig.update_layout(legend={"orientation": "h", "y": -0.18})
    return _figure_html(fig, div_id, 560)


def layer_grid(params: Sequence[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """Rows (layers, top-level parameters first), columns (parameter kinds) and the cell of each parameter.

    'model.layers.3.self_attn.q_proj.weight' -> row 'layer 3', column 'self_attn.q_proj.weight'; parameters outside
    the layers ('model.embed_tokens.weight', 'lm_head.weight', 'model.norm.weight') get the row 'model' and their
    own column, so every parameter has exactly one cell."""
    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    layered = []
    for p in params:
        m = LAYER.match(p["name"])
        if m:
            layered.append((int(m.group(1)), m.group(2), p))
        else:
            key = p["name"].removeprefix("model.")
            if "model" not in rows:
                rows.insert(0, "model")
            cells[("model", key)] = p
            cols.append(key)
    kinds: list[str] = []
    for layer, kind, p in sorted(layered, key=lambda t: t[0]):
        row = f"layer {layer}"
        if row not in rows:
            rows.append(row)
        if kind not in kinds:
            kinds.append(kind)
        cells[(row, kind)] = p
    order = _kind_order
    return rows, sorted(kinds, key=order) + sorted(cols, key=order), cells


def _kind_order(kind: str) -> tuple[int, str]:
    """Parameter kinds in the order data flows through a decoder layer."""
    flow = ("embed", "input_layernorm", "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
            "post_attention_layernorm", "mlp.gate", "mlp.up", "mlp.down", "norm", "lm_head")
    return next((i for i, f in enumerate(flow) if kind.startswith(f)), len(flow)), kind


def heatmap_figure(r: dict[str, Any], step: dict[str, Any], bound: float | None, div_id: str) -> str:
    import plotly.graph_objects as go

    rows, cols, cells = layer_grid(step["params_by_grad_error"])
    z = [[_log10(cells[(rw, cl)]["rel"]) if (rw, cl) in cells else None for cl in cols] for rw in rows]
    text = [[num(cells[(rw, cl)]["rel"], ".1e", "") if (rw, cl) in cells else "" for cl in cols] for rw in rows]
    hover = [[(f"{cells[(rw, cl)]['name']}<br>rel {num(cells[(rw, cl)]['rel'], '.3e')}<br>max abs "
               f"{num(cells[(rw, cl)]['max_abs'], '.3e')}<br>cos {num(cells[(rw, cl)]['cosine'], '.6f')}")
              if (rw, cl) in cells else "" for cl in cols] for rw in rows]
    lb = _log10(bound)
    fig = go.Figure(go.Heatmap(
        z=z, x=[_short(c) for c in cols], y=rows, text=text, customdata=hover, texttemplate="%{text}",
        textfont={"size": 10}, colorscale="RdYlGn", reversescale=True, zmid=lb, zmin=(lb or 0) - 5,
        zmax=(lb or 0) + 5, hoverongaps=False, hovertemplate="%{customdata}<extra></extra>", xgap=2, ygap=2,
        colorbar=_colorbar(lb, (lb or 0) - 5, (lb or 0) + 5)))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(tickangle=-35)
    fig.update_layout(title={"text": f"relative gradient error per parameter at step {step['step']}"})
    return _figure_html(fig, div_id, 170 + 34 * len(rows))


def _short(kind: str) -> str:
    return kind.removesuffix(".weight").replace("self_attn.", "attn.").replace("_layernorm", "_ln") \
        .replace("embed_tokens", "embed")


def weights_figure(r: dict[str, Any], div_id: str) -> str:
    """Fitted micro-batch weights against the correct 1.0 (and the token-level weights, when fitted)."""
    import plotly.graph_objects as go

    ws = [_val(w) for w in r["microbatch_weights"]]
    colors = ["#1a7f37" if w is not None and abs(w - 1) <= 0.02 else "#cf222e" for w in ws]
    fig = go.Figure(go.Bar(x=r["microbatch_labels"], y=ws, marker_color=colors,
                           text=[num(w, ".3f") for w in r["microbatch_weights"]], textposition="outside",
                           hovertemplate="%{x}: weight %{y:.4f}<extra></extra>", name="micro-batch weight"))
    fig.add_hline(y=1.0, line={"color": "#24292f", "dash": "dash"}, annotation_text="1.0 = correct",
                  annotation_position="top right")
    top = max([1.0] + [w for w in ws if w is not None])
    low = min([0.0] + [w for w in ws if w is not None])
    fig.update_yaxes(range=[low - 0.1 * (top - low + 0.1), top * 1.25 + 0.05], title_text="weight (1 = correct)")
    fig.update_layout(title={"text": f"micro-batch weights at step {r['fit_step']} "
                                     f"(fit residual {num(r['fit_residual'], '.1e')})"}, showlegend=False)
    return _figure_html(fig, div_id, 300)


def token_figure(r: dict[str, Any], div_id: str) -> str:
    import plotly.graph_objects as go

    xs, ys = [], []
    for sample, positions in r["token_weights"].items():
        for pos, w in sorted(positions.items(), key=lambda kv: int(kv[0])):
            xs.append(f"s{sample}:t{pos}")
            ys.append(_val(w))
    colors = ["#1a7f37" if y is not None and abs(y - 1) <= 0.05 else "#cf222e" for y in ys]
    fig = go.Figure(go.Bar(x=xs, y=ys, marker_color=colors, hovertemplate="%{x}: weight %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line={"color": "#24292f", "dash": "dash"})
    fig.update_layout(title={"text": f"token weights (sample:target position) - {r['token_signature']}"},
                      showlegend=False)
    fig.update_yaxes(title_text="weight (1 = correct)")
    return _figure_html(fig, div_id, 280)


# ---------------------------------------------------------------------------------------------------- page
def _run_view(c: dict[str, Any], r: dict[str, Any], ci: int, ri: int) -> dict[str, Any]:
    meta = r.get("meta") or {}
    figs = []
    heat = None
    if r["steps"]:
        at = r["first_diverging_step"] if r["first_diverging_step"] is not None else (r["fit_step"] or 0)
        heat = heatmap_figure(r, r["steps"][at], _val(r["bound"]), f"heat-{ci}-{ri}")
    if r["microbatch_weights"] is not None:
        figs.append(weights_figure(r, f"weights-{ci}-{ri}"))
    if r["token_weights"]:
        figs.append(token_figure(r, f"tokens-{ci}-{ri}"))
    versions = dict(meta.get("versions") or {})
    versions.update(r["env_versions"])
    key = sorted((k, v) for k, v in versions.items() if k.lower() in KEY_PACKAGES)
    return {"r": r, "id": f"run-{ci}-{ri}", "color": COLORS[r["verdict"]], "mark": MARK[r["verdict"]],
            "heatmap": heat, "figures": figs, "meta": meta, "versions": sorted(versions.items()), "key_versions": key,
            "weights": weights_text(r["microbatch_weights"]),
            "max_err": num(r["max_rel_grad_error"]),
            "worst": (f"{r['worst_parameter']['name']} ({num(r['worst_parameter']['rel'])})"
                      if r["worst_parameter"] else "-")}


def _case_view(c: dict[str, Any], ci: int) -> dict[str, Any]:
    measured = [r for r in c["runs"] if r["max_rel_grad_error"] is not None]
    return {"c": c, "id": f"case-{ci}", "header": header(c), "color": COLORS[c["verdict"]],
            "pairwise": pairwise_figure(c, f"pairwise-{ci}") if measured else None,
            "steps": steps_figure(c, f"steps-{ci}") if measured else None,
            "runs": [_run_view(c, r, ci, ri) for ri, r in enumerate(c["runs"])],
            "same_numbers": same_number_lines(c), "odd": odd_one_out_line(c)}


def render_document(doc: dict[str, Any]) -> str:
    import jinja2
    from plotly.offline import get_plotlyjs

    cases = cases_of(doc)
    labels: list[str] = []
    for c in cases:
        labels += [r["label"] for r in c["runs"] if r["label"] not in labels]
    matrix = [{"case": c, "cells": [next((r for r in c["runs"] if r["label"] == lab), None) for lab in labels]}
              for c in cases]
    findings = [(c, r) for c in cases for r in c["runs"] if r["verdict"] != "agree"]
    env = jinja2.Environment(loader=jinja2.PackageLoader("stepdiff.reports", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["num"] = num
    html = env.get_template("report.html.j2").render(
        doc=doc, cases=[_case_view(c, i) for i, c in enumerate(cases)], labels=labels, matrix=matrix,
        findings=findings, colors=COLORS, marks=MARK, plotlyjs=get_plotlyjs(), title=_title(doc, cases))
    return str(html)


def _title(doc: dict[str, Any], cases: list[dict[str, Any]]) -> str:
    names = ", ".join(c["case"] for c in cases[:3]) + (" ..." if len(cases) > 3 else "")
    return f"stepdiff {doc['verdict']}: {names}"


def write_document(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(render_document(doc), encoding="utf-8")
