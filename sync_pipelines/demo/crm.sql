-- Demo source: a small CRM. Applied once to an empty database by `sync-pipelines demo`.
CREATE TABLE IF NOT EXISTS customers (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL,
    industry       text,
    country        char(2),
    annual_revenue numeric(14, 2),
    is_active      boolean NOT NULL DEFAULT true,
    internal_notes text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS contacts (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    first_name  text NOT NULL,
    last_name   text NOT NULL,
    email       text,
    phone       text,
    tags        text[],
    external_id uuid NOT NULL DEFAULT gen_random_uuid(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS deals (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    title       text NOT NULL,
    stage       text NOT NULL,
    amount      numeric(14, 2) NOT NULL,
    close_date  date,
    properties  jsonb NOT NULL DEFAULT '{}',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Tasks are edited in both the CRM and the reporting database: the two-way link `tasks`.
CREATE TABLE IF NOT EXISTS tasks (
    id          int PRIMARY KEY,
    title       text NOT NULL,
    status      text NOT NULL DEFAULT 'open',
    assignee    text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
