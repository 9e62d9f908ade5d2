"""The `stepdiff` command line. Heavy imports happen inside the verbs so `stepdiff --help` stays instant.

Exit codes (stepdiff.harness.outcome, README "Exit codes"): 0 all agree, 1 a divergence, 2 a framework error (crash,
hang, NaN, incomplete record), 3 usage error (bad case file or arguments, unknown framework, a version that does not
install, an output path that cannot be written), 4 a knob a framework cannot honour, 5 an internal error of stepdiff
itself (one line; the traceback with --debug), 128 + N when stopped by signal N (130 SIGINT, 143 SIGTERM).
Everything the user gave is checked before any work starts: case files, pins, output paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from .errors import Interrupted, UsageError, one_line
from .outcome import EXIT_INTERNAL, EXIT_USAGE, exit_code, exit_code_for_signal, signal_name, worst_verdict

REPORT_TO = ("please report it to the stepdiff maintainers (the issue tracker of the repository you installed "
             "stepdiff from) with the command line and the output of the same command with --debug")


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


def check_output_file(path: str, flag: str) -> Path:
    """An output file the run will write at the end, checked now: a run must not fail after the work is done."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; fix: give a file path")
    if p.exists() and not p.is_file():
        raise UsageError(f"{flag} {path}: not a regular file; fix: give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {parent} does not exist; fix: create it or write elsewhere")
    try:  # really try: permission bits say nothing to root or on read-only mounts
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".stepdiff-probe-")
        os.close(fd)
        os.unlink(probe)
        if p.exists():
            with open(p, "ab"):
                pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be written ({e.strerror or e}); fix: write somewhere writable"
                         ) from None
    return p


def check_output_dir(path: str, flag: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a folder; fix: give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".stepdiff-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be created or written ({e.strerror or e}); fix: give a writable "
                         "folder") from None
    return p


