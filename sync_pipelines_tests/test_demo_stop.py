"""The demo, as a user runs it (``sync-pipelines demo``, not the smoke round): it says where
things are, and Ctrl-C (SIGINT) or SIGTERM stops everything it started — Dagster and all its
processes, the CRM API, the generator, the embedded PostgreSQL — leaving no process behind and
no misleading start-up warning.

Starts the real stack (embedded PostgreSQL from the wheel, ``dagster dev``) in a fresh home
folder, twice; about a minute in all. Not covered here: what the UI shows (test_browser).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(marker: str) -> list[str]:
    """Processes whose command line or environment mentions ``marker`` (our home folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline or marker in environ:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def wait_for_ui(port: int, demo: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert demo.poll() is None, "the demo exited before its UI came up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError("the Dagster UI did not come up")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_the_demo_leaves_no_process_behind(tmp_path, sig):
    home = tmp_path / "sync_home"
    port = free_port()
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "sync_pipelines.cli", "demo", "--home", str(home),
             "--port", str(port), "--rate", "2"], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            wait_for_ui(port, demo)
            time.sleep(3)  # let the daemon start its sensors, so there is work in flight
            assert processes_with(str(home)), "nothing of the demo seen running"
            # Ctrl-C signals the terminal's foreground process group: the demo's.
            os.killpg(demo.pid, sig)
            assert demo.wait(timeout=90) == 0
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
    text = log.read_text()
    deadline = time.monotonic() + 10
    while (left := processes_with(str(home))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"still running after the demo stopped: {left}\n{text[-2000:]}"
    assert not (home / "pg" / "postmaster.pid").exists(), "PostgreSQL is still running"
    with pytest.raises(ProcessLookupError):
        os.killpg(demo.pid, 0)  # its process group is empty
    # It told us where things are, and nothing on the way in warned falsely.
    assert f"http://127.0.0.1:{port}" in text and 'psql "postgresql://' in text
    assert "--psql <database>" in text
    assert "will not be used" not in text
    assert "too many retries for DB connection" not in text, text[-3000:]
    if sig == signal.SIGINT:  # and afterwards a shell on one of its databases still opens
        shell = subprocess.run(
            [sys.executable, "-m", "sync_pipelines.cli", "demo", "--home", str(home),
             "--psql", "crm"], cwd=REPO, input="SELECT count(*) > 0 FROM customers;\n",
            capture_output=True, text=True, timeout=120)
        assert shell.returncode == 0 and " t\n" in shell.stdout, shell.stdout + shell.stderr
