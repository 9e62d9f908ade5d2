"""The `stepdiff` command line. Heavy imports happen inside the verbs so `stepdiff --help` stays instant.

Exit codes: 0 all agree, 1 a divergence, 2 a framework error (crash, hang, NaN, incomplete record), 3 usage error
(bad case file, unknown framework, a version that does not install), 4 a knob a framework cannot honour.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

EXIT_USAGE = 3


def resolve_case(arg: str) -> Path:
    """A case file path, or the name of a bundled case (with or without .toml)."""
    p = Path(arg)
    if p.exists():
        return p
    from importlib.resources import files

    bundled = files("stepdiff.cases")
    for candidate in (arg, f"{arg}.toml"):
        f = bundled / candidate
        if f.is_file():
            return Path(str(f))
    names = sorted(x.name[:-5] for x in bundled.iterdir() if x.name.endswith(".toml"))
    raise UsageError(f"case {arg!r}: no such file and no bundled case of that name; bundled: {', '.join(names)}")


def bundled_cases() -> list[Path]:
    from importlib.resources import files

    return sorted(Path(str(x)) for x in files("stepdiff.cases").iterdir() if x.name.endswith(".toml"))


def cmd_run(args: argparse.Namespace) -> int:
    from stepdiff.reports.json_report import case_dict

    from . import outputs, progress
    from . import spec as S
    from .runner import parse_pin, run_case

    outputs.check_run_arguments(args)
    if args.wheelhouse:
        _use_wheelhouse(args.wheelhouse)
    case_docs = []
    for case_arg in args.case:
        spec = S.load(resolve_case(case_arg))
        if args.device:
            spec = spec.replace(run__device=args.device)
        if args.preset:
            spec = spec.replace(model__preset=args.preset)
        if args.timeout:
            spec = spec.replace(run__timeout_s=args.timeout)
        pins = args.framework or list(spec.case.frameworks)
        frameworks = [parse_pin(p) for p in pins]
        outputs.check_baseline(args, spec)
        with progress.display(quiet=args.quiet):
            result = run_case(spec, frameworks, workdir=Path(args.keep) / spec.case.name if args.keep else None)
        case_docs.append(case_dict(result))  # every report is rendered from this document
        outputs.print_case(args, case_docs[-1])
    return outputs.finish_run(args, case_docs)


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import adapter_names, get_adapter, knob_class

    rows: list[dict[str, Any]] = []
    for name in adapter_names():
        try:
            cls = get_adapter(name)
        except ImportError as e:
            rows.append({"name": name, "error": f"not available: {e}"})
            continue
        caps = cls.capabilities
        knobs = knob_class(name)
        rows.append({
            "name": name, "framework": caps.framework, "runs": caps.runs, "readouts": list(caps.readouts),
            "knobs": list(caps.knobs), "knob_defaults": _knob_defaults(knobs), "devices": list(caps.devices),
            "world_sizes": caps.world_sizes, "dtypes": list(caps.dtypes), "optimizers": list(caps.optimizers),
            "loss_kinds": list(caps.loss_kinds),
            "patches": [{"target": p.target, "change": p.change, "why": p.why} for p in caps.patches],
            "notes": list(caps.notes),
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        if "error" in r:
            print(f"{r['name']}: {r['error']}\n")
            continue
        print(f"{r['name']}  ({r['framework']})")
        print(f"  runs:       {r['runs']}")
        for ro in r["readouts"]:
            print(f"  read-out:   {ro}")
        print(f"  devices: {', '.join(r['devices'])}; world sizes: {r['world_sizes']}; dtypes: {', '.join(r['dtypes'])}"
              f"; optimizers: {', '.join(r['optimizers'])}; losses: {', '.join(r['loss_kinds'])}")
        if r["knobs"]:
            print(f"  knobs:      [{r['name']}] " + ", ".join(f"{k}={v!r}" for k, v in r["knob_defaults"].items()))
        for p in r["patches"]:
            print(f"  patch:      {p['target']}: {p['change']} ({p['why']})")
        for n in r["notes"]:
            print(f"  note:       {n}")
        print()
    return 0


def _knob_defaults(cls: Any) -> dict[str, Any]:
    import dataclasses

    if cls is None:
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls)}


def cmd_env(args: argparse.Namespace) -> int:
    from . import envs
    from .runner import parse_pin

    if args.env_cmd == "list":
        rows = envs.list_envs()
        if not rows:
            print(f"no environments under {envs.cache_root() / 'envs'}")
        for r in rows:
            v: dict[str, str] = r["versions"]  # type: ignore[assignment]
            keys = [k for k in ("torch", "transformers", "deepspeed", "openrlhf", "trl", "verl") if k in v]
            print(f"{r['name']:40s} {r['size_mb']:8.0f} MB  " + " ".join(f"{k}=={v[k]}" for k in keys)
                  + ("" if r["request"] else "  (incomplete build)"))
        return 0
    if getattr(args, "wheelhouse", None):
        _use_wheelhouse(args.wheelhouse)
    if args.env_cmd == "wheelhouse":
        return _cmd_wheelhouse(args)
    if args.env_cmd == "build":
        for pin in args.pins:
            fp = parse_pin(pin)
            env = envs.ensure(envs.request_for(fp.name, fp.version, fp.extra))
            state = "cached" if env.cached else f"built in {env.build_s:.1f} s"
            print(f"{env.name}: {state} at {env.path}")
        return 0
    removed = envs.remove_envs(args.pattern)
    print("\n".join(f"removed {r}" for r in removed) or "nothing to remove")
    return 0


def _use_wheelhouse(path: str) -> None:
    """Every environment this command builds installs from `path` alone (workers inherit the variable)."""
    import os

    from . import wheelhouse

    os.environ[wheelhouse.ENV_VAR] = str(Path(path).resolve())
    wheelhouse.configured()  # a directory that is no wheelhouse is a usage error now, not a build failure later


def _cmd_wheelhouse(args: argparse.Namespace) -> int:
    from . import envs, wheelhouse
    from .registry import get_adapter
    from .runner import parse_pin

    todo = []
    for pin_text in args.pins:
        fp = parse_pin(pin_text)
        req = envs.request_for(fp.name, fp.version, fp.extra)
        no_deps = [a for step in req.steps if "--no-deps" in step for a in step if not a.startswith("-")]
        with_deps = [a for step in req.steps if "--no-deps" not in step for a in step if not a.startswith("-")]
        get_adapter(fp.name)  # an unknown adapter is a usage error before any download
        todo.append((req.label, ["safetensors", *req.requirements, *with_deps], no_deps, dict(req.build_env)))
    have = wheelhouse.read_have(Path(args.have) if args.have else None)
    got = wheelhouse.gather(todo, Path(args.dir), args.python_version, args.platform,
                            args.torch or envs.host_torch_version(), have)
    size = sum(p.stat().st_size for p in Path(args.dir).glob("*.whl")) / 2**20
    for label, pins in got.environments.items():
        print(f"{label}: {len(pins)} distributions resolved for python {args.python_version} {args.platform}")
    print(f"wheelhouse {args.dir}: {len(list(Path(args.dir).glob('*.whl')))} wheels, {size:.1f} MB "
          f"({len(set(got.skipped))} left to the target: its torch stack and --have)")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import run_conformance
    from .runner import FrameworkPin, parse_pin

    failed = 0
    for pin_text in args.pins:
        pin = FrameworkPin("reference", None) if pin_text == "reference" else parse_pin(pin_text)
        print(f"conformance of {pin.label}:")
        for c in run_conformance(pin):
            mark = {True: "PASS", False: "FAIL", None: "n/a "}[c.passed]
            failed += c.passed is False
            print(f"  {mark}  {c.name:12s} {c.detail}")
    return 1 if failed else 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    from . import spec as S
    from .fuzz import DEFAULT_DATABASE, Progress, fuzz
    from .properties import get_property, property_names
    from .runner import parse_pin
    from .strategies import Limits, parse_fix

    if args.list_properties:
        for name in property_names():
            print(f"{name:14s} {get_property(name).summary}")
        return 0
    if not args.case:
        raise UsageError("stepdiff fuzz: give a CASE (a case file or bundled case name)")
    base = S.load(resolve_case(args.case))
    pins = args.framework or list(base.case.frameworks)
    if not pins:
        raise UsageError("no framework to fuzz: give --framework NAME==VERSION or list it in case.frameworks")
    vary = [v.strip() for item in args.vary or [] for v in item.split(",") if v.strip()]
    limits = Limits(max_world_size=args.max_world_size, max_grad_accum=args.max_grad_accum,
                    max_micro_batch=args.max_micro_batch, max_steps=args.max_steps)
    database = None if args.no_database else Path(args.database) if args.database else DEFAULT_DATABASE
    _interrupt_on_sigterm()  # a killed campaign still closes its workers
    campaigns = []
    for pin_text in pins:
        pin = parse_pin(pin_text)
        save: Path | None = None
        if args.save_case:
            save = Path(args.save_case)
            if len(pins) > 1:
                save = save.with_name(f"{save.stem}-{pin.label.replace('==', '-').replace(',', '+')}.toml")
        c = fuzz(base, pin, prop=args.property, vary=vary, fix=parse_fix(args.fix or []), limits=limits,
                 profile=args.profile, examples=args.examples, seed=args.seed, max_time=args.max_time,
                 database=database, save_case=save,
                 progress=Progress(pin.label, args.examples or (20 if args.profile == "ci" else 300)))
        campaigns.append(c)
        print(fuzz_summary(c), flush=True)
    if args.json:
        doc = {"case": base.case.name, "campaigns": [c.to_json() for c in campaigns]}
        Path(args.json).write_text(json.dumps(doc, indent=1))
    codes = {"agree": 0, "diverge": 1, "error": 2, "unsupported": 4}
    return max(codes[c.verdict] for c in campaigns)


def _interrupt_on_sigterm() -> None:
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def fuzz_summary(c: Any) -> str:
    """The terminal summary of one campaign."""
    from stepdiff.reports import terminal

    what = f"property {c.prop}" if c.prop else "the reference"
    counts = c.counts()
    apart = (f"; {counts.get('unsupported', 0)} unsupported and {counts.get('invalid', 0)} invalid draws counted "
             "apart" if counts.get("unsupported") or counts.get("invalid") else "")
    stop = f" ({c.stopped})" if c.stopped else ""
    if c.failing is None:
        if c.runs == 0:
            return f"{c.framework}: UNSUPPORTED - no drawn configuration could run{apart}"
        ok = "holds" if c.prop else "agrees with the reference"
        return f"{c.framework}: {what} {ok} on all {c.runs} configurations run{apart}{stop} ({c.elapsed_s:.0f} s)"
    lines = [f"{c.framework}: {c.failing.verdict.upper()} against {what} - minimal configuration after {c.runs} runs"
             f"{apart}{stop} ({c.elapsed_s:.0f} s):"]
    for k, v in c.changed.items():
        lines.append(f"  {k} = {json.dumps(v) if not isinstance(v, str) else v}")
    lines.append("  (every other dimension keeps the base case's value)")
    if c.failing.microbatch_tokens:
        lines.append(f"  supervised tokens per micro-batch (step 0): {c.failing.microbatch_tokens}")
    if c.outcome is not None:
        lines.append(f"  {c.outcome.reason}")
        for label, _ in c.outcome.variants:
            lines.append(f"    variant: {label}")
    if c.result is not None:
        lines.extend("  " + x for x in terminal.detail(c.result))
    if c.saved_case:
        lines.append(f"  case written: {c.saved_case}  (stepdiff run {c.saved_case})")
    if c.saved_report:
        lines.append(f"  report of the failing run: {c.saved_report}; stepdiff run gives: {c.reproduced}")
    return "\n".join(lines)


def cmd_bisect(args: argparse.Namespace) -> int:
    import time

    from . import spec as S
    from .bisection import bisect, list_releases, parse_target

    t0 = time.perf_counter()
    spec = S.load(resolve_case(args.case))
    if args.device:
        spec = spec.replace(run__device=args.device)
    target = parse_target(args.framework)
    releases = list_releases(target.package, args.from_version, args.to_version)
    held = ", ".join(x for x in ((f"{target.adapter}=={target.adapter_version}" if target.adapter_version else ""),
                                 *target.extra) if x)
    print(f"bisect {spec.case.name}: {len(releases)} {target.package} releases {releases[0]} .. {releases[-1]} from "
          f"pip's index{f' (held: {held})' if held else ''}", flush=True)
    result = bisect(spec, target, releases, find_fix=not args.no_fix)
    result.elapsed_s = time.perf_counter() - t0
    print(result.summary())
    print(f"{len(result.probes)} probes of {len(releases)} releases in {result.elapsed_s:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
    return 0 if result.start is not None else 2


def cmd_cases(args: argparse.Namespace) -> int:
    from . import spec as S

    for p in bundled_cases():
        s = S.load(p)
        print(f"{p.stem:40s} {', '.join(s.case.frameworks)}")
        if s.case.description:
            print(f"    {s.case.description.splitlines()[0]}")
    return 0


def cmd_spec_help(args: argparse.Namespace) -> int:
    from .spec import field_docs

    for name, default, text in field_docs():
        print(f"{name:32s} {default:22s} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from stepdiff import __version__

    from . import outputs

    ap = argparse.ArgumentParser(prog="stepdiff", description="Differential tester for LLM training frameworks: run "
                                 "the same seeded optimizer steps through real frameworks and a pure-PyTorch "
                                 "reference, and say where and how they diverge.",
                                 epilog="exit codes: 0 agree, 1 diverge, 2 framework error, 3 usage error, "
                                        "4 unsupported knob")
    ap.add_argument("--version", action="version", version=f"stepdiff {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run case(s) through frameworks and the reference, and compare")
    run.add_argument("case", nargs="+", help="case file path or bundled case name (see `stepdiff cases`)")
    run.add_argument("--framework", "-f", action="append", metavar="NAME==VERSION",
                     help="framework run (repeatable); default: the case's case.frameworks")
    run.add_argument("--json", metavar="PATH", help="write the JSON report ('-' for stdout; the terminal report then "
                     "goes to stderr)")
    run.add_argument("--junit", metavar="PATH", help="write a JUnit XML report (one testcase per framework run)")
    run.add_argument("--markdown", metavar="PATH", help="write a Markdown report, sized for a PR comment or "
                     "$GITHUB_STEP_SUMMARY ('-' for stdout)")
    run.add_argument("--device", choices=["cpu", "cuda"], help="override run.device")
    run.add_argument("--timeout", type=float, metavar="S", help="override run.timeout_s")
    run.add_argument("--preset", metavar="NAME", help="override model.preset (a real-size shape, e.g. llama-160m)")
    run.add_argument("--keep", metavar="DIR", help="keep records and worker logs under DIR")
    run.add_argument("--wheelhouse", metavar="DIR", help="build environments from this wheelhouse alone (no index)")
    outputs.add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    ls = sub.add_parser("list", help="adapters, the exact piece of each framework that runs, capabilities, patches")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    env = sub.add_parser("env", help="list, build or remove cached framework environments")
    env_sub = env.add_subparsers(dest="env_cmd", required=True)
    env_sub.add_parser("list")
    b = env_sub.add_parser("build")
    b.add_argument("pins", nargs="+", metavar="NAME==VERSION")
    b.add_argument("--wheelhouse", metavar="DIR", help="install from this wheelhouse alone (no index)")
    wh = env_sub.add_parser("wheelhouse", help="gather every wheel the pins' environments need, for an offline "
                                               "machine (run where an index is reachable)")
    wh.add_argument("pins", nargs="+", metavar="NAME==VERSION")
    wh.add_argument("--dir", required=True, help="the wheelhouse directory (created)")
    wh.add_argument("--python-version", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                    help="the target's python, e.g. 3.12 (default: this one)")
    wh.add_argument("--platform", default="x86_64-manylinux_2_28", help="the target platform (uv's name)")
    wh.add_argument("--torch", help="the target's torch version (default: this host's)")
    wh.add_argument("--have", metavar="FREEZE", help="a `pip freeze` of the target: what it has is left out")
    rm = env_sub.add_parser("remove")
    rm.add_argument("pattern", nargs="?", help="remove environments whose name contains this (default: all)")
    env.set_defaults(func=cmd_env)
    conf = sub.add_parser("conformance", help="run the adapter conformance kit against framework runs")
    conf.add_argument("pins", nargs="+", metavar="NAME==VERSION", help="framework pins, or 'reference'")
    conf.set_defaults(func=cmd_conformance)
    fz = sub.add_parser("fuzz", help="hypothesis search of whole configurations against the reference, or of a "
                        "metamorphic property; the minimal failure is written as a case file")
    fz.add_argument("case", nargs="?", help="base case: a case file or bundled case name")
    fz.add_argument("--framework", "-f", action="append", metavar="NAME==VERSION")
    fz.add_argument("--property", "-p", metavar="NAME", help="check a metamorphic property of the framework alone "
                    "(no reference); see --list-properties")
    fz.add_argument("--list-properties", action="store_true", help="list the properties and exit")
    fz.add_argument("--vary", action="append", metavar="FIELD,...", help="draw only these dimensions "
                    "(e.g. batch.grad_accum,deepspeed.offload_optimizer); default: all")
    fz.add_argument("--fix", action="append", metavar="FIELD[=VALUE]", help="pin a dimension (TOML value; without "
                    "a value: the base case's); repeatable")
    fz.add_argument("--profile", choices=["ci", "nightly"], default="ci",
                    help="ci: 20 examples, fixed seed; nightly: 300 examples, random (default ci)")
    fz.add_argument("--examples", type=int, help="configurations to run per framework (overrides the profile)")
    fz.add_argument("--seed", type=int, help="hypothesis seed (default: the profile's)")
    fz.add_argument("--max-time", type=float, metavar="S", help="stop drawing new configurations after S seconds")
    fz.add_argument("--save-case", metavar="PATH", help="where to write the minimal failing case "
                    "(default .stepdiff/cases/fuzz-CASE-FRAMEWORK[-PROPERTY].toml; its report is saved beside it)")
    fz.add_argument("--database", metavar="DIR", help="hypothesis example database (default .stepdiff/hypothesis)")
    fz.add_argument("--no-database", action="store_true", help="neither replay nor save failing examples")
    fz.add_argument("--max-world-size", type=int, default=2)
    fz.add_argument("--max-grad-accum", type=int, default=4)
    fz.add_argument("--max-micro-batch", type=int, default=3)
    fz.add_argument("--max-steps", type=int, default=4)
    fz.add_argument("--json", metavar="PATH", help="every drawn configuration, its verdict, error and signature")
    fz.set_defaults(func=cmd_fuzz)
    bi = sub.add_parser("bisect", help="find the release that introduced (and fixed) a divergence, from the numbers")
    bi.add_argument("case", help="case file or bundled case name")
    bi.add_argument("framework", help="adapter name (its package is bisected), or a version set with the bisected "
                    "package marked: 'trl==1.16.0,transformers==*'")
    bi.add_argument("--from", dest="from_version", metavar="V", help="oldest release to consider")
    bi.add_argument("--to", dest="to_version", metavar="V", help="newest release to consider")
    bi.add_argument("--no-fix", action="store_true", help="stop once the introducing release is found")
    bi.add_argument("--device", choices=["cpu", "cuda"], help="override run.device")
    bi.add_argument("--json", metavar="PATH", help="every probe and the result as JSON")
    bi.set_defaults(func=cmd_bisect)
    cases = sub.add_parser("cases", help="list the bundled cases")
    cases.set_defaults(func=cmd_cases)
    sh = sub.add_parser("spec-help", help="every case-file field with its default and meaning")
    sh.set_defaults(func=cmd_spec_help)
    outputs.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"stepdiff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
