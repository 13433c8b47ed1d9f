//! [`LogTransport`]: a set of append-only, ordered, durable logs ("shards").

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::model::{Position, Shard};

/// One entry read from a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's position in its shard (1-based, strictly increasing).
    pub position: Position,
    /// The bytes that were published.
    pub payload: Bytes,
}

/// The range of positions a shard still holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// The first position still held. For an empty log that never held anything this is 1.
    pub first: Position,
    /// The last position ever assigned (0 when nothing was ever published).
    pub last: Position,
    /// Identifies this incarnation of the shard's log (JetStream: the stream's creation
    /// time). A log deleted and created again (its data lost) has another epoch, and
    /// positions stored against the old one mean nothing in it. 0: unknown.
    pub epoch: u64,
}

impl Bounds {
    /// True when a consumer that has processed everything up to `done` can continue
    /// without missing entries.
    pub fn can_resume_after(&self, done: Position) -> bool {
        done.0 + 1 >= self.first.0 || done >= self.last
    }
}

/// A set of append-only, ordered, durable logs ("shards").
///
/// # Contract
///
/// - **Durability.** When [`publish`](LogTransport::publish) returns `Ok(p)`, the entry is
///   durably stored at position `p` and every later subscription that starts at or before
///   `p` delivers it (unless the log has since truncated it, see [`bounds`](Self::bounds)).
///   An `Err` means nothing is promised: the entry may or may not be stored, so callers
///   retry with the same `id`.
/// - **Deduplication.** Publishing again with an `id` already stored in the same shard
///   (within the transport's duplicate window) stores nothing new and returns the
///   position of the stored entry.
/// - **Order.** Within a shard, positions are strictly increasing in the order the entries
///   were stored, and subscriptions deliver entries in position order, each once per
///   subscription, without gaps other than truncation. There is no order across shards.
/// - **Concurrency.** `publish` may be called concurrently (pipelining): each call
///   completes independently.
/// - **Truncation.** A log may drop its oldest entries. [`bounds`](Self::bounds) reports the
///   first entry still held; [`subscribe`](Self::subscribe) fails with
///   [`Error::Truncated`](crate::Error::Truncated) when asked to resume after a position
///   whose successor is gone.
/// - **Errors.** [`Error::Transport`](crate::Error::Transport) with `retryable = true` for
///   connection trouble; callers retry with backoff and never treat it as success.
#[async_trait]
pub trait LogTransport: Send + Sync {
    /// Number of shards; shards are `0..shard_count()`.
    fn shard_count(&self) -> u32;

    /// Appends `payload` to `shard` and returns its position once it is durable.
    /// `id` identifies the entry for deduplication.
    async fn publish(&self, shard: Shard, id: &str, payload: Bytes) -> Result<Position>;

    /// Starts reading `shard` with the entry after `after` (`Position(0)`: from the start).
    async fn subscribe(&self, shard: Shard, after: Position) -> Result<Box<dyn Subscription>>;

    /// The first and last positions `shard` holds now.
    async fn bounds(&self, shard: Shard) -> Result<Bounds>;
}

/// An ordered reader of one shard, created by [`LogTransport::subscribe`].
#[async_trait]
pub trait Subscription: Send {
    /// Returns up to `max` next entries in order. Waits at most `wait` for the first one
    /// and returns an empty vector if none arrived by then. An entry is returned once.
    /// If the log dropped entries this subscription had not delivered yet, it fails with
    /// [`Error::Truncated`](crate::Error::Truncated) (and keeps failing).
    async fn next_entries(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>>;
}
