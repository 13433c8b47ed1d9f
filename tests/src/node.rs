//! `marmot` side-car processes: their configuration file, start, SIGKILL, SIGTERM,
//! restart, and waiting for the replication loop to run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::process::{kill, log_tail, print_tail, signal, spawn_logged, wait_exit};
use crate::{marmot_bin, poll, LOG_TAIL_LINES};

/// What a node's `config.toml` says.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `node_id`.
    pub node_id: u64,
    /// `db_path`.
    pub db_path: PathBuf,
    /// `nats.urls`; empty starts the embedded server.
    pub nats_urls: Vec<String>,
    /// `replication_log.shards`.
    pub shards: u32,
    /// `replication_log.replicas`.
    pub replicas: i64,
    /// `replication_log.max_entries`.
    pub max_entries: u64,
    /// `nats.server_config`: a file the embedded server's configuration includes.
    pub server_config: Option<PathBuf>,
    /// More TOML appended as is (top-level keys must not follow a table header, so put
    /// whole tables here).
    pub extra: String,
    /// TOML lines for top-level keys (`tombstone_retention = 3000`), before any section.
    pub top: String,
}

impl NodeConfig {
    /// Node `node_id` on `db_path`, one shard, one replica, a log long enough that no
    /// test needs a snapshot.
    pub fn new(node_id: u64, db_path: &Path) -> NodeConfig {
        NodeConfig {
            node_id,
            db_path: db_path.to_path_buf(),
            nats_urls: Vec::new(),
            shards: 1,
            replicas: 1,
            max_entries: 1_000_000,
            server_config: None,
            extra: String::new(),
            top: String::new(),
        }
    }

    /// Connects to external servers at `urls` instead of starting an embedded one.
    pub fn with_urls(mut self, urls: Vec<String>) -> NodeConfig {
        self.nats_urls = urls;
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let urls: Vec<String> = self.nats_urls.iter().map(|u| quote(u)).collect();
        let mut out = String::new();
        let _ = writeln!(out, "db_path = {}", quote(&self.db_path.to_string_lossy()));
        let _ = writeln!(out, "node_id = {}", self.node_id);
        out.push_str(&self.top);
        let _ = writeln!(out, "\n[replication_log]");
        let _ = writeln!(out, "shards = {}", self.shards);
        let _ = writeln!(out, "replicas = {}", self.replicas);
        let _ = writeln!(out, "max_entries = {}", self.max_entries);
        let _ = writeln!(out, "\n[nats]");
        let _ = writeln!(out, "urls = [{}]", urls.join(", "));
        if let Some(file) = &self.server_config {
            let _ = writeln!(out, "server_config = {}", quote(&file.to_string_lossy()));
        }
        let _ = writeln!(out, "\n[logging]\nverbose = false\nformat = \"console\"");
        out.push_str(&self.extra);
        out
    }
}

/// A `marmot -config <file> [args]` child process; its stdout and stderr go to
/// `<dir>/node-<id>.log` (appended across restarts).
pub struct Node {
    name: String,
    config_path: PathBuf,
    db: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// Length of the log when the current process started.
    log_offset: usize,
}

impl Node {
    /// Writes `config` to `<dir>/node-<id>.toml` and starts `marmot` with it and `args`.
    pub fn start(dir: &Path, config: &NodeConfig, args: &[String]) -> Node {
        let name = format!("node-{}", config.node_id);
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, config.to_toml()).expect("write a node config");
        let mut node = Node {
            log: dir.join(format!("{name}.log")),
            name,
            config_path,
            db: config.db_path.clone(),
            args: args.to_vec(),
            child: None,
            log_offset: 0,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.log_offset = std::fs::metadata(&self.log).map(|m| m.len() as usize).unwrap_or(0);
        let mut cmd = Command::new(marmot_bin());
        cmd.arg("-config").arg(&self.config_path).args(&self.args).env_remove("RUST_LOG");
        self.child = Some(spawn_logged(&mut cmd, &self.log, None));
    }

    /// `node-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's database.
    pub fn db(&self) -> &Path {
        &self.db
    }

    /// The node's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What the current process logged so far.
    pub fn log_since_start(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&bytes[self.log_offset.min(bytes.len())..]).into_owned()
    }

    /// Panics (with the log's tail) unless the process is running.
    pub fn assert_running(&mut self) {
        let status = match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait"),
            None => panic!("{} is stopped", self.name),
        };
        if let Some(status) = status {
            panic!("{} exited ({status}); its log:\n{}", self.name, log_tail(&self.log, LOG_TAIL_LINES));
        }
    }

    /// Waits until the current process logs that its replication loop runs
    /// (`replicating shards=...`); panics if it exits first or after `timeout`.
    pub fn wait_replicating(&mut self, timeout: Duration) {
        let ready = poll(timeout, || {
            self.assert_running();
            self.log_since_start().contains("replicating shards=")
        });
        assert!(
            ready,
            "{} did not start replicating within {timeout:?}; its log:\n{}",
            self.name,
            log_tail(&self.log, LOG_TAIL_LINES)
        );
    }

    /// SIGKILLs the process (`kill -9`): no shutdown work at all.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }

    /// SIGTERMs the process and waits up to `timeout` for it to exit; returns its status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().unwrap_or_else(|| panic!("{} is stopped", self.name));
        signal(&child, libc::SIGTERM);
        match wait_exit(&mut child, timeout) {
            Some(status) => status,
            None => {
                kill(&mut child);
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM; its log:\n{}",
                    self.name,
                    log_tail(&self.log, LOG_TAIL_LINES)
                );
            }
        }
    }

    /// Starts the process again with the same configuration (after a kill or terminate;
    /// a running process is SIGKILLed first).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            print_tail(&self.name, &self.log);
        }
    }
}
