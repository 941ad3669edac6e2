"""The code location: one set of definitions per pipeline in the sync spec.

The spec path comes from ``SYNC_SPEC`` (default ``sync.yaml`` in the working directory), read
when Dagster loads the location — not at import. An invalid spec fails the load with a
message naming the file, the pipeline and the field.
"""

from __future__ import annotations

import os

import dagster as dg

from sync_pipelines.defs.failures import build_failure_defs
from sync_pipelines.defs.health import build_health_defs
from sync_pipelines.defs.links import build_link_defs
from sync_pipelines.defs.pipelines import build_pipeline_defs
from sync_pipelines.defs.reconcile import build_reconcile_defs
from sync_pipelines.defs.resources import SyncEngine
from sync_pipelines.engine import SpecError, load_spec


def build_definitions(spec_path: str) -> dg.Definitions:
    try:
        spec = load_spec(spec_path)
    except SpecError as err:
        # Re-raised without the engine's traceback: the message is the whole story.
        raise SpecError(str(err)) from None
    links: dict[str, list] = {}
    for p in spec.pipelines.values():
        if p.link is not None:
            links.setdefault(p.link.name, []).append(p)
    return dg.Definitions.merge(
        *(build_link_defs(name, directions) for name, directions in links.items()),
        *(build_pipeline_defs(p) for p in spec.pipelines.values()),
        *(build_failure_defs(p) for p in spec.pipelines.values()),
        *(build_health_defs(p) for p in spec.pipelines.values()),
        *(build_reconcile_defs(spec, p) for p in spec.pipelines.values()),
        dg.Definitions(resources={"sync": SyncEngine(spec_path=spec_path)}),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(os.environ.get("SYNC_SPEC", "sync.yaml"))
