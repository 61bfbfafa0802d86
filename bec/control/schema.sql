-- BEC schema (DESIGN §4). Idempotent: safe to apply on every start or with
--   psql -h $BEC_SQL_HOST -U $BEC_SQL_USER -d pipeline_v1 -f schema.sql

DO $$ BEGIN
    CREATE TYPE task_status AS ENUM ('running', 'done', 'retryable_failed', 'terminal_failed');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS jobs (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    config      JSONB NOT NULL DEFAULT '{}'::jsonb,
    queue_url   TEXT NOT NULL,
    dlq_url     TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS volumes (
    id              BIGSERIAL PRIMARY KEY,
    bdrc_w_id       TEXT NOT NULL,
    bdrc_i_id       TEXT NOT NULL,
    last_s3_etag    TEXT,
    nb_images       INTEGER,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (bdrc_w_id, bdrc_i_id)
);

CREATE TABLE IF NOT EXISTS workers (
    worker_id          BIGSERIAL PRIMARY KEY,
    worker_name        TEXT NOT NULL,
    hostname           TEXT NOT NULL,
    job_id             BIGINT REFERENCES jobs (id) ON DELETE SET NULL,
    tags               JSONB NOT NULL DEFAULT '{}'::jsonb,
    started_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    stopped_at         TIMESTAMPTZ
);

-- One row per (job, volume, volume version); s3_etag holds the version: the first six
-- hex digits of the manifest's ETag ('' when the manifest is missing).
CREATE TABLE IF NOT EXISTS task_executions (
    id                        BIGSERIAL PRIMARY KEY,
    job_id                    BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    volume_id                 BIGINT NOT NULL REFERENCES volumes (id) ON DELETE CASCADE,
    s3_etag                   TEXT NOT NULL,
    status                    task_status NOT NULL,
    attempt                   INTEGER NOT NULL DEFAULT 1,
    worker_id                 BIGINT REFERENCES workers (worker_id) ON DELETE SET NULL,
    started_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at                   TIMESTAMPTZ,
    total_images              INTEGER,
    nb_errors                 INTEGER,
    total_duration_ms         DOUBLE PRECISION,
    avg_duration_per_page_ms  DOUBLE PRECISION,
    error_reason              TEXT
);

-- Which receive of which message made the running claim (a digest of its SQS receipt): a
-- claim retried after its reply was lost (a failover, a reset) finds its own row.
ALTER TABLE task_executions ADD COLUMN IF NOT EXISTS claim_token TEXT;

CREATE UNIQUE INDEX IF NOT EXISTS task_executions_job_volume_version
    ON task_executions (job_id, volume_id, s3_etag);
-- jobs stats (GROUP BY status) and jobs tasks --status S ORDER BY id DESC
CREATE INDEX IF NOT EXISTS task_executions_job_status_id
    ON task_executions (job_id, status, id DESC);
CREATE INDEX IF NOT EXISTS task_executions_job_id
    ON task_executions (job_id, id DESC);
-- stale-claim check and per-worker views
CREATE INDEX IF NOT EXISTS task_executions_worker
    ON task_executions (worker_id) WHERE status = 'running';
