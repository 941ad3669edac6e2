"""A reference CRM-style HTTP service: the sink target of the demo and the tests.

A small local server (127.0.0.1) with ``contacts``, ``companies`` and ``deals`` resources,
built on starlette and served by uvicorn (both come with Dagster). It behaves like the SaaS
APIs an HTTP sink meets in practice, and is deliberately strict where they are:

* every write (``PUT``, ``DELETE``, ``POST .../batch``) needs an ``Idempotency-Key``; a repeated
  key is answered from the stored first successful response and never applied twice;
* an admin API (``/_admin/...``) injects latency, 429s (with ``Retry-After``), 500s, outages
  and poison records, deterministically from a seed;
* it records every write it received (in arrival order, with the status it answered) and the
  highest number of concurrent requests, overall and per record, so tests can assert exactly
  what a sink sent and that it kept one request per key in flight.

State lives in memory only: a crash or restart loses every record, the received log, the
idempotency store and the faults. Modules:

:mod:`.app`
    ``create_app(...)`` — the starlette application (routes, contract and state).
:mod:`.server`
    ``CrmServer`` — runs the app on a free port in a background thread (tests, demo).
``python -m sync_pipelines.crm_service``
    Runs it in the foreground with uvicorn.
"""
