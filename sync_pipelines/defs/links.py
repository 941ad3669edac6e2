"""Per two-way link: ``<link>_conflicts_job``, where an operator decides logged conflicts.

Its launchpad config lists resolutions, each a conflict id and the version both sides get:
``take: <side>`` (that side's latest version; a held key absorbs later changes into it),
optionally with ``values`` for some fields, or ``delete: true``. A decided conflict can be
re-decided the same way. Without resolutions the run lists the held conflicts (ids, versions)
in its metadata, so the config can be written from it. Each resolution is applied through the
engine (:func:`~sync_pipelines.engine.resolve_link_conflict`); a bad one fails the run with its
reason, after the ones before it were applied. The ``conflicts`` check of each direction (see
:mod:`.health`) shows what is held.
"""


import json
from typing import Any

import dagster as dg

import sync_pipelines.engine as engine
from sync_pipelines.engine import PipelineSpec, SyncError

from .keys import OPERATOR_TAG
from .resources import SyncEngine


class Resolution(dg.Config):
    conflict_id: int
    take: str | None = None
    """A side's name: its version of the row."""
    values: dict[str, str] = {}
    """Field values (first side's column names) over the taken version."""
    delete: bool = False
    """Delete the key on both sides instead."""


class ConflictsConfig(dg.Config):
    resolutions: list[Resolution] = []


def build_link_defs(link: str, directions: list[PipelineSpec]) -> dg.Definitions:
    sides = sorted({p.link.target_side for p in directions if p.link is not None})

    @dg.op(name=f"{link}_conflicts", description=f"Resolve conflicts of link {link} "
           f"(sides: {', '.join(sides)}).")
    def conflicts(context: dg.OpExecutionContext, config: ConflictsConfig, sync: SyncEngine):
        spec = sync.spec()
        done: list[dict[str, Any]] = []
        for r in config.resolutions:
            try:
                c = engine.resolve_link_conflict(
                    spec, link, r.conflict_id, take=r.take, values=r.values or None,
                    delete=r.delete)
            except SyncError as err:
                raise dg.Failure(description=f"conflict {r.conflict_id}: {err}",
                                 metadata={"resolved_before": len(done)}) from None
            context.log.info(f"conflict {c.id} ({c.table} {c.key}): {c.resolution}")
            done.append({"id": c.id, "table": c.table, "key": c.key,
                         "resolution": c.resolution or "", "result": json.dumps(c.result)})
        held = engine.link_conflicts(spec, link, status="held", limit=100)
        context.add_output_metadata({
            "resolved": len(done),
            "still_held": len(held),
            "held": dg.MetadataValue.json([
                {"conflict_id": c.id, "table": c.table, "key": c.key, "versions": c.versions,
                 "base": c.base, "reason": c.reason} for c in held]),
        })

    @dg.job(name=f"{link}_conflicts_job", tags={OPERATOR_TAG: f"link:{link}"},
            executor_def=dg.in_process_executor,
            description=f"Decide conflicts of two-way link {link}: take a side, give values, "
            "or delete; without resolutions, list what is held.")
    def conflicts_job() -> None:
        conflicts()

    return dg.Definitions(jobs=[conflicts_job])
