"""The benchmarks of `stepdiff bench` (stepdiff.harness.bench), one function each, run against one `Bench` (its
machine, rounds, work directory and results). See stepdiff.harness.bench for what each measures and its target."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .bench import BARE, DS_CASE, DS_PIN, FOUR_PINS, Bench, Result, import_profile, timed


def startup(bench: Bench) -> None:
    """Per worker: spawn to ready, imports by top-level package, set-up, first vs second request."""
    from .pool import WorkerKey, WorkerPool
    from .runner import _environment, parse_pin, worker_env
    from .spec import load, to_dict

    spec = load(bench.root / "cases" / "sft-four.toml")
    from . import envs
    from .model import write_init_weights

    init = write_init_weights(spec, envs.cache_root() / "init")
    targets: list[tuple[str, str, dict[str, str]]] = [("reference", sys.executable, {})]
    for pin in FOUR_PINS[: 1 if bench.quick else 4]:
        p = parse_pin(pin)
        bench.env_python(pin)
        env = _environment(p)
        targets.append((p.name, env.python, worker_env(env)))
    for name, python, extra in targets:
        with WorkerPool(bench.wd / f"startup-{name}") as pool:
            key = WorkerKey(name, python, 1, "cpu", tuple(sorted({**extra, "PYTHONPROFILEIMPORTTIME": "1"}
                                                                 .items())))
            t0 = time.perf_counter()
            pool.warm(key, 600)
            ready = time.perf_counter() - t0
            w = pool.workers()[0]
            pid = w.proc.pid if w.proc else 0
            cpu = [_cpu_s(pid)]
            setup = float((w.dir / "ready.0").read_text() or 0)
            runs = []
            for i in range(2):
                t1 = time.perf_counter()
                pool.submit(key, {"spec": to_dict(spec), "init": str(init),
                                  "out": str(bench.wd / f"startup-{name}-{i}")}, 600)
                runs.append(time.perf_counter() - t1)
                cpu.append(_cpu_s(pid))
            imports = import_profile(w.log.read_text(errors="replace"))
        top = sorted(imports.items(), key=lambda kv: -kv[1])
        ours = imports.get("stepdiff", 0.0)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in top[:4])
        cpu_first, cpu_second = cpu[1] - cpu[0], cpu[2] - cpu[1]
        bench.add(Result(f"startup[{name}]", "startup", cpu[0] + cpu_first, "cpu-s",
                        detail=f"CPU to ready {cpu[0]:.1f} s (imports {shown}; stepdiff's own {ours:.2f} s; "
                               f"adapter set-up {setup:.1f} s wall), first request {cpu_first:.1f} CPU-s, "
                               f"second {cpu_second:.2f} CPU-s; wall {ready:.1f} + {runs[0]:.1f} + {runs[1]:.1f} s",
                        extra={"spawn_to_ready_s": ready, "setup_s": setup, "first_request_s": runs[0],
                               "second_request_s": runs[1], "cpu_ready_s": cpu[0], "cpu_first_request_s": cpu_first,
                               "cpu_second_request_s": cpu_second, "imports_s": dict(top[:12]),
                               "stepdiff_imports_s": ours}))

def overhead(bench: Bench) -> None:
    for adapter, (script, case, pin, bare_args) in BARE.items():
        if bench.quick and adapter != "deepspeed":
            continue
        bare = bench.root / "bare" / script
        if not bare.exists():
            continue
        fw_python = bench.env_python(pin)
        ratios, cached, bare_s, sd_s, sdc_s = [], [], [], [], []
        bench.run(case, "-f", pin)  # warm the OS file cache and the reference cache (not measured)
        for _ in range(bench.rounds):
            b1 = timed([fw_python, str(bare), *bare_args], cwd=str(bare.parent))
            b2 = timed([sys.executable, str(bench.root / "bare" / "reference_step.py"), *bare_args],
                       cwd=str(bare.parent))
            if b1.rc or b2.rc:
                raise RuntimeError(f"bare scripts failed:\n{b1.out[-2000:]}\n{b2.out[-2000:]}")
            s, _ = bench.run(case, "-f", pin, "--no-cache")
            c, _ = bench.run(case, "-f", pin)
            base = b1.wall_s + b2.wall_s
            ratios.append(s.wall_s / base)
            cached.append(c.wall_s / base)
            bare_s.append((b1.wall_s, b2.wall_s))
            sd_s.append(s.wall_s)
            sdc_s.append(c.wall_s)
        med = statistics.median
        bench.add(Result(f"overhead[{pin}]", "overhead", med(ratios), "x", "<= 1.0", data=ratios,
                        detail=f"stepdiff run {med(sd_s):.1f} s / bare {adapter} {med(b[0] for b in bare_s):.1f} s"
                               f" + bare reference {med(b[1] for b in bare_s):.1f} s (reference cache off)",
                        extra={"stepdiff_s": sd_s, "bare_s": bare_s}))
        bench.add(Result(f"overhead-cached[{pin}]", "overhead", med(cached), "x", "<= 1.0", data=cached,
                        detail=f"stepdiff run {med(sdc_s):.1f} s with the reference cached / the same bare "
                               "scripts", extra={"stepdiff_s": sdc_s}))

def four(bench: Bench) -> None:
    four = bench.root / "cases" / "sft-four.toml"
    for pin in FOUR_PINS:
        bench.env_python(pin)
    n = 2 if bench.quick else 3
    more = [str(bench.case_file(four, f"sft-four-{i}", data__seed=1234 + i)) for i in range(1, n)]
    cold, warm, many, cpu = [], [], [], []
    for _ in range(bench.rounds):
        t1, rep1 = bench.run(str(four), "--no-cache")
        _check_agree(rep1)
        tn, repn = bench.run(str(four), *more, "--no-cache")
        cold.append(t1.wall_s)
        cpu.append(t1.cpu_s)
        warm.append(statistics.median(c["elapsed_s"] for c in repn["cases"][1:]))
        many.append(tn.wall_s / t1.wall_s)
    per_run = {r["label"]: round(r["timings"]["wall_s"], 1) for r in rep1["runs"]}
    bench.add(Result("four-frameworks[cold]", "four", statistics.median(cold), "s", "<= 30", data=cold,
                    detail="one SFT case, deepspeed + openrlhf + trl + verl + the reference, one command, "
                           f"fresh workers, reference cache off; CPU {statistics.median(cpu):.0f} s (all processes; "
                           f"/ {os.cpu_count()} cores = the idle-machine wall at best); per run {per_run}",
                    extra={"cpu_s": cpu}))
    bench.add(Result("four-frameworks[warm]", "four", statistics.median(warm), "s", data=warm,
                    detail="the same case with another data seed, next in the same command (warm workers)"))
    bench.add(Result(f"four-frameworks[{n} cases / 1]", "four", statistics.median(many), "x", data=many,
                    detail=f"{n} four-framework cases in one command / one"))

def cases(bench: Bench) -> None:
    bench.env_python(DS_PIN)
    n = 10
    files = [str(bench.case_file(DS_CASE, f"ds-{i}", data__seed=1234 + i)) for i in range(n)]
    ratios, one, ten = [], [], []
    for _ in range(bench.rounds):
        t1, _ = bench.run(files[0], "-f", DS_PIN, "--no-cache")
        tn, rep = bench.run(*files, "-f", DS_PIN, "--no-cache")
        if len(rep["cases"]) != n:
            raise RuntimeError("not every case ran")
        ratios.append(tn.wall_s / t1.wall_s)
        one.append(t1.wall_s)
        ten.append(tn.wall_s)
    bench.add(Result(f"cases[{n} x {DS_PIN}]", "cases", statistics.median(ratios), "x", "<= 3.0", data=ratios,
                    detail=f"{n} cases in one command {statistics.median(ten):.1f} s / one case "
                           f"{statistics.median(one):.1f} s (reference cache off)"))

def rerun(bench: Bench) -> None:
    """The re-run saves the reference worker (its start-up, float32 and float64 runs). With the reference and the
    framework running concurrently (default --jobs) the reference is off the critical path, so the saving shows
    in CPU time more than in wall time; --jobs 1 (one after the other) shows it in wall time too."""
    bench.env_python(DS_PIN)
    for jobs in (None, 1):
        ratios, cpu_ratios, first, second = [], [], [], []
        flags = ("--jobs", str(jobs)) if jobs else ()
        for i in range(bench.rounds):
            env = {"STEPDIFF_REFCACHE": str(bench.wd / f"refcache-{jobs}-{i}")}  # empty: the first run computes
            t1, _ = bench.run(DS_CASE, "-f", DS_PIN, *flags, env=env)
            t2, rep = bench.run(DS_CASE, "-f", DS_PIN, *flags, env=env)
            if not rep.get("reference_cached"):
                raise RuntimeError("the re-run did not use the cached reference")
            ratios.append(t2.wall_s / t1.wall_s)
            cpu_ratios.append(t2.cpu_s / t1.cpu_s)
            first.append(t1.wall_s)
            second.append(t2.wall_s)
        med = statistics.median
        how = "--jobs 1" if jobs else "default --jobs"
        bench.add(Result(f"rerun-cached[{DS_PIN}, {how}]", "rerun", med(ratios), "x", "<= 0.6", data=ratios,
                        detail=f"unchanged re-run {med(second):.1f} s (reference from the cache) / first run "
                               f"{med(first):.1f} s; CPU time {med(cpu_ratios):.2f}x",
                        extra={"cpu_ratio": cpu_ratios, "first_s": first, "second_s": second}))

def fuzz(bench: Bench) -> None:
    from .fuzz import PROFILES
    from .runner import parse_pin
    from .spec import load

    bench.env_python(DS_PIN)
    pin = parse_pin(DS_PIN)
    base = load(_bundled(DS_CASE))
    # a campaign of the `ci` fuzz profile's size (20 examples; `nightly` draws 300), its start-up included
    n_warm, n_cold = (6, 2) if bench.quick else (int(PROFILES["ci"]["max_examples"]), 3)
    specs = [base.replace(batch__grad_accum=1 + i % 4, batch__micro_batch_size=1 + i % 2, data__seed=i)
             for i in range(n_warm)]
    from .refcache import ReferenceCache

    Session = _session_class()
    off = ReferenceCache(enabled=False)  # worker reuse alone: every example computes its reference both ways
    warm_rates, cold_rates, ratios, steady_rates, steady_ratios, cpu_ratios = [], [], [], [], [], []
    for r in range(bench.rounds):
        t0, c0 = time.perf_counter(), _tree_cpu_s()
        each = []
        with Session(pin, bench.wd / f"fuzz-warm-{r}", cache=off) as s:
            verdicts = []
            for x in specs:
                t1 = time.perf_counter()
                verdicts.append(s.run(x).verdict)
                each.append(time.perf_counter() - t1)
        warm = n_warm / (time.perf_counter() - t0) * 60
        warm_cpu = (_tree_cpu_s() - c0) / n_warm  # the workers are reaped on close: their CPU is counted
        t0, c0 = time.perf_counter(), _tree_cpu_s()
        for i, x in enumerate(specs[:n_cold]):
            with Session(pin, bench.wd / f"fuzz-cold-{r}-{i}", cache=off) as s:
                verdicts.append(s.run(x).verdict)
        cold = n_cold / (time.perf_counter() - t0) * 60
        cold_cpu = (_tree_cpu_s() - c0) / n_cold
        if any(v != "agree" for v in verdicts):
            raise RuntimeError(f"fuzz examples did not agree: {verdicts}")
        warm_rates.append(warm)
        cold_rates.append(cold)
        ratios.append(warm / cold)
        steady = (n_warm - 1) / sum(each[1:]) * 60  # the pair's start-up (paid once per campaign) left out
        steady_rates.append(steady)
        steady_ratios.append(steady / cold)
        cpu_ratios.append(cold_cpu / max(warm_cpu, 1e-9))
    med = statistics.median
    bench.add(Result(f"fuzz[{DS_PIN}]", "fuzz", med(ratios), "x", ">= 8", data=ratios,
                    detail=f"{med(warm_rates):.1f} examples/min with one warm worker pair ({n_warm} examples, its "
                           f"start-up included) / {med(cold_rates):.1f} with one process per example; CPU per "
                           f"example {med(cpu_ratios):.1f}x less",
                    extra={"warm_per_min": warm_rates, "cold_per_min": cold_rates, "cpu_ratio": cpu_ratios}))
    bench.add(Result(f"fuzz-steady[{DS_PIN}]", "fuzz", med(steady_ratios), "x", data=steady_ratios,
                    detail=f"{med(steady_rates):.1f} examples/min once the pair is up (examples 2-{n_warm}) / "
                           f"{med(cold_rates):.1f} with one process per example (a campaign pays start-up once)",
                    extra={"steady_per_min": steady_rates}))

def scale(bench: Bench) -> None:
    from . import spec as S
    from .model import parameter_shapes

    bench.env_python(DS_PIN)
    sizes = {"tiny": {}, "~10M": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=8,
                                      num_heads=4, num_kv_heads=2),
             "~100M": dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_layers=12,
                           num_heads=12, num_kv_heads=4)}
    if bench.quick:
        sizes.pop("~100M")
    for label, shape in sizes.items():
        fields: dict[str, Any] = {f"model__{k}": v for k, v in shape.items()}
        fields.update(batch__grad_accum=2, deepspeed__offload_optimizer="none")
        path = bench.case_file(DS_CASE, f"scale-{label.strip('~')}", **fields)
        n_params = sum(_prod(s) for s in parameter_shapes(S.load(path)).values())
        t, rep = bench.run(str(path), "-f", DS_PIN, "--no-cache")
        _check_agree(rep)
        bench.add(Result(f"scale-model[{label}]", "scale", t.wall_s, "s", data=[t.wall_s],
                        detail=f"{n_params / 1e6:.2f}M parameters, deepspeed + reference: peak memory "
                               f"{t.peak_rss_mb:.0f} MB (largest process), CPU {t.cpu_s:.0f} s",
                        extra={"params": n_params, "peak_rss_mb": t.peak_rss_mb, "cpu_s": t.cpu_s}))
    four = bench.root / "cases" / "sft-four.toml"
    counts = (1, 2) if bench.quick else (1, 2, 4)
    for k in counts:
        pins = [a for p in FOUR_PINS[:k] for a in ("-f", p)]
        for p in FOUR_PINS[:k]:
            bench.env_python(p)
        t, rep = bench.run(str(four), *pins, "--no-cache")
        _check_agree(rep)
        bench.add(Result(f"scale-frameworks[{k}]", "scale", t.wall_s, "s", data=[t.wall_s],
                        detail=f"{' + '.join(FOUR_PINS[:k])} + reference: peak memory {t.peak_rss_mb:.0f} MB, "
                               f"CPU {t.cpu_s:.0f} s", extra={"peak_rss_mb": t.peak_rss_mb, "cpu_s": t.cpu_s}))

def engine(bench: Bench) -> None:
    import torch

    from .diff import dict_diff
    from .signatures import fit_weights

    g = torch.Generator().manual_seed(0)
    n_params = 2_000_000 if bench.quick else 10_000_000
    names = [f"p{i}" for i in range(8)]
    per = (n_params // len(names) // 64, 64)
    a = {n: torch.randn(per, generator=g) for n in names}
    b = {n: t + 1e-6 * torch.randn(per, generator=g) for n, t in a.items()}
    total = sum(t.numel() for t in a.values())

    def per_second(work: Callable[[], object]) -> tuple[list[float], list[float]]:
        """Parameters per wall second and per CPU second of `work`, one figure per round."""
        rates, cpu_rates = [], []
        for _ in range(bench.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            work()
            rates.append(total / (time.perf_counter() - t0))
            cpu_rates.append(total / max(time.process_time() - c0, 1e-9))
        return rates, cpu_rates

    rates, cpu_rates = per_second(lambda: dict_diff(a, b))
    bench.add(Result("engine[diff]", "engine", statistics.median(rates), "params/s", data=rates,
                    detail=f"dict_diff of {total / 1e6:.0f}M fp32 parameters (rel, max abs, cosine, per-parameter "
                           f"ranking), wall; {statistics.median(cpu_rates) / 1e6:.0f}M params per CPU-second",
                    extra={"cpu_params_per_s": cpu_rates}))
    contribs = [{n: torch.randn(per, generator=g) for n in names} for _ in range(4)]
    grad = {n: torch.stack([c[n] for c in contribs]).sum(0) for n in names}
    rates, cpu_rates = per_second(lambda: fit_weights(grad, contribs, [f"mb {i}" for i in range(4)]))
    bench.add(Result("engine[fit]", "engine", statistics.median(rates), "params/s", data=rates,
                    detail=f"micro-batch weight fit on 4 contributions of {total / 1e6:.0f}M parameters, wall; "
                           f"{statistics.median(cpu_rates) / 1e6:.0f}M params per CPU-second",
                    extra={"cpu_params_per_s": cpu_rates}))


def _tree_cpu_s() -> float:
    """User + system CPU of this process and every child it reaped."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _bundled(name: str) -> Path:
    from .cli import resolve_case

    return resolve_case(name)


def _session_class() -> Any:
    try:
        from .session import Session  # type: ignore[import-not-found]
    except ImportError:
        from .fuzz import Session  # type: ignore[attr-defined,no-redef]
    return Session


def _check_agree(report: dict[str, Any]) -> None:
    runs = report.get("runs", [])
    bad = [f"{r['label']}: {r['verdict']} ({r['reason'][:200]})" for r in runs if r["verdict"] != "agree"]
    if bad:
        raise RuntimeError("benchmark case did not agree: " + "; ".join(bad))


BENCHMARKS: dict[str, Callable[[Bench], None]] = {
    "startup": startup,
    "overhead": overhead,
    "four": four,
    "cases": cases,
    "rerun": rerun,
    "fuzz": fuzz,
    "scale": scale,
    "engine": engine,
}
