//! A lease in a NATS key-value bucket: at most one holder at a time, expiring on its own
//! when the holder dies (the bucket's `max_age`). Snapshots are saved under it so that
//! only one node saves at a time.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use marmot_core::{Error, Result};
use tracing::debug;

/// A held lease; renew it before `ttl` passes, release it when done.
pub struct Lease {
    store: kv::Store,
    key: String,
    revision: u64,
}

fn kv_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::transport(format!("lease: {what}: {e}"))
}

/// The lease bucket, created when missing; entries expire `ttl` after their last write.
pub async fn lease_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.to_owned(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas.max(1),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| kv_error("creating the bucket", e))
}

/// Takes the lease `key` for `holder` if nobody holds it. `Ok(None)`: someone else does.
pub async fn try_acquire(store: &kv::Store, key: &str, holder: &str) -> Result<Option<Lease>> {
    match store.create(key, Bytes::from(holder.to_owned())).await {
        Ok(revision) => {
            debug!(key, holder, "lease acquired");
            Ok(Some(Lease { store: store.clone(), key: key.to_owned(), revision }))
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(kv_error("acquiring", e)),
    }
}

impl Lease {
    /// Extends the lease by another `ttl`; fails if it was lost (expired and taken).
    pub async fn renew(&mut self) -> Result<()> {
        let holder = self.store.get(&self.key).await.map_err(|e| kv_error("renewing", e))?.unwrap_or_default();
        self.revision =
            self.store.update(&self.key, holder, self.revision).await.map_err(|e| kv_error("renewing", e))?;
        Ok(())
    }

    /// Runs `work` while renewing the lease every `every` (a third of its time to live is a
    /// good choice), so that a long task keeps it; a failed renewal is logged and the work
    /// goes on (the lease only keeps two savers apart).
    pub async fn hold_while<T>(&mut self, every: Duration, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = tick.tick() => {
                    if let Err(e) = self.renew().await {
                        tracing::warn!(key = %self.key, error = %e, "could not renew the lease; carrying on");
                    } else {
                        debug!(key = %self.key, "lease renewed");
                    }
                }
            }
        }
    }

    /// Gives the lease up, if it is still this holder's: a lease that expired and was
    /// taken by another node meanwhile is left to that node (the purge names the revision
    /// this holder last wrote, and the server refuses it when the key moved on).
    pub async fn release(self) -> Result<()> {
        self.store.purge_expect_revision(&self.key, Some(self.revision)).await.map_err(|e| {
            kv_error("releasing (it expired and another node holds it now, or the server is unreachable)", e)
        })
    }
}
