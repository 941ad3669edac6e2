"""A backfill run that stops moving after some chunks, for tests that kill it.

Usage: ``python -m sync_pipelines_tests.support.backfill_worker SPEC_PATH PIPELINE CHUNKS``

Runs :func:`~sync_pipelines.engine.pipeline.backfill_pipeline` for every table of the pipeline;
after ``CHUNKS`` chunks have been recorded it prints ``stalled`` and sleeps, holding its locks,
until it is killed — as a run whose process is then lost would.
"""

from __future__ import annotations

import sys
import time

from sync_pipelines.engine.backfill.reader import SnapshotReport
from sync_pipelines.engine.pipeline import backfill_pipeline
from sync_pipelines.engine.spec import load_spec


def main(spec_path: str, pipeline: str, chunks: int) -> None:
    seen = 0

    def on_chunk(report: SnapshotReport) -> None:
        nonlocal seen
        seen += 1
        if seen >= chunks:
            print("stalled", flush=True)
            while True:
                time.sleep(1)

    backfill_pipeline(load_spec(spec_path), pipeline, on_chunk=on_chunk)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