def write_output(path: Path, flag: str, write: Callable[[Path], object]) -> None:
    """Write an output file atomically (a reader never sees half a report); a failure is a one-line usage error."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"{flag} {path}: could not be written ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def cmd_run(args: argparse.Namespace) -> int:
    from stepdiff.reports.json_report import case_dict

    from . import outputs, progress
    from . import spec as S
    from .refcache import ReferenceCache
    from .runner import parse_pin
    from .schedule import run_cases

    outputs.check_run_arguments(args)
    # everything the user gave is checked before any work starts: output paths, every case, every pin, baselines
    for flag in ("json", "junit", "markdown", "html"):
        value = getattr(args, flag, None)
        if value and value != "-":
            check_output_file(value, f"--{flag}")
    keep = check_output_dir(args.keep, "--keep") if args.keep else None
    if getattr(args, "save", None):
        check_output_dir(args.save, "--save")
    if args.wheelhouse:
        _use_wheelhouse(args.wheelhouse)
    plan = []
    for case_arg in args.case:
        spec = S.load(resolve_case(case_arg))
        if args.device:
            spec = spec.replace(run__device=args.device)
        if args.preset:
            spec = spec.replace(model__preset=args.preset)
        if args.timeout is not None:
            spec = spec.replace(run__timeout_s=args.timeout)
        if args.reference_timeout is not None:
            spec = spec.replace(run__reference_timeout_s=args.reference_timeout)
        pins = args.framework or list(spec.case.frameworks)
        frameworks = [parse_pin(p, "--framework" if args.framework else f"{case_arg}: case.frameworks")
                      for p in pins]
        if not frameworks:  # nothing would run: never an empty table with 'error (exit 2)' and no reason
            raise UsageError(f"case {case_arg}: no frameworks to run; fix: list them in case.frameworks (e.g. "
                             "frameworks = [\"deepspeed==0.19.8\"]) or give --framework NAME==VERSION")
        outputs.check_baseline(args, spec)
        plan.append((spec, frameworks))
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be >= 1; fix: give a positive number of concurrent workers")
    with progress.display(quiet=args.quiet):
        # cases run pipelined (their workers are shared); reports are printed once the live display has ended
        results = run_cases(plan, workdir=keep, jobs=args.jobs,
                            cache=ReferenceCache(enabled=False) if args.no_cache else None)
    case_docs = []
    for result in results:
        case_docs.append(case_dict(result))  # every report is rendered from this document
        outputs.print_case(args, case_docs[-1])
    try:
        code = outputs.finish_run(args, case_docs)
    except OSError as e:  # checked before the run, so only a disk that filled up or vanished gets here
        raise UsageError(f"the reports could not be written ({e.strerror or e}); fix: free or fix the output "
                         "location") from None
    if len(case_docs) > 1:  # each case printed its own verdict: say which one the exit code is
        worst = worst_verdict(r["verdict"] for c in case_docs for r in c["runs"])
        print(f"overall: {worst} over {len(case_docs)} cases (exit {code})", file=outputs.report_stream(args),
              flush=True)
    return code


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else []
    return bench_main(only, args.rounds, args.quick, args.benchmarks, Path(args.storage), not args.no_save,
                      args.compare, args.json)


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
            # JIT-compiled framework ops too, so no first run pays for them inside its timeout
            from .envops import ensure_ops
            from .registry import get_adapter

            for op, seconds in ensure_ops(env.path, env.python, env.name, get_adapter(fp.name).ops(fp.version)).items():
                print(f"{env.name}: compiled {op} in {seconds:.0f} s")
        return 0
    if args.pattern is None and not args.all or args.pattern is not None and not args.pattern.strip():
        raise UsageError("env remove: no pattern; fix: give part of the environments' names (see `stepdiff env list`),"
                         " or --all to remove every cached environment")
    if args.pattern is not None and args.all:
        raise UsageError("env remove: a pattern and --all; fix: give one of them")
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
    out_json = check_output_file(args.json, "--json") if args.json else None
    if args.save_case:  # checked before the search, not after hours of it (its folder is created, as it would be)
        save_parent = Path(args.save_case).parent
        check_output_dir(str(save_parent) if str(save_parent) else ".", "--save-case")
        check_output_file(args.save_case, "--save-case")
    base = S.load(resolve_case(args.case))
    pins = args.framework or list(base.case.frameworks)
    if not pins:
        raise UsageError("no framework to fuzz: give --framework NAME==VERSION or list it in case.frameworks")
    vary = [v.strip() for item in args.vary or [] for v in item.split(",") if v.strip()]
    limits = Limits(max_world_size=args.max_world_size, max_grad_accum=args.max_grad_accum,
                    max_micro_batch=args.max_micro_batch, max_steps=args.max_steps)
    database = None if args.no_database else Path(args.database) if args.database else DEFAULT_DATABASE
    campaigns = []
    for pin in [parse_pin(p) for p in pins]:  # every pin checked before the first campaign
        save: Path | None = None
        if args.save_case:
            save = Path(args.save_case)
            if len(pins) > 1:
                save = save.with_name(f"{save.stem}-{pin.label.replace('==', '-').replace(',', '+')}.toml")
        c = fuzz(base, pin, prop=args.property, vary=vary, fix=parse_fix(args.fix or []), limits=limits,
                 profile=args.profile, examples=args.examples, seed=args.seed, max_time=args.max_time,
                 database=database, save_case=save, max_shrink_time=args.max_shrink_time,
                 progress=Progress(pin.label, args.examples or (20 if args.profile == "ci" else 300)))
        campaigns.append(c)
        print(fuzz_summary(c), flush=True)
    if out_json:
        doc = json.dumps({"case": base.case.name, "campaigns": [c.to_json() for c in campaigns]}, indent=1)
        write_output(out_json, "--json", lambda p: p.write_text(doc))
    # SIGTERM/SIGINT are handled by main(): every worker killed, exit 128 + signal
    return exit_code(c.verdict for c in campaigns)


def fuzz_summary(c: Any) -> str:
    """The terminal summary of one campaign."""
    from stepdiff.reports import terminal

    what = f"property {c.prop}" if c.prop else "the reference"
    counts = c.counts()
    kinds = [f"{counts[k]} {k}" for k in ("unsupported", "invalid", "unjudged") if counts.get(k)]
    apart = f"; {', '.join(kinds)} draws counted apart" if kinds else ""
    stop = f" ({c.stopped})" if c.stopped else ""
    if c.failing is None:
        if c.runs == 0:
            return f"{c.framework}: UNSUPPORTED - no drawn configuration could run{apart}"
        ok = f"property {c.prop} holds" if c.prop else "agrees with the reference"
        return f"{c.framework}: {ok} on all {c.runs} configurations run{apart}{stop} ({c.elapsed_s:.0f} s)"
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
    for i in c.other_failures:
        other = c.examples[i]
        lines.append(f"  also seen (not shrunk): example #{i} {other.verdict.upper()}: {other.reason[:200]}")
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
    out_json = check_output_file(args.json, "--json") if args.json else None
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
    if out_json:
        doc = json.dumps(result.to_json(), indent=1)
        write_output(out_json, "--json", lambda p: p.write_text(doc))
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
    from .registry import adapter_names, knob_table
    from .spec import field_docs

    for name, default, text in field_docs():
        print(f"{name:32s} {default:22s} {text}")
    for adapter in adapter_names():  # the per-framework tables, from each adapter's knob dataclass
        rows = knob_table(adapter)
        if rows:
            print(f"\n[{adapter}]  knobs of the {adapter} adapter (a table named [{adapter}] in a case file)")
            for k in rows:
                print(f"  {k.name:24s} {k.type:34s} {k.default!r:12s} {k.doc}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with stepdiff's contract: a usage error is one line on stderr and exit 3 (argparse's own 2 is the
    framework-error code)."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.split(" ", 1)[1] + " " if " " in self.prog else ""
        print(f"stepdiff: error: {one_line(message)}; fix: see `stepdiff {sub}--help`", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def seconds(text: str) -> float:
    """A finite, positive number of seconds (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds above 0")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return v


def release(text: str) -> str:
    """A release number as pip's index spells them (PEP 440, argparse type)."""
    from packaging.version import InvalidVersion, Version

    try:
        Version(text)
    except InvalidVersion:
        raise argparse.ArgumentTypeError(f"{text!r} is not a release number (e.g. 0.19.0)") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from stepdiff import __version__

    from . import outputs

    ap = Parser(prog="stepdiff", description="Differential tester for LLM training frameworks: run "
                "the same seeded optimizer steps through real frameworks and a pure-PyTorch "
                "reference, and say where and how they diverge.",
                epilog="exit codes: 0 agree, 1 diverge, 2 framework error, 3 usage error, 4 unsupported knob, "
                       "5 internal error of stepdiff, 6 baseline regression (compare), 128+N stopped by signal N")
    ap.add_argument("--version", action="version", version=f"stepdiff {__version__}")
    ap.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    def verb(name: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, **kw)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return p

    run = verb("run", help="run case(s) through frameworks and the reference, and compare")
    run.add_argument("case", nargs="+", help="case file path or bundled case name (see `stepdiff cases`)")
    run.add_argument("--framework", "-f", action="append", metavar="NAME==VERSION",
                     help="framework run (repeatable); default: the case's case.frameworks")
    run.add_argument("--json", metavar="PATH", help="write the JSON report ('-' for stdout; the terminal report then "
                     "goes to stderr)")
    run.add_argument("--junit", metavar="PATH", help="write a JUnit XML report (one testcase per framework run)")
    run.add_argument("--markdown", metavar="PATH", help="write a Markdown report, sized for a PR comment or "
                     "$GITHUB_STEP_SUMMARY ('-' for stdout)")
    run.add_argument("--device", choices=["cpu", "cuda"], help="override run.device")
    run.add_argument("--timeout", type=seconds, metavar="S", help="override run.timeout_s (each framework run)")
    run.add_argument("--reference-timeout", type=seconds, metavar="S",
                     help="override run.reference_timeout_s (the reference run)")
    run.add_argument("--preset", metavar="NAME", help="override model.preset (a real-size shape, e.g. llama-160m)")
    run.add_argument("--keep", metavar="DIR", help="keep records and worker logs under DIR")
    run.add_argument("--wheelhouse", metavar="DIR", help="build environments from this wheelhouse alone (no index)")
    outputs.add_run_arguments(run)
    run.add_argument("--jobs", "-j", type=int, metavar="N",
                     help="workers running at once (a world-size-2 run counts 2); default: the cores, fewer when "
                          "memory is short")
    run.add_argument("--no-cache", action="store_true",
                     help="recompute the reference (and its float64 calibration) instead of reusing cached results")
    run.set_defaults(func=cmd_run)
    bench = verb("bench", help="measure stepdiff's own cost as ratios (needs a source checkout)")
    bench.add_argument("--only", metavar="NAME[,NAME]", help="startup, overhead, four, cases, rerun, fuzz, scale, "
                       "engine (default: all)")
    bench.add_argument("--rounds", type=int, default=3, help="measurements per benchmark (the median is reported)")
    bench.add_argument("--quick", action="store_true", help="fewer and smaller measurements (no ~100M model)")
    bench.add_argument("--json", metavar="PATH", help="also write the results here")
    bench.add_argument("--storage", default=".benchmarks", metavar="DIR",
                       help="where results are saved, pytest-benchmark style (default .benchmarks)")
    bench.add_argument("--no-save", action="store_true", help="do not save the results")
    bench.add_argument("--compare", nargs="?", const="", metavar="NNNN|PATH",
                       help="compare with a saved result (default: the latest)")
    bench.add_argument("--benchmarks", metavar="DIR", help="the benchmarks/ folder (default: the source checkout's)")
    bench.set_defaults(func=cmd_bench)
    ls = verb("list", help="adapters, the exact piece of each framework that runs, capabilities, patches")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    env = verb("env", help="list, build or remove cached framework environments")
    env_sub = env.add_subparsers(dest="env_cmd", required=True, parser_class=Parser)
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
    rm.add_argument("pattern", nargs="?", help="remove environments whose name contains this")
    rm.add_argument("--all", action="store_true", help="remove every cached environment (never the default: the cache "
                    "is shared by every stepdiff run on this machine)")
    env.set_defaults(func=cmd_env)
    conf = verb("conformance", help="run the adapter conformance kit against framework runs")
    conf.add_argument("pins", nargs="+", metavar="NAME==VERSION", help="framework pins, or 'reference'")
    conf.set_defaults(func=cmd_conformance)
    fz = verb("fuzz", help="hypothesis search of whole configurations against the reference, or of a "
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
    fz.add_argument("--examples", type=positive_int, help="configurations to run per framework (overrides the profile)")
    fz.add_argument("--seed", type=int, help="hypothesis seed (default: the profile's)")
    fz.add_argument("--max-time", type=seconds, metavar="S", help="stop running new configurations after S seconds "
                    "(searching and shrinking)")
    fz.add_argument("--max-shrink-time", type=seconds, default=3600.0, metavar="S",
                    help="time allowed for shrinking a failure (default 3600; hypothesis's own default is 300)")
    fz.add_argument("--save-case", metavar="PATH", help="where to write the minimal failing case "
                    "(default .stepdiff/cases/fuzz-CASE-FRAMEWORK[-PROPERTY].toml; its report is saved beside it)")
    fz.add_argument("--database", metavar="DIR", help="hypothesis example database (default .stepdiff/hypothesis)")
    fz.add_argument("--no-database", action="store_true", help="neither replay nor save failing examples")
    fz.add_argument("--max-world-size", type=positive_int, default=2)
    fz.add_argument("--max-grad-accum", type=positive_int, default=4)
    fz.add_argument("--max-micro-batch", type=positive_int, default=3)
    fz.add_argument("--max-steps", type=positive_int, default=4)
    fz.add_argument("--json", metavar="PATH", help="every drawn configuration, its verdict, error and signature")
    fz.set_defaults(func=cmd_fuzz)
    bi = verb("bisect", help="find the release that introduced (and fixed) a divergence, from the numbers")
    bi.add_argument("case", help="case file or bundled case name")
    bi.add_argument("framework", help="adapter name (its package is bisected), or a version set with the bisected "
                    "package marked: 'trl==1.16.0,transformers==*'")
    bi.add_argument("--from", dest="from_version", type=release, metavar="V", help="oldest release to consider")
    bi.add_argument("--to", dest="to_version", type=release, metavar="V", help="newest release to consider")
    bi.add_argument("--no-fix", action="store_true", help="stop once the introducing release is found")
    bi.add_argument("--device", choices=["cpu", "cuda"], help="override run.device")
    bi.add_argument("--json", metavar="PATH", help="every probe and the result as JSON")
    bi.set_defaults(func=cmd_bisect)
    cases = verb("cases", help="list the bundled cases")
    cases.set_defaults(func=cmd_cases)
    sh = verb("spec-help", help="every case-file field with its default and meaning")
    sh.set_defaults(func=cmd_spec_help)
    outputs.add_parsers(sub)
    return ap


STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise Interrupted in the main thread: the stack unwinds through every `finally`
    (workers killed, temporary directories removed) and main() exits 128 + the signal's number."""
    from .workers import stop_all

    def handler(signum: int, frame: object) -> None:
        for s in STOP_SIGNALS:  # cleanup is short and must not be interrupted half-way by a second signal
            signal.signal(s, signal.SIG_IGN)
        # kill every worker right now (no graceful shutdown of a run that may hang), then unwind: every `finally`
        # removes its temporary directory on the way up
        raise Interrupted(signum, stopped=stop_all())

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread (main() called from a thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _where(exc: BaseException) -> str:
    """Where it failed: the innermost frame, and the innermost stepdiff frame that led there when that differs."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"

    def short(f: traceback.FrameSummary) -> str:
        return f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} in {f.name}"

    roots = tuple(str(Path(__file__).resolve().parent.parent) + d for d in ("/harness/", "/adapters/", "/reports/"))
    ours = [f for f in frames if str(Path(f.filename).resolve()).startswith(roots) or "/stepdiff/" in f.filename]
    where = short(frames[-1])
    if ours and ours[-1] is not frames[-1]:
        where += f", from {short(ours[-1])}"
    return where


def console_main() -> None:
    """The `stepdiff` console script and `python -m stepdiff`: main(), then leave without the interpreter's teardown,
    which takes ~0.4 s once torch is imported, at the end of every command (by then every report file is closed,
    every worker is gone and every temporary directory removed; only the standard streams need a flush)."""
    code = main()
    with contextlib.suppress(OSError, ValueError):  # a reader that closed the pipe, a stream already closed
        sys.stdout.flush()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in raw
    from .workers import stop_all

    try:
        with stop_on_signals():
            args = build_parser().parse_args(raw)
            return int(args.func(args))
    except UsageError as e:
        print(f"stepdiff: error: {one_line(e, 600)}", file=sys.stderr)
        return EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Interrupted) else int(signal.SIGINT)
        stopped = (e.stopped if isinstance(e, Interrupted) else []) + stop_all()
        where = f" during {e.where}" if isinstance(e, Interrupted) and e.where else ""
        which = f" ({'; '.join(stopped)})" if stopped else ""
        print(f"stepdiff: interrupted by {signal_name(signum)}{where}: no verdict; every worker stopped{which}, "
              "temporary files removed", file=sys.stderr, flush=True)
        return exit_code_for_signal(signum)
    except BrokenPipeError:  # stdout closed by the reader (`stepdiff list | head`): not an error of stepdiff
        with contextlib.suppress(OSError):
            sys.stderr.close()
        return exit_code_for_signal(signal.SIGPIPE)
    except Exception as e:  # noqa: BLE001 - the contract: an internal failure has its own code, never 0 or 1
        stop_all()
        if debug:
            traceback.print_exc()
        print(f"stepdiff: internal error: {type(e).__name__}: {one_line(e, 300)} (at {_where(e)}); this is a bug in "
              f"stepdiff, not a verdict on any framework; {REPORT_TO}"
              + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr, flush=True)
        return EXIT_INTERNAL
