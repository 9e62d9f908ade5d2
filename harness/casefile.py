"""Writing a fuzz finding as a complete case file that `stepdiff run` reproduces, with its report beside it.

The case holds every spec field (so a later change of a default cannot change what it runs), explicit samples, the
framework pin, and the finding in its description. After writing, the case is run through `stepdiff run`'s own code
path (`runner.run_case`) and that report is saved as `<name>.report.json` and `<name>.report.txt`: the proof that the
file reproduces the finding. For a property, the variant that diverges from the reference is the case; the other
variants are saved as `<name>.variant-N.toml`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import Sample, Spec, to_dict

if TYPE_CHECKING:
    from .fuzz import Campaign
    from .runner import CaseResult, FrameworkPin
    from .strategies import Space

SAMPLE_DEFAULTS = {f.name: to_dict(f.default) for f in dataclasses.fields(Sample)}


def case_name(case: str, pin_label: str, prop: str | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", pin_label.replace("==", "-").replace(",", "+"))
    return f"fuzz-{case}-{safe}" + (f"-{prop}" if prop else "")


def toml_text(spec: Spec, header: str = "") -> str:
    """The spec as TOML: every field, knob tables under the adapter's name, one line per sample (fields left at
    their defaults omitted)."""
    raw = to_dict(spec)
    knobs = raw.pop("knobs", {})
    samples = [{k: v for k, v in s.items() if v != SAMPLE_DEFAULTS[k]} for s in raw["data"].pop("samples")]
    raw.update(knobs)
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section, table in raw.items():
        out += ["", f"[{section}]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
        if section == "data" and samples:
            out.append("samples = [")
            out += [f"  {{ {', '.join(f'{k} = {_value(v)}' for k, v in smp.items())} }}," for smp in samples]
            out.append("]")
    return "\n".join(out).lstrip("\n") + "\n"


def _value(v: object) -> str:
    import json
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite number {v} in a case")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to a case file")


def write_case(spec: Spec, path: Path, header: str = "") -> Path:
    from . import spec as S

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(spec, header))
    again = S.load(path)
    if S.to_dict(again) != S.to_dict(spec):  # the file must run exactly what was found
        raise RuntimeError(f"internal: the case written to {path} does not load back to the same spec")
    return path


def _finding_text(c: Campaign, space: Space, spec: Spec) -> str:
    from .strategies import describe_samples, samples_change, spec_changes

    moved = spec_changes(space, spec)
    fields = ", ".join(f"{k}={v}" for k, v in moved.items()) or "none"
    if (samples := samples_change(space.base, spec)) is not None:
        fields += f"; samples: {samples}"
    what = (f"property {c.prop} broken: {c.outcome.reason}" if c.outcome is not None
            else f"{c.failing.verdict if c.failing else '?'}: {c.failing.reason if c.failing else ''}")
    sig = ""
    if c.result is not None and c.result.signature is not None:
        sig = f" Signature: {c.result.signature.name} ({c.result.signature.text})."
    return (f"Found by stepdiff fuzz on {c.framework} from case {c.case} after {c.runs} runs: {what}.{sig} "
            f"Fields changed from the base case: {fields}. Supervised tokens per micro-batch at step 0: "
            f"{describe_samples(spec)}.")


def save_finding(c: Campaign, base: Spec, pin: FrameworkPin, space: Space, path: Path | None, reproduce: bool,
                 say: Callable[[str], None], workdir: Path | None = None) -> None:
    """Write the campaign's minimal failure as a case (and variants), run it with `stepdiff run`'s code path, and
    save the report beside it. Fills c.spec, c.saved_case, c.saved_report, c.reproduced."""
    from .fuzz import RESULTS_DIR

    name = case_name(base.case.name, pin.label, c.prop)
    path = path or RESULTS_DIR / "cases" / f"{name}.toml"
    if path.suffix != ".toml":
        path = path.with_suffix(".toml")
    variants = [("", c.spec)] if c.outcome is None else list(c.outcome.variants)
    named = [(label, s.replace(case__name=name, case__frameworks=(pin.label,))) for label, s in variants if s]
    results: list[CaseResult | None] = [None] * len(named)
    primary = len(named) - 1
    if reproduce:
        from .runner import run_case

        for i, (label, s) in enumerate(named):
            say(f"stepdiff: re-running the minimal {'case' if not label else 'variant ' + repr(label)} with "
                "`stepdiff run`'s code path ...")
            results[i] = run_case(s, [pin], workdir=None if workdir is None else workdir / f"reproduce-{i}",
                                  log=lambda _m: None)
            if results[i] is not None and results[i].verdict in ("diverge", "error"):  # type: ignore[union-attr]
                primary = i
                break
    label, spec = named[primary]
    text = _finding_text(c, space, spec)
    if label:
        text += f" This file is the variant '{label}'."
    spec = spec.replace(case__description=text)
    header = (f"{text}\n\nReproduce: stepdiff run {path}\nWritten by stepdiff fuzz {base.case.name} -f {pin.label}"
              + (f" --property {c.prop}" if c.prop else "") + f" (profile {c.profile}, seed {c.seed})")
    c.saved_case = write_case(spec, path, header)
    c.spec = spec
    for j, (vlabel, vs) in enumerate(named):
        if j != primary:
            write_case(vs.replace(case__description=f"Variant '{vlabel}' of {path.name} (property {c.prop})."),
                       path.with_name(f"{path.stem}.variant-{j}.toml"),
                       f"Variant '{vlabel}' of the property finding in {path.name}.")
    result = results[primary]
    if result is not None:
        from stepdiff.reports import json_report, terminal

        result.spec = spec
        report = path.with_name(f"{path.stem}.report.json")
        json_report.write([result], report)
        path.with_name(f"{path.stem}.report.txt").write_text(terminal.render(result) + "\n")
        c.saved_report = report
        run = result.runs[0]
        c.reproduced = run.verdict + (f" ({run.signature.name})" if run.signature else "")
        if c.result is None:
            c.result = run

