"""Sinks: one module per target kind (PostgreSQL, HTTP/REST), each applying mapped changes and
keeping its own idempotency. A sink knows nothing of the slot or the state database."""
