"""The machine a benchmark ran on: CPU, memory, Python, library versions, git state.

Shared by the scripts in this folder so every result file describes its machine the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import re
import resource
import subprocess
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent


def machine_info(distributions: tuple[str, ...] = ()) -> dict[str, Any]:
    """What this machine is, plus the installed versions of ``distributions``."""
    info: dict[str, Any] = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "psycopg": f"{psycopg.__version__} ({psycopg.pq.__impl__} libpq {psycopg.pq.version()})",
    }
    for dist in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        models = re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        info["cpu_model"] = models[0].strip() if models else platform.processor()
        mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.MULTILINE)
        if mhz:
            info["cpu_mhz"] = float(mhz[0])
        cores = {(p, c) for p, c in re.findall(
            r"^physical id\s*:\s*(\d+)$.*?^core id\s*:\s*(\d+)$", text, re.MULTILINE | re.DOTALL)}
        if cores:
            info["physical_cores"] = len(cores)
    with contextlib.suppress(OSError):
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            info["ram_gb"] = round(int(m.group(1)) / 1024 / 1024, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "sync_pipelines"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["git"] = head + (" (engine has uncommitted changes)" if dirty else "")
        info["engine_changes"] = dirty.splitlines()
    digest = hashlib.sha256()
    for f in sorted((REPO / "sync_pipelines" / "engine").rglob("*.py")):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    info["engine_sha256"] = digest.hexdigest()[:16]
    return info


def peak_rss_kb() -> int:
    """This process's peak resident set size in KiB, since its last exec (VmHWM).

    Not ``ru_maxrss``: Linux carries that over an exec from the parent's memory when the child
    is started with vfork, as Python's subprocess does, so a small child of a big test process
    would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
