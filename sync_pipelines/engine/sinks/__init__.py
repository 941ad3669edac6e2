"""Sinks: where mapped changes are applied. One module per kind of target."""
