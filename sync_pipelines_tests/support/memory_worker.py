"""Run pulls or deliveries of one pipeline in a fresh process and report its peak memory.

Usage: ``python -m sync_pipelines_tests.support.memory_worker pull|deliver|hold SPEC_JSON``

``SPEC_JSON`` is a sync spec as JSON (the DSN environment variables it names must be set).
``pull`` pulls until the slot is drained or the budget is full; ``deliver`` delivers every
staged batch; ``hold`` is the counter-example: it decodes the whole slot into one list, as an
implementation that keeps a transaction in memory would. Prints one JSON line:
``{"mode": ..., "changes": ..., "peak_rss_mb": ..., "seconds": ...}``. The peak is the
process's own high-water mark ``VmHWM``, so it includes the interpreter and imports — and,
unlike ``ru_maxrss``, not the parent's peak (Linux carries that over the exec of a vfork'ed
child, which is how subprocess starts this worker from a big pytest process).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from sync_pipelines.engine.pipeline import deliver_pipeline, open_source, pull_pipeline
from sync_pipelines.engine.spec import parse_spec
from sync_pipelines.engine.wire import pgoutput as po


def main(mode: str, spec_json: str) -> None:
    spec = parse_spec(json.loads(spec_json))
    name = next(iter(spec.pipelines))
    started = time.monotonic()
    changes = 0
    if mode == "pull":
        while True:
            report = pull_pipeline(spec, name)
            changes += report.changes
            if report.changes == 0:
                break
    elif mode == "deliver":
        changes = sum(r.changes for r in deliver_pipeline(spec, name))
    elif mode == "hold":
        with open_source(spec.pipelines[name]) as source:
            source.prepare()
            with source.peek(10**9, 2000) as messages:
                held = [po.decode_message(m) for m in messages]
        changes = sum(isinstance(m, po.Insert | po.Update | po.Delete) for m in held)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    status = Path("/proc/self/status").read_text()
    peak_mb = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024
    print(json.dumps({"mode": mode, "changes": changes, "peak_rss_mb": round(peak_mb, 1),
                      "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
