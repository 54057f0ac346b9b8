-- Version 6: each workspace counts the requests it stores, so that
-- `--max-requests-per-workspace` is one read of the workspace's row; every insert and
-- delete of a request keeps the count in its own transaction. The index finds a runtime's
-- requests: the answers from its catalog that can be handed out again, the count of a
-- runtime being deleted, and the rows its ON DELETE CASCADE removes.
ALTER TABLE workspaces ADD COLUMN stored_requests BIGINT NOT NULL DEFAULT 0;
UPDATE workspaces SET stored_requests =
    (SELECT count(*) FROM requests JOIN runtimes ON runtimes.id = requests.runtime_id
      WHERE runtimes.workspace_id = workspaces.id);
CREATE INDEX requests_by_runtime ON requests (runtime_id, cached_at);
