"""Stored results and baseline comparison: `stepdiff run --save`, `stepdiff compare`, `stepdiff run --compare`.

Stored results live under a project folder (default `.stepdiff/results`), one JSON report per case and framework set:

    .stepdiff/results/<case>/<spec hash[:12]>/<framework pins>/stepdiff-<version>.json

A comparison matches each current run with its baseline run (same pin label, else the same framework when each side
has exactly one run of it, so a baseline of deepspeed==0.19.8 gates a run of deepspeed==0.18.9), prints what moved,
and fails when a threshold of the `--fail` expression is crossed (exit code EXIT_REGRESSION). A baseline that ran a
different spec is a usage error, never a comparison of different work.

The threshold expression (`--fail`): see DSL_HELP.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError

DSL_HELP = """\
The threshold expression (`--fail`), comma-separated terms, each a condition that FAILS the comparison:

    grad_rel>10x         the current value is more than 10 x the baseline's    (ratio; N x, N > 0)
    grad_rel>50%         the current value is more than 50 % above the baseline's
    update_rel>1e-5      the current value is above 1e-5                        (absolute)
    weights>0.05         a fitted micro-batch weight moved by more than 0.05 from the baseline's
    verdict!=same        the verdict changed              signature!=same     the signature changed
    verdict!=agree       the current verdict is not 'agree' (any categorical metric, any value; == also works)

