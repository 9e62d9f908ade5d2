"""Hostile input: generated malformed case files and pins never crash, hang or pass when they cannot be honoured.

Properties (hypothesis), each input under a time budget:
- the loader either accepts a case file (and then every number is finite, the name is a plain file name, every pin is
  NAME==VERSION) or refuses it with ONE line that names the field and the fix (a UsageError); any other exception is a
  traceback and fails the test, and so does an input that takes longer than its budget (a hang);
- the same through the real command line: exit 3, one `stepdiff: error:` line, no traceback;
- pins from the command line and case files alike: a name and a version specifier, nothing else reaches the installer.

The figures (inputs tried, one-line errors, accepted, tracebacks, hangs) are printed at the end of each property.
The default suite runs a modest number of examples; `pytest -m slow` runs the big ones.
"""

from __future__ import annotations

import copy
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stepdiff.harness import pins as P
from stepdiff.harness import spec as S
from stepdiff.harness.errors import UsageError
from stepdiff.harness.registry import adapter_names
from stepdiff.harness.safepath import component

BUDGET_S = 3.0
"""Per-input time budget of the loader (a valid case loads in milliseconds)."""

BASE: dict[str, Any] = {"case": {"name": "hostile", "frameworks": ["faults"]}, "batch": {"grad_accum": 2},
                        "faults": {"mode": "none"}}
FIELDS = [name for name, _, _ in S.field_docs()] + ["faults.mode", "faults.scale", "deepspeed.zero_stage",
                                                    "knobs.deepspeed.zero_stage", "knobs", "faults", "deepspeed",
                                                    "case", "model", "nosuch.section", "batch.nosuch",
                                                    "data.samples", "data.samples[0].prompt", "case.frameworks"]

PINS = ["deepspeed==0.19.8,--index-url==http://evil.example/simple", "deepspeed==0.19.8 --extra-index-url x",
        "deepspeed @ https://evil.example/ds.whl", "deepspeed==0.19.8; python_version < '4'", "deepspeed[all]==0.19.8",
        "trl==1.16.0,deepspeed @ file:///etc/passwd", "-e .", "--find-links=/tmp", "deepspeed===0.19.8",
        "trl==1.16.0,torch==2.0.0", "deepspeed==0.19.*", "deepspeed>=0.19", "../../etc==1", "deepspeed==0.19.8\nx",
        "deepspeed==", "faults==1,faults==1", "x" * 500]

