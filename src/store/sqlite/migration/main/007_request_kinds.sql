-- Version 7: a request has a kind (DESIGN.md, "Request kinds"): every row so far is a
-- model list. A kind's input and its result (every kind's but `models`, whose result has
-- the columns of version 1) are JSON text. There is no CHECK on `kind`: a new kind is a
-- row in the service's table of kinds, not a schema change; the service refuses a name it
-- does not know when it reads one. At most one active request per runtime, kind and
-- coalescing key (a skill import's `skill_key`; empty for the other kinds).
ALTER TABLE requests ADD COLUMN kind TEXT NOT NULL DEFAULT 'models';
ALTER TABLE requests ADD COLUMN coalesce_key TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN input TEXT;
ALTER TABLE requests ADD COLUMN result TEXT;
DROP INDEX requests_one_active_per_runtime;
CREATE UNIQUE INDEX requests_one_active
    ON requests (runtime_id, kind, coalesce_key) WHERE status IN ('pending', 'running');
DROP INDEX requests_pending_by_runtime;
CREATE INDEX requests_pending_by_runtime
    ON requests (runtime_id, kind, created_at) WHERE status = 'pending';
DROP INDEX requests_ended;
CREATE INDEX requests_ended
    ON requests (kind, ended_at) WHERE ended_at IS NOT NULL;