Numeric metrics (each the maximum over the run's steps): grad_rel, update_rel, loss_rel, grad_norm_rel (relative
errors against the reference), fit_residual (share of the gradient no micro-batch re-weighting explains), and weights
(absolute only). Categorical: verdict, signature, token_signature. Ratios and percentages compare against
max(baseline, 1e-9), so a bitwise-exact baseline (0) does not turn rounding noise into an infinite ratio. A number
missing on one side (a run that errored) is reported, and fails only through verdict!=same. Exit codes: 0 nothing
crossed, 6 a threshold crossed, 3 the two results ran different specs (or bad input).
"""

EXIT_REGRESSION = 6
"""`stepdiff compare` / `run --compare`: a threshold of the --fail expression was crossed."""

DEFAULT_FAIL = "verdict!=same,signature!=same,grad_rel>10x,update_rel>10x"
DEFAULT_ROOT = Path(".stepdiff") / "results"
RATIO_FLOOR = 1e-9

NUMERIC = {
    "grad_rel": "max relative gradient error",
    "update_rel": "max relative update error",
    "loss_rel": "max relative error of the reported loss",
    "grad_norm_rel": "max relative error of the reported grad norm",
    "fit_residual": "micro-batch fit residual",
    "weights": "largest change of a fitted micro-batch weight",
}
CATEGORICAL = {"verdict": "verdict", "signature": "micro-batch signature", "token_signature": "token signature"}

_TERM = re.compile(r"^\s*([a-z_]+)\s*(>|!=|==)\s*(\S+?)\s*$")
_FIX = ("write terms like grad_rel>10x, update_rel>1e-5, grad_rel>50%, weights>0.05, verdict!=same, "
        "signature!=same, verdict!=agree")


@dataclass(frozen=True)
class Term:
    text: str
    metric: str
    op: Literal[">", "!=", "=="]
    kind: Literal["ratio", "percent", "absolute", "same", "value"]
    value: float | str

    def crossed(self, base: Any, cur: Any) -> bool:
        if self.metric in CATEGORICAL:
            if self.kind == "same":
                return bool(base != cur)
            return bool(cur != self.value) if self.op == "!=" else bool(cur == self.value)
        if self.metric == "weights":
            return cur is not None and _num(cur) > float(self.value)
        b, c = _num(base), _num(cur)
        if math.isnan(c):
            return cur is not None and isinstance(cur, str)  # a NaN error is worse than any threshold
        if self.kind == "absolute":
            return c > float(self.value)
        if math.isnan(b):
            return False
        floor = max(b, RATIO_FLOOR)
        limit = floor * float(self.value) if self.kind == "ratio" else floor * (1 + float(self.value) / 100)
        return c > limit


def _num(x: Any) -> float:
    """A document number as a float: None -> NaN, 'inf'/'nan' strings -> float."""
    if x is None:
        return math.nan
    return float(x)


def parse_fail(text: str) -> list[Term]:
    """Parse a --fail expression. Raises UsageError naming the bad term and the fix."""
    terms = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        m = _TERM.match(raw)
        if not m:
            raise UsageError(f"--fail term {raw.strip()!r}: expected METRIC>LIMIT or METRIC!=same; fix: {_FIX}")
        metric, op, value = m.groups()
        where = f"--fail term {raw.strip()!r}"
        if metric in CATEGORICAL:
            if op == ">":
                raise UsageError(f"{where}: {metric} is not a number; fix: write {metric}!=same or {metric}!=VALUE")
            kind: Any = "same" if value == "same" and op == "!=" else "value"
            terms.append(Term(raw.strip(), metric, op, kind, value))  # type: ignore[arg-type]
            continue
        if metric not in NUMERIC:
            known = ", ".join([*NUMERIC, *CATEGORICAL])
            raise UsageError(f"{where}: unknown metric {metric!r}; fix: use one of {known}")
        if op != ">":
            raise UsageError(f"{where}: numeric metrics take '>' (the condition that fails); fix: write {metric}>LIMIT")
        kind = "ratio" if value.endswith("x") else "percent" if value.endswith("%") else "absolute"
        number = value[:-1] if kind != "absolute" else value
        try:
            limit = float(number)
        except ValueError:
            raise UsageError(f"{where}: {value!r} is not a number, N x or N %; fix: {_FIX}") from None
        if not math.isfinite(limit) or limit < 0 or (kind == "ratio" and limit <= 0):
            raise UsageError(f"{where}: the limit must be a finite number above 0; fix: {_FIX}")
        if metric == "weights" and kind != "absolute":
            raise UsageError(f"{where}: weights moves are absolute (1.0 = correct); fix: write weights>0.05")
        terms.append(Term(raw.strip(), metric, ">", kind, limit))
    if not terms:
        raise UsageError(f"--fail {text!r}: no terms; fix: {_FIX}")
    return terms


# ------------------------------------------------------------------------------------------------ metrics
def _max(steps: list[dict[str, Any]], key: str) -> Any:
    """Max over steps of a document number; a non-finite value wins; None when no step has it."""
    vals: list[Any] = [s[key] for s in steps if s.get(key) is not None]
    if not vals:
        return None
    bad = [v for v in vals if isinstance(v, str)]
    if bad:
        return bad[0]
    return max(float(v) for v in vals)


def metrics(run: dict[str, Any]) -> dict[str, Any]:
    steps = run["steps"]
    return {"verdict": run["verdict"], "signature": run["signature"], "token_signature": run["token_signature"],
            "grad_rel": run["max_rel_grad_error"], "update_rel": _max(steps, "update_rel"),
            "loss_rel": _max(steps, "loss_rel"), "grad_norm_rel": _max(steps, "grad_norm_rel"),
            "fit_residual": run["fit_residual"], "weights": None}


def weight_shift(base: dict[str, Any], cur: dict[str, Any]) -> float | None:
    bw, cw = base["microbatch_weights"], cur["microbatch_weights"]
    if bw is None or cw is None or len(bw) != len(cw):
        return None
    return max((abs(_num(a) - _num(b)) for a, b in zip(bw, cw, strict=True)), default=0.0)


# ------------------------------------------------------------------------------------------------ comparison
@dataclass
class Move:
    metric: str
    baseline: Any
    current: Any
    crossed: list[str] = field(default_factory=list)
    """The --fail terms this value crosses."""


@dataclass
class RunComparison:
    baseline: str | None
    current: str | None
    moves: list[Move] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def crossed(self) -> list[str]:
        return [t for m in self.moves for t in m.crossed]


@dataclass
class CaseComparison:
    case: str
    spec_hash: str
    runs: list[RunComparison]


@dataclass
class Comparison:
    cases: list[CaseComparison]
    terms: list[Term]
    baseline_path: str = ""

    @property
    def crossed(self) -> list[str]:
        return [t for c in self.cases for r in c.runs for t in r.crossed]

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.crossed else 0


def _cases(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["cases"]) if "cases" in doc else [doc]


def spec_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted spec fields that differ between two specs (ignoring what the spec hash ignores)."""
    from stepdiff.reports.json_report import HASH_IGNORES

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out: dict[str, Any] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(a), flat(b)
    ignored = {f"{s}.{k}" for s, k in HASH_IGNORES}
    return [k for k in sorted(set(fa) | set(fb)) if k not in ignored and fa.get(k, "<absent>") != fb.get(k, "<absent>")]


def _show(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"
    return str(x)


def match_runs(base: list[dict[str, Any]], cur: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None,
                                                                                      dict[str, Any] | None]]:
    """Pairs (baseline run, current run): same label first, then the same framework when it is unique on each side."""
    left = list(base)
    matched: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(cur):
        b = next((x for x in left if x["label"] == c["label"]), None)
        if b is not None:
            left.remove(b)
            matched[i] = b
    unmatched = [c for i, c in enumerate(cur) if i not in matched]
    for i, c in enumerate(cur):
        if i in matched:
            continue
        same_fw_b = [x for x in left if x["framework"] == c["framework"]]
        same_fw_c = [x for x in unmatched if x["framework"] == c["framework"]]
        if len(same_fw_b) == 1 and len(same_fw_c) == 1:
            left.remove(same_fw_b[0])
            matched[i] = same_fw_b[0]
    pairs: list[tuple[dict[str, Any] | None, dict[str, Any] | None]] = [(matched.get(i), c) for i, c in enumerate(cur)]
    return pairs + [(b, None) for b in left]


