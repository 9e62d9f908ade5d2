"""JUnit XML: one testsuite per case, one testcase per framework run (diverge = failure, error = error,
unsupported = skipped with the reason), for CI systems that read JUnit."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from stepdiff.harness.runner import CaseResult

from .terminal import detail


def build(results: list[CaseResult]) -> ET.Element:
    root = ET.Element("testsuites", name="stepdiff")
    for res in results:
        suite = ET.SubElement(root, "testsuite", name=res.case, tests=str(len(res.runs)),
                              failures=str(sum(r.verdict == "diverge" for r in res.runs)),
                              errors=str(sum(r.verdict == "error" for r in res.runs)),
                              skipped=str(sum(r.verdict == "unsupported" for r in res.runs)))
        for r in res.runs:
            case = ET.SubElement(suite, "testcase", classname=f"stepdiff.{res.case}", name=r.label,
                                 time=f"{r.timings.get('wall_s', 0.0):.3f}")
            text = "\n".join(detail(r))
            if r.verdict == "diverge":
                ET.SubElement(case, "failure", message=r.reason).text = text
            elif r.verdict == "error":
                ET.SubElement(case, "error", message=r.reason).text = text
            elif r.verdict == "unsupported":
                ET.SubElement(case, "skipped", message=r.reason)
            else:
                ET.SubElement(case, "system-out").text = text
    return root


def write(results: list[CaseResult], path: str | Path) -> None:
    tree = ET.ElementTree(build(results))
    ET.indent(tree)
    tree.write(str(path), encoding="utf-8", xml_declaration=True)