HOSTILE_VALUES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, -1, 0, 2**31, 2**63 - 1, 10**30, -(10**30), "",
                     "../../x", "/etc/passwd", "a/b", "..", ".hidden", "nul\x00byte", "\u202eevil", "x" * 20000,
                     True, False, [], [[[[[[[[1]]]]]]]], {"a": 1}, {"": {}}, [{"prompt": [5], "response": []}],
                     [{"prompt": [5], "response": [2**40]}], {"samples": 5}, *PINS, [*PINS]]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=40),
    st.lists(st.integers(min_value=-5, max_value=300), max_size=6),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path (with [i] list steps), replacing whatever stands in the way."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    cur: Any = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.startswith("["):
            idx = int(part[1:-1])
            if not isinstance(cur, list):
                return
            while len(cur) <= idx:
                cur.append({})
            if last:
                cur[idx] = value
            else:
                if not isinstance(cur[idx], (dict, list)):
                    cur[idx] = {} if not parts[i + 1].startswith("[") else []
                cur = cur[idx]
        else:
            if not isinstance(cur, dict):
                return
            if last:
                cur[part] = value
            else:
                nxt = cur.get(part)
                if not isinstance(nxt, (dict, list)):
                    cur[part] = [] if parts[i + 1].startswith("[") else {}
                cur = cur[part]


@st.composite
def malformed_case(draw: Any) -> bytes:
    """A case file: the base case with hostile values at random fields, then maybe a byte-level corruption."""
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        _set(doc, draw(st.sampled_from(FIELDS)), draw(HOSTILE_VALUES))
    try:
        text = tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):
        text = b"[case]\nname = 1\n"
    how = draw(st.sampled_from(["as-is", "as-is", "truncate", "bytes", "invalid-utf8", "deep", "garbage",
                                "duplicate", "table-as-value"]))
    if how == "truncate":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif how == "bytes":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
    elif how == "invalid-utf8":
        text = text + b'\n[case]\ndescription = "\xff\xfe\xc3"\n'
    elif how == "deep":
        n = draw(st.integers(7, 5000))
        text = text + b"\nnested = " + b"[" * n + b"]" * n + b"\n"
    elif how == "garbage":
        text = draw(st.binary(max_size=200))
    elif how == "duplicate":
        text = text + b"\n[knobs.faults]\nmode = \"none\"\n"
    elif how == "table-as-value":
        text = text.replace(b"[faults]", b"faults = 5\n[x_faults]")
    return text


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def judge_load(path: Path, figures: Counter[str], failures: list[str]) -> S.Spec | None:
    """Load one case file under the time budget; count and check the outcome."""
    figures["tried"] += 1
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, BUDGET_S)
    t0 = time.perf_counter()
    try:
        spec = S.load(path)
    except Hang:
        figures["hangs"] += 1
        failures.append(f"hang (> {BUDGET_S} s): {path.read_bytes()[:200]!r}")
        return None
    except UsageError as e:
        msg = str(e)
        if "\n" in msg or "fix:" not in msg or len(msg) > 1000:
            figures["bad messages"] += 1
            failures.append(f"not one line with a fix: {msg[:300]!r}")
        else:
            figures["one-line errors"] += 1
        return None
    except BaseException as e:  # noqa: BLE001 - anything else is a traceback the user would see
        figures["tracebacks"] += 1
        failures.append(f"traceback {type(e).__name__}: {e!s:.200} for {path.read_bytes()[:200]!r}\n"
                        + "".join(traceback.format_exc(limit=-3)))
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        figures["max_ms"] = max(figures["max_ms"], int(1000 * (time.perf_counter() - t0)))
    figures["accepted"] += 1
    raw = S.to_dict(spec)
    if not _finite(raw):
        failures.append(f"accepted a non-finite number: {raw}")
    if component(spec.case.name) != spec.case.name.replace(" ", "_") and "/" in spec.case.name:
        failures.append(f"accepted a name that escapes its folder: {spec.case.name!r}")
    for pin in spec.case.frameworks:
        try:
            P.parse(pin, adapter_names())
        except UsageError as e:
            failures.append(f"accepted a bad pin {pin!r}: {e}")
    return spec


