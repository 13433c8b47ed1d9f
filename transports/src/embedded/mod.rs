//! [`EmbeddedServer`]: the `nats-server` child that `marmot` runs when no `nats.urls` are
//! configured, as Marmot v1 embeds one.
//!
//! Owns the child process, its generated configuration file
//! (`<data_dir>/nats/marmot-node-<id>.conf`), its log (`….log`) and its JetStream store
//! (`<data_dir>/nats/marmot-node-<id>/`). Starting waits until JetStream is ready.
//!
//! Tolerates: the child dying at any time (restarted with backoff on the same ports,
//! logged and counted in [`EmbeddedServer::restarts`]); `marmot` being killed (the
//! child gets SIGKILL through `PR_SET_PDEATHSIG` on Linux, so no orphan server stays);
//! cluster peers given by a DNS name that does not resolve yet (waits for it).
//! Reports: a missing binary (one line saying how to install it), a server that does not
//! become ready within `ready_timeout` (with the end of its log).

mod config;
mod options;
mod peers;
mod process;
mod ready;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use marmot_core::{Error, Result};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::CLUSTER_NAME;
pub use options::{EmbeddedOptions, RANDOM_PORT_BIND};
pub use peers::{DNS_INTERVAL_DEFAULT, DNS_MIN_DEFAULT};
pub use process::SERVER_BINARY;

use config::{LeafRemote, Listen, ServerConfig};

/// First wait before restarting a dead server; it doubles while restarts keep failing.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// A server that ran this long before dying is restarted without accumulated backoff.
const STABLE_RUN: Duration = Duration::from_secs(30);
/// How many lines of the server's log an error quotes.
const LOG_LINES_QUOTED: usize = 5;

/// What the supervisor shares with the handle.
#[derive(Default)]
struct Status {
    /// The running child's pid, 0 when none runs.
    pid: AtomicU32,
    /// Restarts after unexpected exits.
    restarts: AtomicU64,
}

/// Everything needed to (re)start the child.
struct Launch {
    binary: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    monitor: String,
    opts: EmbeddedOptions,
}

/// A supervised `nats-server` child process. Dropping it stops the server.
pub struct EmbeddedServer {
    client_url: String,
    server_name: String,
    launch: Arc<Launch>,
    status: Arc<Status>,
    shutdown: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
}

impl EmbeddedServer {
    /// Writes the configuration, starts the server and waits until JetStream is ready.
    /// Resolving `dns://` peers waits until they resolve to enough addresses.
    pub async fn start(opts: EmbeddedOptions) -> Result<EmbeddedServer> {
        let binary = process::find_binary(opts.server_path.as_deref())?;
        let server = build_config(&opts).await?;
        let nats_dir = opts.data_dir.join("nats");
        let config_path = nats_dir.join(format!("{}.conf", opts.server_name()));
        let log_path = nats_dir.join(format!("{}.log", opts.server_name()));
        let mut server = server;
        if let Some(extra) = &opts.server_config {
            server.include = Some(include_path(&nats_dir, extra)?);
        }
        create_dir(&server.store_dir)?;
        std::fs::write(&config_path, config::render(&server))
            .map_err(|source| Error::Io { context: format!("write {}", config_path.display()), source })?;
        let launch =
            Arc::new(Launch { binary, config_path, log_path, monitor: server.monitor.addr(), opts: opts.clone() });
        let mut child = process::spawn(&launch.binary, &launch.config_path, &launch.log_path)?;
        let status = Arc::new(Status::default());
        status.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
        let ready = ready::wait(&launch.monitor, opts.ready_timeout, || matches!(child.try_wait(), Ok(None))).await;
        if !ready {
            let exited = child.try_wait().ok().flatten();
            process::stop(&mut child, opts.stop_timeout).await;
            return Err(match exited {
                Some(status) => failed_to_start(&launch, &status.to_string()),
                None => not_ready(&launch, opts.ready_timeout),
            });
        }
        let client_url = format!("nats://{}", server.client.local_url());
        info!(server = %opts.server_name(), url = %client_url, pid = ?child.id(),
              config = %launch.config_path.display(), "embedded nats-server ready");
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(supervise(child, launch.clone(), status.clone(), rx));
        Ok(EmbeddedServer {
            client_url,
            server_name: opts.server_name(),
            launch,
            status,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The URL clients on this machine connect to (`nats://127.0.0.1:<port>`).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// `marmot-node-<node_id>`.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.launch.config_path
    }

    /// The file the server's output goes to.
    pub fn log_path(&self) -> &Path {
        &self.launch.log_path
    }

    /// The pid of the running server, `None` while it is being restarted or stopped.
    pub fn pid(&self) -> Option<u32> {
        Some(self.status.pid.load(Ordering::SeqCst)).filter(|&p| p != 0)
    }

    /// How often the server was restarted after dying.
    pub fn restarts(&self) -> u64 {
        self.status.restarts.load(Ordering::SeqCst)
    }

    /// Waits until JetStream answers healthy, for at most `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        if ready::wait(&self.launch.monitor, timeout, || true).await {
            Ok(())
        } else {
            Err(not_ready(&self.launch, timeout))
        }
    }

    /// Stops the server (SIGTERM, SIGKILL after `stop_timeout`) and waits until it exited.
    pub async fn shutdown(mut self) {
        drop(self.shutdown.take());
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        // Closing the channel first makes the supervisor treat the exit as a stop.
        if self.shutdown.take().is_some() {
            if let Some(pid) = self.pid() {
                process::signal(pid, libc::SIGTERM);
            }
        }
    }
}

