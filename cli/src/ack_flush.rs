//! Making acknowledgements visible soon: the engine keeps "published through" in memory
//! and writes it to `__marmot__state` only when flushed, so that publishing never waits
//! for the application's write lock. Applications that check `__marmot__replication`
//! (docs/write-acknowledgement.md) and `marmot wait` read that row, so the node loop
//! flushes shortly after each publish: at most every [`ACK_FLUSH_EVERY`] while batches
//! are being acknowledged, and every [`IDLE_FLUSH_EVERY`] otherwise (which also stores
//! the positions of this node's own batches read back from the stream).
//!
//! A failed flush (the application holding its write lock too long) is logged and tried
//! again at the next step; nothing is lost, the acknowledgement stays in memory.

use std::time::{Duration, Instant};

use marmot_core::engine::Engine;
use marmot_core::sqlite::SqliteChangeSource;
use tracing::debug;

/// Shortest interval between flushes while batches are being acknowledged.
pub const ACK_FLUSH_EVERY: Duration = Duration::from_millis(25);
/// Interval between flushes when nothing was published meanwhile.
pub const IDLE_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Tracks what was flushed and when.
pub struct AckFlush {
    last: Instant,
    flushed_batches: u64,
}

impl Default for AckFlush {
    fn default() -> Self {
        AckFlush { last: Instant::now(), flushed_batches: 0 }
    }
}

impl AckFlush {
    /// Flushes the engine's acknowledgements and deferred positions when due.
    pub async fn maybe_flush(&mut self, engine: &mut Engine<SqliteChangeSource>) {
        let published = engine.stats().batches_published;
        let elapsed = self.last.elapsed();
        let due = (published > self.flushed_batches && elapsed >= ACK_FLUSH_EVERY) || elapsed >= IDLE_FLUSH_EVERY;
        if !due {
            return;
        }
        self.last = Instant::now();
        match engine.flush().await {
            Ok(()) => self.flushed_batches = published,
            Err(e) => debug!(error = %e, "could not record acknowledgements yet; retrying"),
        }
    }
}
