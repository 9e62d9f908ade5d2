"""What the CLI does with results: print and write the reports, store them, gate on a baseline; and the `report` and
`compare` verbs. Every report is rendered from the JSON document, so `stepdiff report RESULT.json` rebuilds exactly
what the run wrote.

stdout carries only the terminal report (or, with `--json -`, only the JSON: the terminal report then goes to
stderr); progress and log records go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from .errors import UsageError

PRECEDENCE = (2, 6, 1, 4, 0)
"""Exit codes of `run --compare`, most important first: error, baseline regression, diverge, unsupported, agree."""


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The report, storage and baseline flags of `stepdiff run`."""
    from .baseline import DEFAULT_FAIL, DEFAULT_ROOT

    run.add_argument("--html", metavar="PATH", help="write the self-contained HTML report (opens offline)")
    run.add_argument("--save", nargs="?", const=str(DEFAULT_ROOT), metavar="DIR",
                     help=f"store the JSON result under DIR (default {DEFAULT_ROOT}), keyed by case, spec hash, "
                          "framework pins and stepdiff version")
    run.add_argument("--compare", metavar="BASELINE",
                     help="compare with a baseline (a JSON report, or a --save folder) and fail (exit 6) when a "
                          "--fail threshold is crossed")
    run.add_argument("--fail", metavar="EXPR", default=None,
                     help=f"thresholds for --compare (default {DEFAULT_FAIL!r}; see `stepdiff compare --help`)")
    run.add_argument("--quiet", "-q", action="store_true",
                     help="plain one-line progress records instead of the live display")


