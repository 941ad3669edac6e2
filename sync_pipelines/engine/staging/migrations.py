"""The state schema's migrations, applied in order and idempotently by
:meth:`.store.StateStore.migrate` (under an advisory lock, so concurrent start-ups are safe).

Each entry is one version's DDL with ``{schema}`` for the state schema; a version is never
edited once released — a change is a new entry. A crash inside a migration rolls it back
whole (one transaction per start-up), and the next start-up applies it again.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE {schema}.pipeline (
        pipeline     text PRIMARY KEY,
        slot         text NOT NULL,
        staged_lsn   bigint NOT NULL DEFAULT 0,
        staged_seq   integer NOT NULL DEFAULT -1,
        next_batch   bigint NOT NULL DEFAULT 1,
        advanced_lsn bigint,
        updated_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE {schema}.relation (
        relation_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        pipeline     text NOT NULL,
        fingerprint  text NOT NULL,
        source_oid   bigint NOT NULL,
        namespace    text NOT NULL,
        name         text NOT NULL,
        replica_identity text NOT NULL,
        columns      jsonb NOT NULL,
        first_seen   timestamptz NOT NULL DEFAULT now(),
        UNIQUE (pipeline, fingerprint)
    );
    CREATE TABLE {schema}.batch (
        pipeline     text NOT NULL,
        batch_id     bigint NOT NULL,
        first_lsn    bigint NOT NULL,
        first_seq    integer NOT NULL,
        last_lsn     bigint NOT NULL,
        last_seq     integer NOT NULL,
        n_changes    integer NOT NULL,
        first_commit_ts timestamptz,
        last_commit_ts  timestamptz,
        staged_at    timestamptz NOT NULL DEFAULT now(),
        requested_at timestamptz,
        PRIMARY KEY (pipeline, batch_id)
    );
    CREATE TABLE {schema}.change (
        pipeline     text NOT NULL,
        commit_lsn   bigint NOT NULL,
        seq          integer NOT NULL,
        batch_id     bigint NOT NULL,
        xid          bigint NOT NULL,
        commit_ts    timestamptz NOT NULL,
        relation_id  bigint NOT NULL,
        op           text NOT NULL,
        message      bytea NOT NULL,
        PRIMARY KEY (pipeline, commit_lsn, seq)
    );
    CREATE TABLE {schema}.delivery (
        pipeline     text NOT NULL,
        target       text NOT NULL,
        commit_lsn   bigint NOT NULL,
        seq          integer NOT NULL,
        batch_id     bigint NOT NULL,
        updated_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, target)
    );
    """,
    # 2: changes held per key for a target (retry head + parked), dead letters, HTTP ledger.
    """
    CREATE TABLE {schema}.held (
        pipeline     text NOT NULL,
        target       text NOT NULL,
        key          text NOT NULL,
        commit_lsn   bigint NOT NULL,
        seq          integer NOT NULL,
        relation_id  bigint NOT NULL,
        op           text NOT NULL,
        message      bytea NOT NULL,
        attempts     integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz,
        last_status  integer,
        last_error   text,
        held_since   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, target, commit_lsn, seq)
    );
    CREATE INDEX held_by_key ON {schema}.held (pipeline, target, key, commit_lsn, seq);
    CREATE TABLE {schema}.dead_letter (
        dead_letter_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        pipeline     text NOT NULL,
        target       text NOT NULL,
        key          text NOT NULL,
        commit_lsn   bigint NOT NULL,
        seq          integer NOT NULL,
        relation_id  bigint NOT NULL,
        op           text NOT NULL,
        message      bytea NOT NULL,
        attempts     integer NOT NULL,
        last_status  integer,
        reason       text NOT NULL,
        dead_at      timestamptz NOT NULL DEFAULT now(),
        resolved_at  timestamptz,
        resolution   text
    );
    CREATE INDEX dead_letter_open ON {schema}.dead_letter (pipeline, target, key)
        WHERE resolved_at IS NULL;
    CREATE UNIQUE INDEX dead_letter_once ON {schema}.dead_letter
        (pipeline, target, commit_lsn, seq) WHERE resolved_at IS NULL;
    CREATE TABLE {schema}.ledger (
        pipeline     text NOT NULL,
        target       text NOT NULL,
        commit_lsn   bigint NOT NULL,
        seq          integer NOT NULL,
        sub          integer NOT NULL,
        status       integer,
        delivered_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, target, commit_lsn, seq, sub)
    );
    """,
    # 3: snapshots (initial backfill, repair) read in key-ordered chunks and placed in the
    # stream between watermarks; see snapshots.py.
    """
    CREATE TABLE {schema}.snapshot (
        snapshot_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        pipeline     text NOT NULL,
        table_name   text NOT NULL,
        kind         text NOT NULL,
        status       text NOT NULL DEFAULT 'running',
        last_key     text[],
        chunks       integer NOT NULL DEFAULT 0,
        rows         bigint NOT NULL DEFAULT 0,
        rows_estimate bigint,
        started_at   timestamptz NOT NULL DEFAULT now(),
        updated_at   timestamptz NOT NULL DEFAULT now(),
        finished_at  timestamptz,
        error        text
    );
    CREATE INDEX snapshot_by_table ON {schema}.snapshot (pipeline, table_name, kind, status);
    CREATE TABLE {schema}.snapshot_chunk (
        chunk_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        snapshot_id  bigint NOT NULL,
        pipeline     text NOT NULL,
        relation_id  bigint NOT NULL,
        key_names    text[] NOT NULL,
        messages     bytea[],
        low_lsn      bigint,
        high_lsn     bigint,
        placed       integer,
        conflicts    integer,
        emitted      boolean NOT NULL DEFAULT false,
        abandoned    boolean NOT NULL DEFAULT false,
        created_at   timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX snapshot_chunk_open ON {schema}.snapshot_chunk (pipeline, low_lsn)
        WHERE NOT abandoned;
    """,
    # 4: rows to re-read from the source because a change did not carry every value and the
    # target had no copy to take the rest from; see refetch.py.
    """
    CREATE TABLE {schema}.refetch (
        pipeline     text NOT NULL,
        target       text NOT NULL,
        commit_lsn   bigint NOT NULL,
        seq          integer NOT NULL,
        table_name   text NOT NULL,
        key          text[] NOT NULL,
        reason       text NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, target, commit_lsn, seq, table_name, key)
    );
    CREATE INDEX refetch_by_age ON {schema}.refetch (pipeline, requested_at);
    """,
    # 5: targets are delivered on their own: when a delivery of each was last asked for.
    """
    ALTER TABLE {schema}.delivery ADD COLUMN requested_batch bigint,
        ADD COLUMN requested_at timestamptz;
    """,
    # 6: slot health: heartbeats written into the source's WAL and seen passing the slot;
    # when the pipeline was first seen (its first reconciliation day).
    """
    ALTER TABLE {schema}.pipeline ADD COLUMN created_at timestamptz NOT NULL DEFAULT now(),
        ADD COLUMN heartbeat_at timestamptz, ADD COLUMN heartbeat_written_at timestamptz;
    """,
    # 7: sources without a WAL. Webhook receipts (the dedup record of a webhook-id, written in
    # the transaction that stages its change), when each target delivered each batch (for the
    # webhook status API), and the poller's cursor and content hashes.
    """
    CREATE TABLE {schema}.webhook_receipt (
        pipeline       text NOT NULL,
        webhook_id     text NOT NULL,
        correlation_id uuid NOT NULL UNIQUE,
        table_name     text NOT NULL,
        commit_lsn     bigint NOT NULL,
        seq            integer NOT NULL,
        batch_id       bigint NOT NULL,
        received_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, webhook_id)
    );
    CREATE INDEX webhook_receipt_age ON {schema}.webhook_receipt (pipeline, received_at);
    CREATE TABLE {schema}.delivery_log (
        pipeline     text NOT NULL,
        target       text NOT NULL,
        batch_id     bigint NOT NULL,
        delivered_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (pipeline, target, batch_id)
    );
    CREATE TABLE {schema}.poll_cursor (
        pipeline      text NOT NULL,
        table_name    text NOT NULL,
        cursor_at     timestamptz,
        listing_since timestamptz,
        page_cursor   text,
        polled_at     timestamptz,
        PRIMARY KEY (pipeline, table_name)
    );
    CREATE TABLE {schema}.poll_seen (
        pipeline    text NOT NULL,
        table_name  text NOT NULL,
        key         text NOT NULL,
        hash        text NOT NULL,
        changed_at  timestamptz,
        PRIMARY KEY (pipeline, table_name, key)
    );
    """,
    # 8: two-way links — what both sides last agreed on per key, and the conflict log.
    """
    CREATE TABLE {schema}.link_base (
        link        text NOT NULL,
        table_name  text NOT NULL,
        key         text NOT NULL,
        row_values  jsonb,
        set_by      text NOT NULL,
        set_lsn     bigint NOT NULL,
        set_seq     integer NOT NULL,
        superseded  jsonb NOT NULL DEFAULT '{{}}',
        held        bigint,
        updated_at  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (link, table_name, key)
    );
    CREATE TABLE {schema}.link_conflict (
        id          bigserial PRIMARY KEY,
        link        text NOT NULL,
        table_name  text NOT NULL,
        key         text NOT NULL,
        detected_by text NOT NULL,
        commit_lsn  bigint NOT NULL,
        seq         integer NOT NULL,
        versions    jsonb NOT NULL,
        base        jsonb,
        had_base    boolean NOT NULL,
        policy      text NOT NULL,
        decision    text NOT NULL,
        reason      text NOT NULL,
        result      jsonb,
        status      text NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now(),
        resolved_at timestamptz,
        resolution  text,
        UNIQUE (link, detected_by, commit_lsn, seq, table_name, key)
    );
    CREATE INDEX link_conflict_recent ON {schema}.link_conflict (link, created_at);
    """,
    # 9: a link's echo ledger — what it wrote into an HTTP API, to recognise it coming back.
    """
    CREATE TABLE {schema}.link_echo (
        link        text NOT NULL,
        table_name  text NOT NULL,
        key         text NOT NULL,
        hash        text NOT NULL,
        expires_at  timestamptz NOT NULL,
        PRIMARY KEY (link, table_name, key, hash)
    );
    CREATE INDEX link_echo_expiry ON {schema}.link_echo (link, expires_at);
    """,
    # 10: the mailbox packed per batch (staging/mailbox.py, format version 1) instead of a row
    # per change. Changes staged as rows by an older version are packed here, in SQL, into
    # the same format: a version byte, the count, then per change its header fields
    # big-endian (int8send, int4send) and its message. Changes already collected from a partly
    # delivered batch are simply not there (and no longer counted); the others keep their
    # positions.
    """
    ALTER TABLE {schema}.batch ADD COLUMN changes bytea;
    ALTER TABLE {schema}.batch ALTER COLUMN changes SET STORAGE EXTERNAL;
    UPDATE {schema}.batch b SET changes = '\\x01'::bytea || int4send(p.n) || p.packed,
        n_changes = p.n
    FROM {schema}.batch b2 CROSS JOIN LATERAL (
        SELECT count(*)::int4 AS n, coalesce(string_agg(
            int8send(c.commit_lsn - b2.first_lsn) || int4send(c.seq) || int8send(c.xid)
            || int8send((extract(epoch FROM c.commit_ts) * 1000000)::bigint)
            || int8send(c.relation_id) || convert_to(c.op, 'UTF8')
            || int4send(length(c.message)) || c.message, ''::bytea
            ORDER BY c.commit_lsn, c.seq), ''::bytea) AS packed
        FROM {schema}.change c WHERE c.pipeline = b2.pipeline
        AND (c.commit_lsn, c.seq) >= (b2.first_lsn, b2.first_seq)
        AND (c.commit_lsn, c.seq) <= (b2.last_lsn, b2.last_seq)) p
    WHERE b.pipeline = b2.pipeline AND b.batch_id = b2.batch_id;
    ALTER TABLE {schema}.batch ALTER COLUMN changes SET NOT NULL;
    DROP TABLE {schema}.change;
    CREATE INDEX batch_last ON {schema}.batch (pipeline, last_lsn, last_seq);
    """,
]
