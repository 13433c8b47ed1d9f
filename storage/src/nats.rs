//! [`NatsSnapshotStore`]: snapshots in a NATS JetStream object store bucket (Marmot v1's
//! default store).
//!
//! The bucket (`[snapshot.nats] bucket`, by default `<stream_prefix>-snapshot-store`) is
//! created on [`open`](NatsSnapshotStore::open) when missing, with file storage and the
//! configured replicas. The store shares the caller's NATS connection, so it inherits its
//! authentication, TLS and reconnection.
//!
//! Atomicity comes from JetStream's object store: an object's chunks are published under
//! a fresh id and become visible only when its metadata is published last; a replaced
//! object's old chunks are purged afterwards (a reader still streaming the old version may
//! then fail, retryably). A download streams chunk by chunk and the library checks the
//! SHA-256 digest at the end.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::object_store::{self, DeleteErrorKind, GetErrorKind, ObjectStore};
use async_nats::jetstream::{self, stream::StorageType};
use async_trait::async_trait;
use futures::StreamExt;
use marmot_core::{Error, ObjectInfo, Result, SnapshotStore};
use tokio::io::AsyncReadExt;

use crate::local::{open_source, LocalSink};
use crate::names::check_name;
use crate::store_error;

/// Bytes per object chunk (one JetStream message each).
pub const CHUNK_BYTES: usize = 128 * 1024;

/// While a download receives nothing, how often it checks whether the object was replaced.
pub const GET_STALL_CHECK: Duration = Duration::from_secs(1);
/// How long a download may receive nothing before it fails.
pub const GET_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The NATS object store's settings: Marmot v1's `[snapshot.nats]`, and the connection.
#[derive(Clone)]
pub struct NatsOptions {
    /// The JetStream context over the node's NATS connection.
    pub jetstream: jetstream::Context,
    /// Bucket name (v1: empty means `<stream_prefix>-snapshot-store`; the caller resolves it).
    pub bucket: String,
    /// Replicas of the bucket's stream when it is created.
    pub replicas: usize,
}

impl NatsOptions {
    /// Options for `bucket` with one replica over `client`'s connection.
    pub fn new(client: async_nats::Client, bucket: impl Into<String>) -> NatsOptions {
        NatsOptions { jetstream: jetstream::new(client), bucket: bucket.into(), replicas: 1 }
    }

    /// Marmot v1's default bucket name: `<stream_prefix>-snapshot-store`.
    pub fn default_bucket(stream_prefix: &str) -> String {
        format!("{stream_prefix}-snapshot-store")
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("bucket", &self.bucket)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

/// A [`SnapshotStore`] over a JetStream object store bucket.
pub struct NatsSnapshotStore {
    bucket: ObjectStore,
    name: String,
}

impl NatsSnapshotStore {
    /// Opens the bucket, creating it when missing.
    pub async fn open(options: NatsOptions) -> Result<NatsSnapshotStore> {
        let name = options.bucket.clone();
        let bucket = match options.jetstream.get_object_store(&name).await {
            Ok(bucket) => bucket,
            Err(_) => {
                let config = object_store::Config {
                    bucket: name.clone(),
                    description: Some("Marmot snapshots".to_string()),
                    storage: StorageType::File,
                    num_replicas: options.replicas.max(1),
                    ..Default::default()
                };
                options
                    .jetstream
                    .create_object_store(config)
                    .await
                    .map_err(|e| store_error(format!("nats object store {name:?}: create bucket: {e}"), true))?
            }
        };
        Ok(NatsSnapshotStore { bucket, name })
    }

    /// Copies `object` into `sink`. When a put replaces the object meanwhile, its old
    /// chunks are purged and the reader would wait forever: while no chunk arrives, the
    /// object's current version is checked every [`GET_STALL_CHECK`], and the download
    /// fails (retryably) when it changed or after [`GET_IDLE_TIMEOUT`] without data.
    async fn copy_watching_replacement(
        &self,
        name: &str,
        object: &mut object_store::Object,
        sink: &mut LocalSink,
    ) -> Result<()> {
        let nuid = object.info().nuid.clone();
        let mut buf = vec![0u8; CHUNK_BYTES];
        let mut idle = Duration::ZERO;
        loop {
            match tokio::time::timeout(GET_STALL_CHECK, object.read(&mut buf)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => {
                    idle = Duration::ZERO;
                    sink.write(&buf[..n]).await?;
                }
                Ok(Err(e)) => return Err(self.error("get", name, e, true)),
                Err(_) => {
                    idle += GET_STALL_CHECK;
                    let current = self.bucket.info(name).await.ok().filter(|i| !i.deleted);
                    if current.is_none_or(|i| i.nuid != nuid) {
                        let why = "the object was replaced or deleted during the download";
                        return Err(self.error("get", name, why, true));
                    }
                    if idle >= GET_IDLE_TIMEOUT {
                        let why = format!("no data for {idle:?}");
                        return Err(self.error("get", name, why, true));
                    }
                }
            }
        }
    }

    fn error(&self, op: &str, name: &str, e: impl fmt::Display, retryable: bool) -> Error {
        store_error(format!("nats object store {:?}: {op} {name:?}: {e}", self.name), retryable)
    }
}

impl fmt::Display for NatsSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nats object store {}", self.name)
    }
}

impl fmt::Debug for NatsSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSnapshotStore").field("bucket", &self.name).finish()
    }
}

#[async_trait]
impl SnapshotStore for NatsSnapshotStore {
    async fn put(&self, name: &str, from: &Path) -> Result<()> {
        check_name(name)?;
        let (file, _size) = open_source(from).await?;
        let meta = object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some(CHUNK_BYTES),
            ..Default::default()
        };
        let mut reader = tokio::io::BufReader::with_capacity(CHUNK_BYTES, file);
        self.bucket.put(meta, &mut reader).await.map_err(|e| {
            let retryable = e.kind() != object_store::PutErrorKind::InvalidName;
            self.error("put", name, e, retryable)
        })?;
        Ok(())
    }

    async fn get(&self, name: &str, to: &Path) -> Result<()> {
        check_name(name)?;
        let mut object = self.bucket.get(name).await.map_err(|e| match e.kind() {
            GetErrorKind::NotFound => Error::NotFound(format!("{name} in {self}")),
            GetErrorKind::InvalidName | GetErrorKind::BucketLink => self.error("get", name, e, false),
            _ => self.error("get", name, e, true),
        })?;
        let mut sink = LocalSink::create(to).await?;
        self.copy_watching_replacement(name, &mut object, &mut sink).await?;
        sink.commit().await
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>> {
        let mut listing = self.bucket.list().await.map_err(|e| self.error("list", "", e, true))?;
        let mut out = Vec::new();
        while let Some(info) = listing.next().await {
            let info = info.map_err(|e| self.error("list", "", e, true))?;
            if !info.deleted {
                out.push(ObjectInfo { name: info.name, size_bytes: info.size as u64 });
            }
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<()> {
        check_name(name)?;
        match self.bucket.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == DeleteErrorKind::NotFound => Ok(()),
            Err(e) => {
                let retryable = e.kind() != DeleteErrorKind::InvalidName;
                Err(self.error("delete", name, e, retryable))
            }
        }
    }
}