/// Listen addresses, routes and leaf remotes from the options.
/// The leaf-node listener's port: the cluster port plus this.
pub const LEAF_PORT_OFFSET: u16 = 1000;

async fn build_config(opts: &EmbeddedOptions) -> Result<ServerConfig> {
    let client = config::parse_listen("nats.bind_address", &opts.bind_address)?;
    let monitor = Listen { host: "127.0.0.1".into(), port: config::free_port("127.0.0.1")? };
    let cluster = match &opts.cluster_addr {
        Some(addr) => Some(config::parse_listen("cluster_addr", addr)?),
        None => None,
    };
    // Marmot v1 put the leaf-node listener on the cluster port + 1, which collides with the
    // next node's cluster port in its own Quick Start (4221, 4222, 4223); we use + 1000.
    let leaf_listen = cluster
        .as_ref()
        .and_then(|c| Some(Listen { host: c.host.clone(), port: c.port.checked_add(LEAF_PORT_OFFSET)? }));
    let mut routes = Vec::new();
    for peer in &opts.cluster_peers {
        routes.extend(peers::resolve(&peers::parse("cluster_peers", peer)?).await);
    }
    let mut leaf_remotes = Vec::new();
    for remote in &opts.leaf_servers {
        let parsed = peers::parse("leaf_servers", remote)?;
        let urls = peers::resolve(&parsed).await;
        leaf_remotes.push(LeafRemote { urls, hub: peers::is_hub(&parsed) });
    }
    Ok(ServerConfig {
        server_name: opts.server_name(),
        client,
        monitor,
        store_dir: opts.store_dir(),
        cluster,
        routes,
        leaf_listen,
        leaf_remotes,
        include: None,
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { context: format!("create {}", dir.display()), source })
}

/// The user's extra config as a path relative to the generated file's directory.
fn include_path(nats_dir: &Path, extra: &Path) -> Result<PathBuf> {
    create_dir(nats_dir)?;
    let canon = |p: &Path| {
        p.canonicalize().map_err(|source| Error::Io { context: format!("nats.server_config {}", p.display()), source })
    };
    Ok(config::relative_to(&canon(nats_dir)?, &canon(extra)?))
}

fn not_ready(launch: &Launch, timeout: Duration) -> Error {
    server_error(launch, &format!("embedded nats-server not ready within {timeout:?}"))
}

/// The server exited before it was ready (a port taken, a bad `server_config`, …).
fn failed_to_start(launch: &Launch, status: &str) -> Error {
    server_error(launch, &format!("embedded nats-server exited during start ({status})"))
}

/// `what`, the log's path and its last lines, which name the cause.
fn server_error(launch: &Launch, what: &str) -> Error {
    let log = std::fs::read_to_string(&launch.log_path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(LOG_LINES_QUOTED).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Error::Transport {
        message: format!("{what} (log {}): {}", launch.log_path.display(), tail.join(" | ")),
        retryable: false,
    }
}

/// Restart delay after `failures` deaths in a row.
fn restart_delay(failures: u32, max: Duration) -> Duration {
    RESTART_BACKOFF_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(max)
}

/// Watches the child: restarts it when it dies, stops it when the handle goes away.
async fn supervise(mut child: Child, launch: Arc<Launch>, status: Arc<Status>, mut stop: watch::Receiver<bool>) {
    let opts = &launch.opts;
    let mut failures = 0u32;
    let mut started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                process::stop(&mut child, opts.stop_timeout).await;
                status.pid.store(0, Ordering::SeqCst);
                info!(server = %opts.server_name(), "embedded nats-server stopped");
                return;
            }
            exit = child.wait() => {
                status.pid.store(0, Ordering::SeqCst);
                if stop.has_changed().unwrap_or(true) {
                    return;
                }
                failures = if started.elapsed() >= STABLE_RUN { 1 } else { failures + 1 };
                let delay = restart_delay(failures, opts.restart_backoff_max);
                let restarts = status.restarts.fetch_add(1, Ordering::SeqCst) + 1;
                warn!(server = %opts.server_name(), exit = ?exit, restarts,
                      delay_ms = delay.as_millis() as u64, "embedded nats-server died; restarting");
                match restart(&launch, delay, &mut stop).await {
                    Some(new) => child = new,
                    None => return,
                }
                started = tokio::time::Instant::now();
                status.pid.store(child.id().unwrap_or(0), Ordering::SeqCst);
                info!(server = %opts.server_name(), pid = ?child.id(), "embedded nats-server restarted");
            }
        }
    }
}

/// Waits `delay`, then starts the child again, retrying failed starts with backoff.
/// `None` when asked to stop meanwhile.
async fn restart(launch: &Launch, mut delay: Duration, stop: &mut watch::Receiver<bool>) -> Option<Child> {
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        match process::spawn(&launch.binary, &launch.config_path, &launch.log_path) {
            Ok(child) => return Some(child),
            Err(e) => {
                delay = (delay * 2).min(launch.opts.restart_backoff_max).max(RESTART_BACKOFF_FIRST);
                error!(error = %e, delay_ms = delay.as_millis() as u64, "cannot restart nats-server");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_doubles_up_to_the_cap() {
        let max = Duration::from_secs(10);
        assert_eq!(restart_delay(1, max), Duration::from_millis(100));
        assert_eq!(restart_delay(2, max), Duration::from_millis(200));
        assert_eq!(restart_delay(40, max), max);
    }
}
