"""Helpers shared by the integration tests (not fixtures: plain functions)."""
