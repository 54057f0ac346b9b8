//! Rows as SQLite returns them, and their parsing into domain types.

use rusqlite::Row;

use super::super::{
    Result, kind_from_db, models_from_db, request_id_from_db, runtime_id_from_db, status_from_db,
    workspace_id_from_db,
};
use crate::clock::Millis;
use crate::model::{Runtime, StoredRequest};

/// A request row as SQLite returns it, before its text columns are parsed.
pub(super) struct RawRequest {
    id: String,
    runtime_id: String,
    status: String,
    models: Option<String>,
    supported: bool,
    error: Option<String>,
    created_at: Millis,
    updated_at: Millis,
    deadline_at: Millis,
    ended_at: Option<Millis>,
    fallback: bool,
    cached_at: Option<Millis>,
    refresh_id: Option<String>,
    kind: String,
    key: String,
    input: Option<String>,
    result: Option<String>,
}

impl RawRequest {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawRequest {
            id: row.get(0)?,
            runtime_id: row.get(1)?,
            status: row.get(2)?,
            models: row.get(3)?,
            supported: row.get(4)?,
            error: row.get(5)?,
            created_at: row.get(6)?,
            updated_at: row.get(7)?,
            deadline_at: row.get(8)?,
            ended_at: row.get(9)?,
            fallback: row.get(10)?,
            cached_at: row.get(11)?,
            refresh_id: row.get(12)?,
            kind: row.get(13)?,
            key: row.get(14)?,
            input: row.get(15)?,
            result: row.get(16)?,
        })
    }

    pub(super) fn parse(self) -> Result<StoredRequest> {
        Ok(StoredRequest {
            id: request_id_from_db(&self.id)?,
            runtime_id: runtime_id_from_db(&self.runtime_id)?,
            kind: kind_from_db(&self.kind)?,
            key: self.key,
            input: self.input,
            result: self.result,
            status: status_from_db(&self.status)?,
            models: models_from_db(self.models.as_deref())?,
            supported: self.supported,
            error: self.error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            deadline_at: self.deadline_at,
            ended_at: self.ended_at,
            fallback: self.fallback,
            cached_at: self.cached_at,
            refresh_id: self
                .refresh_id
                .as_deref()
                .map(request_id_from_db)
                .transpose()?,
        })
    }
}

/// A runtime row as SQLite returns it, before its ids are parsed.
pub(super) struct RawRuntime {
    id: String,
    workspace_id: String,
    name: String,
    provider: String,
    last_seen_at: Option<Millis>,
    created_at: Millis,
    catalog_at: Option<Millis>,
}

/// A runtime's columns, and when its catalog was reported (a lookup by primary key).
pub(super) const RUNTIME_COLUMNS: &str =
    "id, workspace_id, name, provider, last_seen_at, created_at,
     (SELECT reported_at FROM catalogs WHERE runtime_id = runtimes.id)";

impl RawRuntime {
    pub(super) fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawRuntime {
            id: row.get(0)?,
            workspace_id: row.get(1)?,
            name: row.get(2)?,
            provider: row.get(3)?,
            last_seen_at: row.get(4)?,
            created_at: row.get(5)?,
            catalog_at: row.get(6)?,
        })
    }

    pub(super) fn parse(self) -> Result<Runtime> {
        Ok(Runtime {
            id: runtime_id_from_db(&self.id)?,
            workspace_id: workspace_id_from_db(&self.workspace_id)?,
            name: self.name,
            provider: self.provider,
            last_seen_at: self.last_seen_at,
            created_at: self.created_at,
            catalog_at: self.catalog_at,
        })
    }
}
