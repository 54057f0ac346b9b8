-- Version 4: the model catalog. A report may be a static stand-in list (`fallback`); an
-- answer from the catalog is a stored request of its own, which says when the catalog was
-- reported (`cached_at`) and which discovery it started in the background (`refresh_id`).
ALTER TABLE requests ADD COLUMN fallback BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE requests ADD COLUMN cached_at BIGINT;
ALTER TABLE requests ADD COLUMN refresh_id TEXT;

-- Each runtime's last good model list, written in the transaction of the report that
-- earned it.
CREATE TABLE catalogs (
    runtime_id   TEXT PRIMARY KEY REFERENCES runtimes (id) ON DELETE CASCADE,
    models       TEXT NOT NULL,
    supported    BOOLEAN NOT NULL,
    reported_at  BIGINT NOT NULL
);
