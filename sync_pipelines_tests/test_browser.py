"""The Dagster UI as an operator sees it, in headless Chromium driven by Playwright: the lineage
page loads without errors; with dead letters on the CRM API target, its lineage node and its
Checks tab show the failing check (a finished evaluation, not "in progress"); after a redrive
launched from the launchpad and a sweep, re-evaluating the checks from the Checks tab turns
them green.

Runs the real demo stack (``sync-pipelines demo``: embedded PostgreSQL, the reference CRM API,
``dagster dev``) in a fresh home folder; about two minutes. Needs Chromium (Debian package
``chromium``) and the ``playwright`` Python package; without them the test is skipped with the
reason, unless ``SYNC_REQUIRE_BROWSER=1`` (CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from .test_demo_stop import REPO, free_port, wait_for_ui

CHROMIUM = os.environ.get("SYNC_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which(
    "chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
DEAD_LETTERS = "/assets/sync/crm/delivered/crm_api?view=checks"

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

if (CHROMIUM is None or sync_playwright is None) and os.environ.get("SYNC_REQUIRE_BROWSER"):
    raise RuntimeError("SYNC_REQUIRE_BROWSER is set but Chromium or playwright is missing")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="needs Chromium (apt-get install chromium) and playwright (pip install playwright)")


def post(url: str, body: dict) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()


def count(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0


def eventually(what: str, probe, timeout_s: float = 90, every_s: float = 2.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def open_page(page: Page, url: str) -> str:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    skip = page.get_by_role("button", name="Skip")  # the first-visit newsletter dialog
    if skip.count():
        skip.first.click()
    return page.inner_text("body")


def test_failing_checks_show_and_turn_green_after_a_redrive_from_the_launchpad(tmp_path):
    home = tmp_path / "sync_home"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "sync_pipelines.cli", "demo", "--home", str(home),
             "--port", str(port), "--rate", "5"], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_ui(port, demo)
        text = log.read_text()
        crm = re.search(r"CRM API \(HTTP target\)\s+(http://127\.0\.0\.1:\d+)", text).group(1)
        state = re.search(r'database sync_state \(state\)\s+psql "([^"]+)"', text).group(1)
        # The CRM refuses some contacts for good: their changes become dead letters.
        post(f"{crm}/_admin/faults", {"poison": [
            {"resource": "contacts", "id": str(i), "status": 422} for i in range(1, 80)]})
        dead = "SELECT count(*) FROM sync_state.dead_letter WHERE target = 'crm_api' " \
               "AND resolved_at IS NULL"
        eventually("dead letters", lambda: count(state, dead))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            try:
                lineage = eventually("the failing check on the crm_api node", lambda: (
                    # The asset's own lineage: with several pipelines (groups) the group
                    # view starts collapsed.
                    (body := open_page(page, f"{base}/assets/sync/crm/delivered/crm_api"
                                             "?view=lineage"))
                    and re.search(r"crm_api\s+Latest event.*?Asset checks\s+([0-2]) / 3 Passed",
                                  body, re.S) and body))
                assert "staged" in lineage and not errors, errors
                checks = eventually("dead_letters failing in the Checks tab", lambda: (
                    (body := open_page(page, base + DEAD_LETTERS))
                    and re.search(r"dead_letters\s+Failed", body) and body))
                assert not re.search(r"dead_letters\s+(In progress|Executing)", checks)
                # The operator fixes the API, then redrives from the launchpad.
                post(f"{crm}/_admin/faults", {})
                open_page(page, f"{base}/locations/sync_pipelines/jobs/crm_dead_letters_job/"
                                "playground")
                # The editor mounts after the page's queries settle; on a loaded machine that
                # is after "networkidle" (a CI run found it not there yet).
                page.wait_for_selector(".CodeMirror", timeout=60_000)
                page.evaluate("""config => document.querySelector('.CodeMirror')
                                 .CodeMirror.setValue(config)""",
                              "ops:\n  crm_dead_letters:\n    config:\n      target: crm_api\n"
                              "      action: redrive\n")
                page.get_by_role("button", name=re.compile("Launch run", re.I)).click()
                # The daemon launches queued runs one after another (each a process start):
                # on a loaded machine, a CI run saw one pass launch 7 runs in 65 s.
                eventually("the redrive", lambda: count(state, dead) == 0, timeout_s=300)
                # The sweep delivers what was redriven (its schedule would, within 2 minutes).
                open_page(page, f"{base}/locations/sync_pipelines/jobs/crm_retry_sweep_job/"
                                "playground")
                page.get_by_role("button", name=re.compile("Launch run", re.I)).click()
                held = "SELECT count(*) FROM sync_state.held WHERE target = 'crm_api'"
                eventually("the sweep", lambda: count(state, held) == 0, timeout_s=300)
                # Re-evaluate on demand, from the Checks tab.
                open_page(page, base + DEAD_LETTERS)
                page.get_by_role("button", name="Execute all").click()
                launch = page.get_by_role("button", name=re.compile("^(Execute|Launch)", re.I))
                if launch.count() > 1:  # a confirmation dialog, in some versions
                    launch.last.click()
                eventually("dead_letters green", lambda: re.search(
                    r"dead_letters\s+Succeeded", open_page(page, base + DEAD_LETTERS)))
                assert not errors, errors
            except BaseException:
                page.screenshot(path=str(tmp_path / "failure.png"))
                raise
            finally:
                browser.close()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
            try:
                demo.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
    assert Path(log).exists()
