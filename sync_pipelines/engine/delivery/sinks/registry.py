"""The one place that maps a target's spec kind to its sink.

Adding a target kind is one sink module (implementing :class:`~.base.Sink`), its spec model in
:mod:`...spec` (a ``kind`` literal in the ``TargetSpec`` union) and one line here; nothing else
in the engine asks which kind a target is.
"""

from __future__ import annotations

from collections.abc import Callable

from ...spec import PipelineSpec
from .base import Sink
from .http import open_http_sink
from .postgres import open_postgres_sink

OPENERS: dict[str, Callable[[PipelineSpec, str], Sink]] = {
    "postgres": open_postgres_sink,
    "http": open_http_sink,
}


def open_sink(pipeline: PipelineSpec, target: str) -> Sink:
    """The sink of one of the pipeline's targets, ready to use (close it when done)."""
    return OPENERS[pipeline.targets[target].kind](pipeline, target)
