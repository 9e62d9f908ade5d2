"""Shared fixtures: small specs and in-process reference runs (the host has torch and transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stepdiff.harness import spec as S

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_spec() -> S.Spec:
    return S.from_dict({"case": {"name": "tiny"}, "batch": {"grad_accum": 2}})


def run_reference(spec: S.Spec, tmp_path: Path, dtype: str | None = None) -> Any:
    """The reference adapter in this process (no worker): for unit tests of its math."""
    from stepdiff.adapters.base import WorkerContext
    from stepdiff.adapters.reference import ReferenceAdapter
    from stepdiff.harness.model import write_init_weights

    init = write_init_weights(spec, tmp_path / "init")
    ctx = WorkerContext(rank=0, world_size=1, local_rank=0, device="cpu", scratch=tmp_path)
    return ReferenceAdapter().run(spec, init, ctx, dtype=dtype), init


@pytest.fixture(autouse=True)
def _reports_match_schema(request: pytest.FixtureRequest) -> Any:
    """Every JSON report a test writes under its tmp_path is validated against the shipped schema (jsonschema)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    import json

    tmp = request.getfixturevalue("tmp_path")  # before the test, so it is torn down after this check
    yield
    for p in sorted(Path(tmp).rglob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "schema" in doc and "runs" in doc:  # a stepdiff report (not a record or env)
            from stepdiff.reports.schema import problems

            bad = problems(doc)
            assert not bad, f"{p.name} does not match the report schema: {bad}"


# ---------------------------------------------------------------------------------------------------- headless Chromium
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")


def _chromium_binaries() -> tuple[str | None, str | None]:
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    return browser, shutil.which("chromedriver")


def _install_chromium() -> None:
    """Debian's chromium and chromium-driver through apt (no browser download); quiet, tolerant of failure."""
    import os
    import shutil
    import subprocess

    if not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(cmd, env=env, capture_output=True, timeout=900)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A headless Chromium driven through chromedriver (selenium), with the browser console log captured.

    Installed from Debian if missing. Where it cannot be had, the test is skipped locally and FAILS under CI
    (CI=true): a report check that silently does not run is worse than none."""
    import os

    browser_bin, driver_bin = _chromium_binaries()
    if not (browser_bin and driver_bin):
        _install_chromium()
        browser_bin, driver_bin = _chromium_binaries()
    if not (browser_bin and driver_bin):
        message = "headless Chromium is not installed: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a browser online
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_bin
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.add_argument("--window-size=1400,1000")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave artifacts for a person to look at (screenshots): $STEPDIFF_TEST_ARTIFACTS or
    ./test-artifacts."""
    import os

    d = Path(os.environ.get("STEPDIFF_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d