def compare_documents(baseline: dict[str, Any], current: dict[str, Any], terms: list[Term]) -> Comparison:
    """Compare a current report with a baseline report. Raises UsageError when a case's spec changed."""
    base_cases = {c["case"]: c for c in _cases(baseline)}
    cur_cases = _cases(current)
    if len(base_cases) == 1 and len(cur_cases) == 1:  # one case each: compare them whatever their names
        pairs = [(next(iter(base_cases.values())), cur_cases[0])]
    else:
        missing = [c["case"] for c in cur_cases if c["case"] not in base_cases]
        if missing:
            raise UsageError(f"baseline has no case {missing[0]!r} (it has {', '.join(sorted(base_cases))}); fix: "
                             "give a baseline of the same cases")
        pairs = [(base_cases[c["case"]], c) for c in cur_cases]
    out = []
    for b, c in pairs:
        _same_spec(b, c)
        runs = []
        for br, cr in match_runs(b["runs"], c["runs"]):
            rc = RunComparison(br["label"] if br else None, cr["label"] if cr else None)
            if br is not None and cr is not None:
                mb, mc = metrics(br), metrics(cr)
                mc["weights"] = weight_shift(br, cr)
                mb["weights"] = 0.0 if mc["weights"] is not None else None
                for metric in [*CATEGORICAL, *NUMERIC]:
                    move = Move(metric, mb[metric], mc[metric],
                                [t.text for t in terms if t.metric == metric and t.crossed(mb[metric], mc[metric])])
                    changed = (mb[metric] != mc[metric]) if metric != "weights" else bool(mc["weights"])
                    if changed or move.crossed:
                        rc.moves.append(move)
                    elif mb[metric] is not None:
                        rc.unchanged.append(metric)
            runs.append(rc)
        out.append(CaseComparison(c["case"], c["spec_hash"], runs))
    return Comparison(out, terms)


def _same_spec(b: dict[str, Any], c: dict[str, Any]) -> None:
    if b["spec_hash"] != c["spec_hash"]:
        diff = spec_difference(b["spec"], c["spec"])
        shown = ", ".join(f"{k}: {_show(_get(b['spec'], k))} -> {_show(_get(c['spec'], k))}" for k in diff[:4])
        raise UsageError(f"case {c['case']!r}: baseline and current ran different specs ({shown or 'spec hash'}"
                         f"{', ...' if len(diff) > 4 else ''}); fix: compare runs of the same case file, or save "
                         "a new baseline")


def check_same_work(baseline: dict[str, Any], case_doc: dict[str, Any]) -> None:
    """UsageError unless `baseline` holds a case with the spec of `case_doc` (by name, or its only case)."""
    cases = _cases(baseline)
    b = cases[0] if len(cases) == 1 else next((x for x in cases if x["case"] == case_doc["case"]), None)
    if b is None:
        raise UsageError(f"baseline has no case {case_doc['case']!r} (it has {', '.join(x['case'] for x in cases)}); "
                         "fix: give a baseline of the same cases")
    _same_spec(b, case_doc)


def _get(spec: dict[str, Any], dotted: str) -> Any:
    cur: Any = spec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def render(cmp: Comparison) -> str:
    lines = [f"stepdiff compare: --fail {','.join(t.text for t in cmp.terms)}"
             + (f" (baseline {cmp.baseline_path})" if cmp.baseline_path else "")]
    for c in cmp.cases:
        lines.append(f"case {c.case} (spec {c.spec_hash[:12]}, the same in both)")
        for r in c.runs:
            if r.baseline is None:
                lines.append(f"  {r.current}: no baseline run to compare with (new framework run)")
                continue
            if r.current is None:
                lines.append(f"  {r.baseline}: in the baseline, not in the current run")
                continue
            name = r.current if r.baseline == r.current else f"{r.baseline} -> {r.current}"
            state = f"FAIL ({len(r.crossed)} crossed)" if r.crossed else "ok"
            lines.append(f"  {name}: {state}")
            for m in r.moves:
                if m.metric == "weights":
                    what = f"moved by up to {_show(m.current)}"
                else:
                    what = f"{_show(m.baseline)} -> {_show(m.current)}{_ratio(m)}"
                flag = f"   <- crosses {', '.join(m.crossed)}" if m.crossed else ""
                lines.append(f"    {m.metric:14s} {what}{flag}")
            if r.unchanged:
                lines.append(f"    unchanged: {', '.join(r.unchanged)}")
    n = len(cmp.crossed)
    lines.append(f"result: {n} threshold(s) crossed (exit {EXIT_REGRESSION})" if n
                 else "result: no threshold crossed (exit 0)")
    return "\n".join(lines)


