"""The Dagster layer: thin wrappers that build engine calls from resources and report results."""
