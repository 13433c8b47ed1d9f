//! [`ChangeSource`]: where a node's local changes come from.

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{Batch, Hlc};

/// Local changes ready to publish, with the token that acknowledges them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Whole committed transactions, as one batch.
    pub batch: Batch,
    /// Pass to [`ChangeSource::acknowledge`] once the batch is durably published.
    pub through: Hlc,
}

/// Where local changes come from.
///
/// # Contract
///
/// - [`pending`](ChangeSource::pending) returns every change committed after the last
///   acknowledged point, as a union of **whole** transactions (never part of one), read
///   from one consistent snapshot. It returns `None` when nothing is pending. Calling it
///   again before acknowledging returns the same changes, possibly followed by newer ones.
/// - [`acknowledge`](ChangeSource::acknowledge) records that everything up to `through` is
///   published; those changes are not returned again by this instance. Acknowledging an
///   older point than already acknowledged is a no-op.
/// - [`flush`](ChangeSource::flush) makes the acknowledgements durable. After a crash,
///   changes acknowledged but not flushed may be returned again.
/// - Changes are never lost: a crash before `acknowledge` (or `flush`) returns means they
///   are returned again after restart (and published again; the merge is idempotent).
#[async_trait]
pub trait ChangeSource: Send {
    /// Changes committed after the last acknowledged point, or `None`.
    async fn pending(&mut self) -> Result<Option<Pending>>;

    /// Records that everything up to `through` is durably published.
    async fn acknowledge(&mut self, through: Hlc) -> Result<()>;

    /// Makes the acknowledgements so far durable.
    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}
