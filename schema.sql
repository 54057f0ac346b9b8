-- model-relay schema, version 3. Both SQLite and PostgreSQL apply this file at start-up;
-- every statement is idempotent. A column added after version 2 is also added to an older
-- table by each engine's `migrate` (SQLite has no ADD COLUMN IF NOT EXISTS). Times are milliseconds since the Unix epoch, written by
-- the service's one clock, never by the database's now().

CREATE TABLE IF NOT EXISTS workspaces (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Tokens are stored only as SHA-256 hashes (hex).
CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash    TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    created_at    BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS runtimes (
    id                 TEXT PRIMARY KEY,
    workspace_id       TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name               TEXT NOT NULL,
    provider           TEXT NOT NULL,
    daemon_token_hash  TEXT NOT NULL UNIQUE,
    last_seen_at       BIGINT,
    created_at         BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS runtimes_by_workspace ON runtimes (workspace_id, created_at);

CREATE TABLE IF NOT EXISTS requests (
    id           TEXT PRIMARY KEY,
    runtime_id   TEXT NOT NULL REFERENCES runtimes (id) ON DELETE CASCADE,
    status       TEXT NOT NULL
                 CHECK (status IN ('pending', 'running', 'completed', 'failed', 'timeout')),
    models       TEXT,                          -- JSON array of model entries; NULL for none
    supported    BOOLEAN NOT NULL DEFAULT TRUE,
    error        TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    deadline_at  BIGINT NOT NULL,               -- pending: claim by; running: lease end
    ended_at     BIGINT,                        -- set with the terminal status
    renewed_at   BIGINT                         -- version 3: last lease renewal while running;
                                                -- NULL: not renewed since it was handed out
);

-- Create-coalescing: at most one active request per runtime, enforced by the database so
-- that two instances racing to create cannot both insert.
CREATE UNIQUE INDEX IF NOT EXISTS requests_one_active_per_runtime
    ON requests (runtime_id) WHERE status IN ('pending', 'running');

-- The claim: a runtime's pending requests, oldest first.
CREATE INDEX IF NOT EXISTS requests_pending_by_runtime
    ON requests (runtime_id, created_at) WHERE status = 'pending';

-- The sweeper: ended requests by end time, for deletion after retention.
CREATE INDEX IF NOT EXISTS requests_ended
    ON requests (ended_at) WHERE ended_at IS NOT NULL;

-- Version 2. Requests by status and deadline: the sweeper expires one phase at a time in
-- deadline order, and the metrics count each status, both as a range of this index rather
-- than a scan of the table. It replaces version 1's index of active requests by deadline.
CREATE INDEX IF NOT EXISTS requests_by_status
    ON requests (status, deadline_at);
DROP INDEX IF EXISTS requests_active_by_deadline;
