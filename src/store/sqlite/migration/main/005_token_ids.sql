-- Version 5: tokens that can be listed, revoked and rotated. Each API token gets a stable,
-- public id (the first 16 hex digits of its hash: see `TokenHash::id`, derived in SQL the
-- same way for the tokens stored before ids existed) and the time it was last used
-- (written at most once a minute per token, so that a call does not become a write).
-- SQLite cannot add a NOT NULL UNIQUE column to a table, so the table is rebuilt; nothing
-- refers to it.
CREATE TABLE api_tokens_5 (
    token_hash    TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    created_at    BIGINT NOT NULL,
    id            TEXT NOT NULL UNIQUE,
    last_used_at  BIGINT
);
INSERT INTO api_tokens_5 (token_hash, workspace_id, created_at, id)
    SELECT token_hash, workspace_id, created_at, substr(token_hash, 1, 16) FROM api_tokens;
DROP TABLE api_tokens;
ALTER TABLE api_tokens_5 RENAME TO api_tokens;
