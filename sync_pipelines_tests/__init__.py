"""Tests for sync_pipelines."""
