//! ENTRY POINT FOR THE NODE WIRING — a stub, to be replaced.
//!
//! `main` calls [`run`] once the configuration is loaded and validated, logging is set up
//! and notices are logged. The replacement owns everything after that: the tokio runtime,
//! the embedded `nats-server` (when `config.nats.urls` is empty; `flags.cluster_addr`,
//! `flags.cluster_peers`, `flags.leaf_servers`), the transport, the snapshot store, the
//! engine, metrics, signals, and the one-shot modes (`flags.cleanup`,
//! `flags.save_snapshot`, `flags.command`). `-pprof` has already been warned about.

use crate::config::Config;
use crate::flags::Flags;

/// What [`run`] may fail with; `main` logs it and exits with status 1.
pub type RunError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Runs the node (or the one-shot mode the flags select) until it stops.
pub fn run(config: Config, flags: Flags) -> Result<(), RunError> {
    tracing::error!(
        node_id = config.node_id,
        db_path = %config.db_path.display(),
        cleanup = flags.cleanup,
        save_snapshot = flags.save_snapshot,
        "node wiring not implemented yet"
    );
    Err("node wiring not implemented yet".into())
}
