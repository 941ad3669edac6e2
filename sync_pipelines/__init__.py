"""Dagster-orchestrated PostgreSQL change data capture and delivery."""
