-- Version 5: tokens that can be listed, revoked and rotated. Each API token gets a stable,
-- public id (the first 16 hex digits of its hash: see `TokenHash::id`, derived in SQL the
-- same way for the tokens stored before ids existed) and the time it was last used
-- (written at most once a minute per token, so that a call does not become a write).
ALTER TABLE api_tokens ADD COLUMN id TEXT;
UPDATE api_tokens SET id = substr(token_hash, 1, 16);
ALTER TABLE api_tokens ALTER COLUMN id SET NOT NULL;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_id_key UNIQUE (id);
ALTER TABLE api_tokens ADD COLUMN last_used_at BIGINT;
