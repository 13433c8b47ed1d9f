//! The commit-point sampler: a thread that records the capture log's last version after
//! local commits, so that a node whose application writes faster than it publishes sends
//! bounded batches (see [`CommitPoints`]) instead of one batch the size of its backlog.
//!
//! It runs beside the node loop because that loop waits on each publish: points sampled
//! only between publishes would all be the end of the backlog. It reads through its own
//! connection, outside any transaction, never writes, and samples at most once per
//! [`SAMPLE_EVERY_MIN`]; a failed sample only costs a cut point.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use marmot_core::sqlite::CommitPoints;
use rusqlite::Connection;
use tracing::debug;

/// Shortest time between two samples (about one point per millisecond of writing).
pub const SAMPLE_EVERY_MIN: Duration = Duration::from_millis(1);

/// Where file notifications wake the current sampler (one per opened engine).
pub type Waker = Arc<Mutex<Option<Thread>>>;

/// A running sampler; dropping it stops the thread.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    waker: Waker,
}

impl Sampler {
    /// Starts sampling `db_path` into `points`: when `waker` is woken (by file
    /// notifications) and at least every `idle`.
    pub fn start(db_path: &Path, points: Arc<CommitPoints>, waker: Waker, idle: Duration) -> Option<Sampler> {
        let conn = match Connection::open(db_path) {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "commit-point sampler unavailable; a backlog is published as one batch");
                return None;
            }
        };
        let _ = conn.busy_timeout(Duration::from_millis(50));
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("commit-points".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    std::thread::park_timeout(idle);
                    if let Err(e) = points.sample(&conn) {
                        debug!(error = %e, "could not sample a commit point");
                    }
                    std::thread::sleep(SAMPLE_EVERY_MIN);
                }
            })
            .ok()?;
        *waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread.thread().clone());
        Some(Sampler { stop, thread: Some(thread), waker })
    }
}

/// Wakes the sampler registered in `waker`, if any (called on each file notification).
pub fn wake(waker: &Waker) {
    if let Some(t) = waker.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        t.unpark();
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.unpark();
        }
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}
