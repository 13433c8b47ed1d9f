//! [`SnapshotStore`]: named blobs that hold database snapshots.

use std::path::Path;

use async_trait::async_trait;

use crate::error::Result;

/// A stored object's name and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's name, as given to [`SnapshotStore::put`].
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// Named blobs: put a file, get a file, list, delete.
///
/// # Contract
///
/// - [`put`](SnapshotStore::put) returns once the whole object is durably stored; no
///   reader ever observes a partially written object under `name`. Putting an existing
///   name replaces it.
/// - [`get`](SnapshotStore::get) writes the complete object to `to` or fails with
///   [`Error::NotFound`](crate::Error::NotFound) / [`Error::Store`](crate::Error::Store);
///   implementations stream, never holding a whole object in memory.
/// - [`list`](SnapshotStore::list) returns every stored object; order is unspecified.
/// - [`delete`](SnapshotStore::delete) of a missing name succeeds.
/// - Error messages never contain credentials.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Stores the file at `from` under `name`.
    async fn put(&self, name: &str, from: &Path) -> Result<()>;
    /// Writes the object `name` to the file `to`.
    async fn get(&self, name: &str, to: &Path) -> Result<()>;
    /// Lists the stored objects.
    async fn list(&self) -> Result<Vec<ObjectInfo>>;
    /// Deletes the object `name`.
    async fn delete(&self, name: &str) -> Result<()>;
}
