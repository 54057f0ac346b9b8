-- model-relay schema, version 7: the whole of the newest schema, to read. Databases are
-- built and upgraded by each dialect's numbered migrations (src/store/<engine>/migration/),
-- and a test holds this file equal to what they build; both SQLite and PostgreSQL accept
-- it. PostgreSQL's migrations also add the triggers that wake waiting calls. Times are
-- milliseconds since the Unix epoch, written by the service's one clock, never by the
-- database's now().

CREATE TABLE workspaces (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    stored_requests  BIGINT NOT NULL DEFAULT 0  -- its runtimes' requests, kept by every
                                                -- insert and delete of one
);

-- Tokens are stored only as SHA-256 hashes (hex). A workspace may hold several.
CREATE TABLE api_tokens (
    token_hash    TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    created_at    BIGINT NOT NULL,
    id            TEXT NOT NULL UNIQUE,         -- public name: the hash's first 16 hex digits
    last_used_at  BIGINT                        -- written at most once a minute per token
);

CREATE TABLE runtimes (
    id                 TEXT PRIMARY KEY,
    workspace_id       TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    name               TEXT NOT NULL,
    provider           TEXT NOT NULL,
    daemon_token_hash  TEXT NOT NULL UNIQUE,
    last_seen_at       BIGINT,
    created_at         BIGINT NOT NULL
);

CREATE INDEX runtimes_by_workspace ON runtimes (workspace_id, created_at);

-- Requests of every kind (DESIGN.md, "Request kinds"): one table, one state machine.
CREATE TABLE requests (
    id           TEXT PRIMARY KEY,
    runtime_id   TEXT NOT NULL REFERENCES runtimes (id) ON DELETE CASCADE,
    status       TEXT NOT NULL
                 CHECK (status IN ('pending', 'running', 'completed', 'failed', 'timeout')),
    models       TEXT,                          -- kind models: JSON array of model entries;
                                                -- NULL for none
    supported    BOOLEAN NOT NULL DEFAULT TRUE,
    error        TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    deadline_at  BIGINT NOT NULL,               -- pending: claim by; running: lease end
    ended_at     BIGINT,                        -- set with the terminal status
    renewed_at   BIGINT,                        -- last lease renewal while running; NULL:
                                                -- not renewed since it was handed out
    fallback     BOOLEAN NOT NULL DEFAULT FALSE, -- the report was a static stand-in list
    cached_at    BIGINT,                        -- an answer from the catalog: when the
                                                -- catalog was reported
    refresh_id   TEXT,                          -- ... and the discovery it started
    kind         TEXT NOT NULL DEFAULT 'models', -- a name from the service's table of
                                                -- kinds (no CHECK: a new kind is no
                                                -- schema change)
    coalesce_key TEXT NOT NULL DEFAULT '',      -- the kind's key field (a skill import's
                                                -- skill_key); empty for the other kinds
    input        TEXT,                          -- the kind's input, a JSON object
    result       TEXT                           -- every kind's result but models': a JSON
                                                -- object
);

-- Create-coalescing: at most one active request per runtime, kind and key, enforced by the
-- database so that two instances racing to create cannot both insert.
CREATE UNIQUE INDEX requests_one_active
    ON requests (runtime_id, kind, coalesce_key) WHERE status IN ('pending', 'running');

-- The claim: a runtime's pending requests of one kind, oldest first.
CREATE INDEX requests_pending_by_runtime
    ON requests (runtime_id, kind, created_at) WHERE status = 'pending';

-- A runtime's requests: its catalog's answers to hand out again (by `cached_at`), the
-- count of a runtime being deleted, and the rows its ON DELETE CASCADE removes.
CREATE INDEX requests_by_runtime ON requests (runtime_id, cached_at);

-- The sweeper: ended requests of each kind by end time, for deletion after the kind's
-- retention.
CREATE INDEX requests_ended
    ON requests (kind, ended_at) WHERE ended_at IS NOT NULL;

-- Requests by status and deadline: the sweeper expires one phase at a time in deadline
-- order, and the metrics count each status, both as a range of this index rather than a
-- scan of the table.
CREATE INDEX requests_by_status
    ON requests (status, deadline_at);

-- Each runtime's last good model list (its catalog), written in the transaction of the
-- report that earned it; it goes with its runtime.
CREATE TABLE catalogs (
    runtime_id   TEXT PRIMARY KEY REFERENCES runtimes (id) ON DELETE CASCADE,
    models       TEXT NOT NULL,                 -- JSON array of model entries, never empty
    supported    BOOLEAN NOT NULL,
    reported_at  BIGINT NOT NULL
);
