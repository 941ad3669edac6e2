"""The Dagster resource that hands the engine its spec.

Credentials never pass through Dagster config: the spec names the environment variables that
hold each DSN and the engine reads them when it connects.
"""


import dagster as dg

from sync_pipelines.engine import SyncSpec, load_spec


class SyncEngine(dg.ConfigurableResource):
    """Gives ops and sensors the validated sync spec."""

    spec_path: str = "sync.yaml"
    """Path of the sync spec (YAML)."""

    def spec(self) -> SyncSpec:
        return load_spec(self.spec_path)