def run_property(examples: int, check: Callable[[bytes, Path], None]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "case.toml"

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(malformed_case())
        def prop(text: bytes) -> None:
            path.write_bytes(text)
            check(text, path)

        prop()


def report(title: str, figures: Counter[str], capsys: pytest.CaptureFixture[str]) -> None:
    shown = ", ".join(f"{k} {figures[k]}" for k in ("tried", "one-line errors", "accepted", "tracebacks", "hangs",
                                                    "bad messages"))
    with capsys.disabled():
        print(f"\n{title}: {shown} (slowest {figures['max_ms']} ms, budget {BUDGET_S:.0f} s per input)")


def loader_property(examples: int, capsys: pytest.CaptureFixture[str]) -> None:
    figures: Counter[str] = Counter()
    failures: list[str] = []
    run_property(examples, lambda text, path: judge_load(path, figures, failures) and None)
    report("hostile case files through the loader", figures, capsys)
    assert not failures, "\n".join(failures[:5])
    assert figures["tracebacks"] == 0 and figures["hangs"] == 0
    assert figures["one-line errors"] > figures["tried"] // 2  # the generator really produces malformed input


def test_malformed_case_files_through_the_loader(capsys: pytest.CaptureFixture[str]) -> None:
    loader_property(400, capsys)


@pytest.mark.slow
def test_malformed_case_files_through_the_loader_many(capsys: pytest.CaptureFixture[str]) -> None:
    loader_property(5000, capsys)


def cli_property(examples: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Rejected case files through the real command line: exit 3, one line, no traceback, within the budget."""
    figures: Counter[str] = Counter()
    failures: list[str] = []

    def check(text: bytes, path: Path) -> None:
        inner: list[str] = []
        spec = judge_load(path, Counter(), inner)
        assume(spec is None and not inner)  # accepted cases would start a real run: the loader property covers them
        figures["tried"] += 1
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-m", "stepdiff", "run", str(path)], capture_output=True,
                                 text=True, timeout=120, errors="replace")
        except subprocess.TimeoutExpired:
            figures["hangs"] += 1
            failures.append(f"CLI hang: {text[:200]!r}")
            return
        figures["max_ms"] = max(figures["max_ms"], int(1000 * (time.perf_counter() - t0)))
        lines = out.stderr.strip().splitlines()
        if "Traceback" in out.stderr:
            figures["tracebacks"] += 1
            failures.append(f"CLI traceback (exit {out.returncode}): {out.stderr[-800:]}")
        elif out.returncode != 3 or len(lines) != 1 or not lines[0].startswith("stepdiff: error: "):
            figures["bad messages"] += 1
            failures.append(f"CLI exit {out.returncode}, stderr {out.stderr[-400:]!r} for {text[:200]!r}")
        else:
            figures["one-line errors"] += 1

    run_property(examples, check)
    report("hostile case files through `stepdiff run`", figures, capsys)
    assert not failures, "\n".join(failures[:5])
    assert figures["tried"] >= examples // 3


def test_malformed_case_files_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    cli_property(12, capsys)


@pytest.mark.slow
def test_malformed_case_files_through_the_cli_many(capsys: pytest.CaptureFixture[str]) -> None:
    cli_property(150, capsys)


SAFE_PIECE = re.compile(r"^[a-z0-9][a-z0-9._-]*((==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+"
                        r"(,(==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+)*)?$")

PIN_FRAGMENTS = st.sampled_from(["deepspeed", "trl", "faults", "verl", "openrlhf", "transformers", "torch", "DeepSpeed",
                                 "deep_speed", "==", ">=", "<", "~=", "===", "!=", "0.19.8", "1.16.0", "1.*", ",",
                                 " ", ";", "@", "[", "]", "extra", "--index-url", "-e", "http://x/y", "file:///z",
                                 "python_version<'3'", "\n", "\x00", "..", "/", "'", '"', "$(id)", "`id`", "é"])


@given(st.one_of(st.lists(PIN_FRAGMENTS, min_size=1, max_size=8).map("".join), st.text(max_size=30),
                 st.sampled_from(PINS)))
@settings(max_examples=500, deadline=None, database=None, derandomize=True)
def test_pins_are_name_and_specifier_or_a_one_line_error(pin: str) -> None:
    """Whatever the text, a pin is refused in one line, or everything it passes on is `name[specifier]`."""
    try:
        fp = P.parse(pin, adapter_names())
    except UsageError as e:
        assert "\n" not in str(e) and "fix:" in str(e)
        return
    assert fp.name in adapter_names() and fp.name != "reference"
    assert fp.version is None or re.fullmatch(r"[A-Za-z0-9.+!_-]+", fp.version)
    for piece in fp.extra:
        assert SAFE_PIECE.match(piece), piece
        assert not piece.startswith("torch")


@pytest.mark.parametrize("pin", PINS[:9])
def test_pins_that_change_the_install_are_refused_from_cli_and_case_files(tmp_path: Path, pin: str) -> None:
    case = tmp_path / "c.toml"
    case.write_text(tomli_w.dumps({"case": {"name": "pins", "frameworks": [pin]}}))
    with pytest.raises(UsageError) as e:
        S.load(case)
    assert str(e.value).startswith("case.frameworks[0] = ")
    with pytest.raises(UsageError) as e2:
        P.parse(pin, adapter_names())
    assert "\n" not in str(e2.value)
