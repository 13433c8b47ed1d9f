//! [`EmbeddedOptions`]: how the embedded `nats-server` is laid out and supervised.

use std::path::PathBuf;
use std::time::Duration;

/// Marmot v1's default client listen address: any host, a random port.
pub const RANDOM_PORT_BIND: &str = ":-1";

/// Settings of the embedded `nats-server` (Marmot v1's `[nats]` keys and cluster flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// This node's id; the server is named `marmot-node-<node_id>`.
    pub node_id: u64,
    /// The directory of the database (`db_path`); the JetStream store lives under
    /// `<data_dir>/nats/marmot-node-<node_id>` and the generated config next to it.
    pub data_dir: PathBuf,
    /// Client listen address `host:port` (`nats.bind_address`). A port of `-1` (as in the
    /// default `:-1`) picks a free port; an empty host means loopback for `:-1` and all
    /// interfaces otherwise.
    pub bind_address: String,
    /// Cluster listen address `host:port` (`-cluster-addr`); the leaf-node listener takes
    /// the next port. `None`: a standalone server.
    pub cluster_addr: Option<String>,
    /// Routes to the other servers (`-cluster-peers`): `nats://host:port` or
    /// `dns://host:port/?min=N&interval_ms=M`.
    pub cluster_peers: Vec<String>,
    /// Remotes to join as a leaf node (`-leaf-servers`): `nats://` or `dns://` URLs, with
    /// `?hub=true` to treat the remote as the hub.
    pub leaf_servers: Vec<String>,
    /// An extra nats-server config file included after the generated settings
    /// (`nats.server_config`); its settings win.
    pub server_config: Option<PathBuf>,
    /// The `nats-server` binary (`nats.server_path`); `None`: found on `PATH`.
    pub server_path: Option<PathBuf>,
    /// Longest wait for JetStream to become ready after a start.
    pub ready_timeout: Duration,
    /// Longest wait for the server to exit after SIGTERM before it is killed.
    pub stop_timeout: Duration,
    /// Longest wait before restarting a server that keeps dying.
    pub restart_backoff_max: Duration,
}

impl EmbeddedOptions {
    /// Options for node `node_id` storing under `data_dir`, with Marmot v1's defaults.
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>) -> Self {
        EmbeddedOptions {
            node_id,
            data_dir: data_dir.into(),
            bind_address: RANDOM_PORT_BIND.to_string(),
            cluster_addr: None,
            cluster_peers: Vec::new(),
            leaf_servers: Vec::new(),
            server_config: None,
            server_path: None,
            ready_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
            restart_backoff_max: Duration::from_secs(10),
        }
    }

    /// `marmot-node-<node_id>`.
    pub fn server_name(&self) -> String {
        format!("marmot-node-{}", self.node_id)
    }

    /// `<data_dir>/nats/marmot-node-<node_id>`: the JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("nats").join(self.server_name())
    }
}
