"""Orchestrator-independent CDC engine (no dagster imports)."""
