"""Crash points: named places where a test can make the engine stop as if the process died.

Production code calls ``faults.hit("after_stage")`` at each point where a crash matters; with
the default :data:`NO_FAULTS` that does nothing. Tests pass a :class:`Faults` armed with the
point names to crash at; ``hit`` then raises :class:`InjectedCrash` (a ``BaseException``, so no
``except Exception`` in the engine can swallow it, just as none could catch a real crash).
"""

from __future__ import annotations

from collections.abc import Iterable


class InjectedCrash(BaseException):
    """Raised at an armed crash point."""


class Faults:
    def __init__(self, points: Iterable[str] = (), *, after_hits: int = 0) -> None:
        self.points = set(points)
        self.after_hits = after_hits
        self.hits: dict[str, int] = {}

    def hit(self, point: str) -> None:
        n = self.hits[point] = self.hits.get(point, 0) + 1
        if point in self.points and n > self.after_hits:
            self.points.discard(point)  # crash once, like a process that is then restarted
            raise InjectedCrash(point)


NO_FAULTS = Faults()
