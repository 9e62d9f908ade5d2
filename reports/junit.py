"""JUnit XML for CI systems that read it: one <testsuite> per case, one <testcase> per case x framework run.

diverge = <failure> whose message names the signature and the worst parameter; error = <error> carrying the
framework's own log tail; unsupported = <skipped> with the reason; agree = a passing test case with its numbers in
<system-out>. Rendered from the JSON document, so `stepdiff report` rebuilds it byte for byte.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .json_report import cases_of, document
from .terminal import detail, num


def failure_message(r: dict[str, Any]) -> str:
    """One line for a diverging run: the signature (what shape the error has), the worst parameter (where), then
    the reason (by how much, against which bound)."""
    parts = []
    if r["signature"]:
        parts.append(f"signature {r['signature']}: {r['signature_text']}")
    if r["token_signature"] and r["token_signature"] != "correct":
        parts.append(f"tokens {r['token_signature']}: {r['token_signature_text']}")
    worst = r["worst_parameter"]
    if worst:
        parts.append(f"worst parameter {worst['name']} (rel {num(worst['rel'])})")
    parts.append(r["reason"])
    return "; ".join(parts)


def build_document(doc: dict[str, Any]) -> ET.Element:
    root = ET.Element("testsuites", name="stepdiff")
    for c in cases_of(doc):
        runs = c["runs"]
        suite = ET.SubElement(root, "testsuite", name=c["case"], tests=str(len(runs)),
                              failures=str(sum(r["verdict"] == "diverge" for r in runs)),
                              errors=str(sum(r["verdict"] == "error" for r in runs)),
                              skipped=str(sum(r["verdict"] == "unsupported" for r in runs)),
                              time=f"{c['elapsed_s']:.3f}", timestamp=c["created"].rstrip("Z"))
        props = ET.SubElement(suite, "properties")
        for name, value in (("bound", c["bound_source"]), ("spec_hash", c["spec_hash"]),
                            ("stepdiff_version", c["stepdiff_version"])):
            ET.SubElement(props, "property", name=name, value=str(value))
        for r in runs:
            case = ET.SubElement(suite, "testcase", classname=f"stepdiff.{c['case']}", name=r["label"],
                                 time=f"{r['timings'].get('wall_s', 0.0):.3f}")
            text = "\n".join(detail(r))
            if r["verdict"] == "diverge":
                ET.SubElement(case, "failure", message=failure_message(r), type=r["signature"] or "diverge").text = text
            elif r["verdict"] == "error":
                ET.SubElement(case, "error", message=r["reason"], type="framework-error").text = text
            elif r["verdict"] == "unsupported":
                ET.SubElement(case, "skipped", message=r["reason"])
            else:
                ET.SubElement(case, "system-out").text = text
    return root


def build(results: list[Any]) -> ET.Element:
    return build_document(document(results))


def render_document(doc: dict[str, Any]) -> str:
    root = build_document(doc)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_document(doc: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(render_document(doc), encoding="utf-8")


def write(results: list[Any], path: str | Path) -> None:
    write_document(document(results), path)
