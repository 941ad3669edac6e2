"""The engine's error hierarchy.

Every error the engine raises on purpose derives from :class:`SyncError`, so the Dagster layer
can turn it into a clear failure message instead of a stack trace from deep inside a driver.

::

    SyncError
    ├── SpecError            the sync spec (YAML) is invalid: names the file, pipeline and field
    ├── SourceError          the source database cannot be used as configured
    │   ├── SourceConfigError    wal_level, missing table, primary key, replica identity
    │   ├── SlotConflictError    the slot is in use or was advanced by someone else
    │   └── SlotLostError        the slot was dropped or lost WAL it needed: recover
    ├── StateError           the state database is unreachable or inconsistent
    │   └── BusyError            another run holds the lock this step needs
    │       └── SnapshotBusyError    a backfill of the table is already running elsewhere
    └── DeliveryError        a change could not be applied to a target
        ├── TransientDeliveryError   retrying later may succeed (target down, serialization)
        └── TerminalDeliveryError    retrying cannot succeed (constraint violation, bad data)

``Transient`` and ``Terminal`` are marker classes: a concrete error mixes in one of them, and
callers decide whether to retry with ``isinstance(err, Transient)``.

Messages name the pipeline, and where known the target, table, key and LSN, so an operator can
find the change without reading code.
"""

from __future__ import annotations


class Transient:
    """Marker: the same operation may succeed if retried later."""


class Terminal:
    """Marker: retrying the same operation cannot succeed; it needs a human or a fix."""


class SyncError(Exception):
    """Root of every error the engine raises on purpose."""


class SpecError(SyncError, Terminal):
    """The sync spec is invalid. The message names the file, the pipeline and the field."""


class SourceError(SyncError):
    """The source database cannot be used as configured."""


class SourceConfigError(SourceError, Terminal):
    """The source is misconfigured (wal_level, missing table, no key); the message names the fix."""


class SlotConflictError(SourceError, Terminal):
    """The replication slot is used by another consumer, or moved without us."""


class SlotLostError(SourceError, Terminal):
    """The slot is gone or invalidated (``wal_status = 'lost'``): changes after its position
    are no longer in the source's WAL. Starting a new slot from "now" would skip them, so the
    pipeline stops and names the recovery (recreate the slot, backfill, reconcile)."""


class SourceUnavailableError(SourceError, Transient):
    """The source database cannot be reached right now."""


class StateError(SyncError):
    """The state database is unreachable or its contents are inconsistent."""


class BusyError(StateError, Transient):
    """Another run or process holds the lock this step needs; try again later."""


class SnapshotBusyError(BusyError):
    """A backfill (or other snapshot) of the same table is already running in another run."""


class DeliveryError(SyncError):
    """A change could not be applied to a target."""


class TransientDeliveryError(DeliveryError, Transient):
    """The target failed in a way that a later attempt may not (down, serialization failure)."""


class TerminalDeliveryError(DeliveryError, Terminal):
    """The target rejected the change for good (constraint violation, invalid value)."""
