//! The subcommands that inspect a node instead of running it: `status`, `watch`, `wait`,
//! `verify` and `conflicts`. They read the node's database read-only (never installing capture, never
//! writing) and reach NATS with the node's own `[nats]` settings: `nats.urls`, or, for a
//! node that runs the embedded server, the client address written in that server's
//! generated configuration (`<db dir>/nats/marmot-node-<id>.conf`).
//!
//! Connecting goes through [`NatsTransport`], so credentials and TLS work exactly as for
//! the node; like a starting node it creates the shard streams when they are missing.

pub mod conflicts;
pub mod status;
pub mod verify;
pub mod wait;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use marmot_transports::NatsTransport;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::config::Config;
use crate::flags::Command;

/// Runs `command` for the node `config` describes. Exit status 0 on success, 1 when the
/// command failed (its message is on stderr).
pub fn run(command: &Command, config: &Config) -> ExitCode {
    let result = match command {
        Command::Status { json, timeout } => runtime().and_then(|rt| rt.block_on(status::run(config, *json, *timeout))),
        Command::Watch { table, json, from_now } => {
            runtime().and_then(|rt| rt.block_on(watch::run(config, table, *json, *from_now)))
        }
        Command::Wait { timeout } => wait::run(config, *timeout),
        Command::Conflicts { json, table, since, limit } => {
            conflicts::run(config, *json, table.as_deref(), *since, *limit)
        }
        Command::Verify { timeout, json } => {
            return match runtime().and_then(|rt| rt.block_on(verify::run(config, *timeout, *json))) {
                Ok(code) => ExitCode::from(code),
                Err(message) => {
                    eprintln!("marmot: {message}");
                    ExitCode::from(verify::EXIT_INCONCLUSIVE)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("marmot: {message}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Opens the database read-only: nothing a command does can change it.
pub(crate) fn open_readonly(path: &Path) -> Result<Connection, String> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| format!("cannot open {} read-only: {e}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(conn)
}

/// Whether Marmot's tables exist (a node has run on this database).
pub(crate) fn capture_installed(conn: &Connection) -> Result<bool, String> {
    conn.query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '__marmot__state'", [], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
        .map_err(|e| format!("reading the schema: {e}"))
}

/// The highest durably published local version, and the highest local version captured
/// (published or not): what `__marmot__replication` shows.
pub(crate) fn published_and_local(conn: &Connection) -> Result<(u64, u64), String> {
    conn.query_row(
        "SELECT s.value, max(coalesce((SELECT max(hlc) FROM __marmot__log), 0), s.value) \
         FROM __marmot__state AS s WHERE s.key = 'published_hlc'",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .map_err(|e| format!("reading __marmot__state: {e}"))
}

/// Where the NATS servers of this node are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NatsTarget {
    /// `nats.urls`.
    Configured(Vec<String>),
    /// The embedded server's client URL, read from its generated configuration.
    Embedded(String),
    /// The node uses the embedded server, but it has never been started here.
    EmbeddedUnknown(PathBuf),
}

impl NatsTarget {
    /// Finds the servers of the node `config` describes.
    pub(crate) fn of(config: &Config) -> NatsTarget {
        if !config.embedded_nats() {
            return NatsTarget::Configured(config.nats.urls.clone());
        }
        let conf = embedded_config_path(config);
        match std::fs::read_to_string(&conf).ok().as_deref().and_then(client_listen) {
            Some(addr) => NatsTarget::Embedded(format!("nats://{}", local_url(&addr))),
            None => NatsTarget::EmbeddedUnknown(conf),
        }
    }

    /// The URLs to connect to, if known.
    pub(crate) fn urls(&self) -> Vec<String> {
        match self {
            NatsTarget::Configured(urls) => urls.clone(),
            NatsTarget::Embedded(url) => vec![url.clone()],
            NatsTarget::EmbeddedUnknown(_) => Vec::new(),
        }
    }
}

/// `<db dir>/nats/marmot-node-<id>.conf`, as the node's embedded server writes it.
fn embedded_config_path(config: &Config) -> PathBuf {
    config.data_dir().join("nats").join(format!("{}.conf", config.server_name()))
}

/// The top-level `listen: "host:port"` of a generated nats-server configuration.
fn client_listen(conf: &str) -> Option<String> {
    conf.lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .find_map(|l| l.strip_prefix("listen:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
}

/// A listen address as a local client reaches it (all interfaces → loopback).
fn local_url(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some(("" | "0.0.0.0" | "[::]" | "::", port)) => format!("127.0.0.1:{port}"),
        _ => addr.to_owned(),
    }
}

/// Connects with the node's settings under another client name. `None` waits as long as
/// it takes (the transport retries unreachable servers forever).
pub(crate) async fn connect(
    config: &Config,
    urls: Vec<String>,
    tool: &str,
    timeout: Option<Duration>,
) -> Result<NatsTransport, String> {
    let mut opts = crate::run::nats_options(config, urls.clone());
    opts.client_name = Some(format!("marmot-{tool}-{}", config.node_id));
    let connecting = NatsTransport::connect(opts);
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, connecting)
            .await
            .map_err(|_| format!("NATS at {} not reachable within {t:?}", urls.join(",")))?,
        None => connecting.await,
    };
    result.map_err(|e| format!("NATS at {}: {e}", urls.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_client_address_is_read_from_the_generated_config() {
        let conf =
            "server_name: \"marmot-node-1\"\nlisten: \"127.0.0.1:40000\"\ncluster {\n  listen: \"0.0.0.0:4221\"\n}\n";
        assert_eq!(client_listen(conf).as_deref(), Some("127.0.0.1:40000"));
        assert_eq!(local_url("0.0.0.0:4222"), "127.0.0.1:4222");
        assert_eq!(local_url(":4222"), "127.0.0.1:4222");
        assert_eq!(local_url("10.0.0.1:4222"), "10.0.0.1:4222");
        assert_eq!(client_listen("cluster {\n  listen: \"x:1\"\n}\n"), None);
    }
}