def add_parsers(sub: Any) -> None:
    """The `report` and `compare` verbs."""
    from .baseline import DEFAULT_FAIL

    rep = sub.add_parser("report", help="rebuild the terminal, Markdown, JUnit and HTML reports from a JSON report",
                         description="Rebuild reports from a stored JSON report alone; each is identical to the one "
                                     "the run wrote. Prints the terminal report unless --quiet.")
    rep.add_argument("result", metavar="RESULT.json")
    rep.add_argument("--html", metavar="PATH", help="write the HTML report")
    rep.add_argument("--markdown", metavar="PATH", help="write the Markdown report ('-' for stdout)")
    rep.add_argument("--junit", metavar="PATH", help="write the JUnit XML report")
    rep.add_argument("--quiet", "-q", action="store_true", help="do not print the terminal report")
    rep.set_defaults(func=cmd_report)
    from . import baseline

    cmp = sub.add_parser("compare", help="compare a result with a baseline; exit 6 when a threshold is crossed",
                         description="Compare CURRENT with BASELINE (JSON reports; BASELINE may be a --save folder) "
                                     "and print what moved. Exit 0 when no --fail threshold is crossed, 6 when one "
                                     "is, 3 when the two ran different specs.",
                         epilog=baseline.DSL_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmp.add_argument("baseline", metavar="BASELINE")
    cmp.add_argument("current", metavar="CURRENT")
    cmp.add_argument("--fail", metavar="EXPR", default=DEFAULT_FAIL,
                     help=f"comma-separated failure conditions (default {DEFAULT_FAIL!r})")
    cmp.add_argument("--json", metavar="PATH", help="also write the comparison as JSON ('-' for stdout)")
    cmp.set_defaults(func=cmd_compare)


def check_run_arguments(args: argparse.Namespace) -> None:
    """Usage errors before any work starts: two outputs on stdout, a bad --fail expression, --fail alone."""
    dashes = [o for o in ("json", "markdown", "junit", "html") if getattr(args, o, None) == "-"]
    if len(dashes) > 1:
        raise UsageError(f"--{dashes[0]} - and --{dashes[1]} -: only one report can go to stdout; fix: give the "
                         "other a file path")
    if dashes and dashes[0] in ("junit", "html"):
        raise UsageError(f"--{dashes[0]} -: write it to a file; fix: give a path")
    if getattr(args, "fail", None) is not None and not getattr(args, "compare", None):
        raise UsageError("--fail without --compare: fix: add --compare BASELINE (a JSON report or a --save folder)")
    if getattr(args, "compare", None):
        from .baseline import DEFAULT_FAIL, parse_fail

        parse_fail(args.fail or DEFAULT_FAIL)
        if not Path(args.compare).exists():
            raise UsageError(f"--compare {args.compare}: no such file or folder; fix: give a JSON report or a folder "
                             "written by --save")


def check_baseline(args: argparse.Namespace, spec: Any) -> None:
    """Before running: the baseline must hold this case's spec (a changed spec is a usage error, found before the
    frameworks run rather than after)."""
    if not getattr(args, "compare", None):
        return
    from stepdiff import __version__
    from stepdiff.reports.json_report import spec_hash

    from . import baseline
    from .spec import to_dict

    d = to_dict(spec)
    probe = {"case": spec.case.name, "spec_hash": spec_hash(d), "spec": d, "stepdiff_version": __version__,
             "runs": []}
    base, _ = baseline.load_baseline(args.compare, probe)
    baseline.check_same_work(base, probe)


def report_stream(args: argparse.Namespace) -> TextIO:
    """Where the terminal report goes: stdout, unless stdout carries the JSON or Markdown."""
    return sys.stderr if "-" in (getattr(args, "json", None), getattr(args, "markdown", None)) else sys.stdout


def print_case(args: argparse.Namespace, case_doc: dict[str, Any]) -> None:
    from stepdiff.reports import terminal

    print(terminal.render(case_doc), file=report_stream(args), flush=True)


def write_reports(doc: dict[str, Any], json_path: str | None = None, markdown_path: str | None = None,
                  junit_path: str | None = None, html_path: str | None = None) -> None:
    from stepdiff.reports import json_report, junit, markdown

    if junit_path:
        junit.write_document(doc, junit_path)
    if markdown_path:
        text = markdown.render_document(doc)
        if markdown_path == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            Path(markdown_path).write_text(text, encoding="utf-8")
    if html_path:
        from stepdiff.reports import html

        html.write_document(doc, html_path)
    if json_path:
        if json_path == "-":
            sys.stdout.write(json_report.dumps(doc) + "\n")
            sys.stdout.flush()
        else:
            json_report.write(doc, json_path)


def finish_run(args: argparse.Namespace, case_docs: list[dict[str, Any]]) -> int:
    """After `stepdiff run`: write the reports, store the result, gate on the baseline. Returns the exit code."""
    from stepdiff.reports import json_report

    from . import baseline, progress

    doc = json_report.document(case_docs)
    write_reports(doc, args.json, args.markdown, args.junit, getattr(args, "html", None))
    if getattr(args, "save", None):
        for p in baseline.save(doc, args.save):
            progress.log(f"saved {p}")
    code = int(doc["exit_code"])
    if getattr(args, "compare", None):
        base, where = baseline.load_baseline(args.compare, doc)
        cmp = baseline.compare_documents(base, doc, baseline.parse_fail(args.fail or baseline.DEFAULT_FAIL))
        cmp.baseline_path = where
        print(baseline.render(cmp), file=report_stream(args), flush=True)
        code = min((code, cmp.exit_code), key=PRECEDENCE.index)
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from stepdiff.reports import json_report, terminal

    if args.html == "-" or args.junit == "-":
        raise UsageError("--html/--junit -: write it to a file; fix: give a path")
    doc = json_report.load(args.result)
    if not args.quiet and args.markdown != "-":
        sys.stdout.write(terminal.render_document(doc))
        sys.stdout.flush()
    write_reports(doc, None, args.markdown, args.junit, args.html)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import baseline

    terms = baseline.parse_fail(args.fail)
    base, cur, where = baseline.load_pair(args.baseline, args.current)
    cmp = baseline.compare_documents(base, cur, terms)
    cmp.baseline_path = where
    out = sys.stderr if args.json == "-" else sys.stdout
    print(baseline.render(cmp), file=out, flush=True)
    if args.json:
        text = baseline.dump_comparison(cmp)
        if args.json == "-":
            print(text, flush=True)
        else:
            Path(args.json).write_text(text)
    return cmp.exit_code
