-- Version 1: workspaces, their API tokens, runtimes and their requests. Times are
-- milliseconds since the Unix epoch, written by the service's one clock.

CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    token_hash    TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    created_at    BIGINT NOT NULL
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

CREATE TABLE requests (
    id           TEXT PRIMARY KEY,
    runtime_id   TEXT NOT NULL REFERENCES runtimes (id) ON DELETE CASCADE,
    status       TEXT NOT NULL
                 CHECK (status IN ('pending', 'running', 'completed', 'failed', 'timeout')),
    models       TEXT,
    supported    BOOLEAN NOT NULL DEFAULT TRUE,
    error        TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    deadline_at  BIGINT NOT NULL,
    ended_at     BIGINT
);

CREATE UNIQUE INDEX requests_one_active_per_runtime
    ON requests (runtime_id) WHERE status IN ('pending', 'running');

CREATE INDEX requests_pending_by_runtime
    ON requests (runtime_id, created_at) WHERE status = 'pending';

CREATE INDEX requests_active_by_deadline
    ON requests (deadline_at) WHERE status IN ('pending', 'running');

CREATE INDEX requests_ended
    ON requests (ended_at) WHERE ended_at IS NOT NULL;