def _ratio(m: Move) -> str:
    if not isinstance(m.baseline, (int, float)) or not isinstance(m.current, (int, float)) or m.metric not in NUMERIC:
        return ""
    return f" (x{m.current / max(m.baseline, RATIO_FLOOR):.3g})"


# ------------------------------------------------------------------------------------------------ storage
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text.replace("==", "-").replace(",", "+"))


def stored_path(case_doc: dict[str, Any], root: str | Path = DEFAULT_ROOT) -> Path:
    """Where `--save` stores a case document: keyed by case, spec hash, framework pins and stepdiff version."""
    import hashlib

    pins = "+".join(sorted(_slug(r["label"]) for r in case_doc["runs"])) or "no-runs"
    if len(pins) > 120:  # many pins: a readable head and a hash, within file-name limits
        pins = pins[:100] + "-" + hashlib.sha256(pins.encode()).hexdigest()[:12]
    return (Path(root) / _slug(case_doc["case"]) / case_doc["spec_hash"][:12] / pins
            / f"stepdiff-{_slug(case_doc['stepdiff_version'])}.json")


def save(doc: dict[str, Any], root: str | Path = DEFAULT_ROOT) -> list[Path]:
    """Store each case of a report; returns the paths written (an existing result under the same key is replaced)."""
    from stepdiff.reports.json_report import dumps

    paths = []
    for c in _cases(doc):
        p = stored_path(c, root)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(dumps(c))
        tmp.replace(p)
        paths.append(p)
    return paths


def load_baseline(path: str | Path, current: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The baseline document for `current`: a JSON report file, or a results folder (`--save`'s) searched for each
    current case by name and spec hash. Returns (document, where it came from)."""
    from stepdiff.reports.json_report import document, load

    p = Path(path)
    if p.is_file() or not p.exists():
        return load(p), str(p)
    found = []
    for c in _cases(current):
        d = p / _slug(c["case"]) / c["spec_hash"][:12]
        if not d.is_dir():
            older = sorted(x.name for x in (p / _slug(c["case"])).glob("*") if x.is_dir())
            hint = (f" (stored specs of this case: {', '.join(older)}; the spec changed)" if older
                    else " (no stored result of this case)")
            raise UsageError(f"baseline folder {p}: nothing stored for case {c['case']!r} with spec "
                             f"{c['spec_hash'][:12]}{hint}; fix: run with --save {p} first")
        candidates = sorted(d.glob("*/stepdiff-*.json"))
        if not candidates:
            raise UsageError(f"baseline folder {d}: no stored report; fix: run with --save {p} first")
        groups = sorted({x.parent.name for x in candidates})
        if len(groups) > 1:
            raise UsageError(f"baseline folder {d}: results of several framework sets ({', '.join(groups)}); fix: give "
                             "the file to compare with")
        found.append(_newest(candidates, current["stepdiff_version"]))
    docs = [load(f) for f in found]
    return (docs[0] if len(docs) == 1 else document(docs)), ", ".join(map(str, found))


def _newest(candidates: list[Path], version: str) -> Path:
    """The result stored by this stepdiff version if there is one, else the one of the highest version."""
    from packaging.version import InvalidVersion, Version

    def key(p: Path) -> tuple[int, Any, float]:
        v = p.stem.removeprefix("stepdiff-")
        try:
            return (v == _slug(version), Version(v), p.stat().st_mtime)
        except InvalidVersion:
            return (v == _slug(version), Version("0"), p.stat().st_mtime)

    return max(candidates, key=key)


def load_pair(baseline: str | Path, current: str | Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    from stepdiff.reports.json_report import load

    cur = load(current)
    base, where = load_baseline(baseline, cur)
    return base, cur, where


def dump_comparison(cmp: Comparison) -> str:
    """The comparison as JSON (for tools)."""
    return json.dumps({"exit_code": cmp.exit_code, "crossed": cmp.crossed, "fail": [t.text for t in cmp.terms],
                       "cases": [{"case": c.case, "spec_hash": c.spec_hash,
                                  "runs": [{"baseline": r.baseline, "current": r.current, "crossed": r.crossed,
                                            "moves": [{"metric": m.metric, "baseline": m.baseline,
                                                       "current": m.current, "crossed": m.crossed}
                                                      for m in r.moves]} for r in c.runs]} for c in cmp.cases]},
                      indent=1)
