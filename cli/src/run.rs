//! Running a node: the embedded `nats-server` (when `nats.urls` is empty), the JetStream
//! transport, the engine loop, local-change notification, signals and shutdown; and the
//! one-shot `-cleanup` mode.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use marmot_core::engine::{Engine, EngineConfig};
use marmot_core::snapshots::Snapshots;
use marmot_core::sqlite::{CaptureOptions, Db, SqliteChangeSource};
use marmot_core::wire::EncodeOptions;
use marmot_core::{Error, LogTransport, NodeId, Shard};
use marmot_transports::{EmbeddedOptions, EmbeddedServer, NatsOptions, NatsTransport};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::flags::Flags;
use crate::snapshot;

/// What [`run`] may fail with; `main` logs it and exits with status 1.
pub type RunError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long the loop waits for remote entries when there is nothing to do.
const IDLE_WAIT: Duration = Duration::from_millis(5);
/// Checked for local changes at least this often, even without a file notification.
const LOCAL_CHECK_FALLBACK: Duration = Duration::from_secs(1);
/// Longest pause between publish retries.
const PUBLISH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown spends publishing what is pending.
const SHUTDOWN_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a node that must restore, with no usable snapshot in the store, looks again.
const NO_SNAPSHOT_RETRY: Duration = Duration::from_secs(15);

/// Runs the node (or the one-shot mode the flags select) until it stops.
pub fn run(config: Config, flags: Flags) -> Result<(), RunError> {
    if flags.cleanup {
        return cleanup(&config.db_path);
    }
    if flags.command.is_some() {
        return Err("this subcommand is not implemented in this build yet".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_node(config, flags))
}

fn cleanup(db_path: &Path) -> Result<(), RunError> {
    let conn = rusqlite::Connection::open(db_path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    marmot_core::sqlite::cleanup(&conn)?;
    info!(db_path = %db_path.display(), "removed Marmot's triggers and tables; user data untouched");
    Ok(())
}

fn optional_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn optional(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

async fn start_embedded(config: &Config, flags: &Flags) -> Result<EmbeddedServer, RunError> {
    let mut opts = EmbeddedOptions::new(config.node_id, config.data_dir());
    opts.bind_address = config.nats.bind_address.clone();
    opts.cluster_addr = flags.cluster_addr.clone();
    opts.cluster_peers = flags.cluster_peers.clone();
    opts.leaf_servers = flags.leaf_servers.clone();
    opts.server_config = optional_path(&config.nats.server_config);
    opts.server_path = config.nats.server_path.clone();
    let server = EmbeddedServer::start(opts).await?;
    info!(url = server.client_url(), name = server.server_name(), "embedded nats-server ready");
    Ok(server)
}

pub(crate) fn nats_options(config: &Config, urls: Vec<String>) -> NatsOptions {
    let n = &config.nats;
    NatsOptions {
        urls,
        user_name: optional(&n.user_name),
        user_password: optional(&n.user_password),
        seed_file: optional_path(&n.seed_file),
        ca_file: optional_path(&n.ca_file),
        cert_file: optional_path(&n.cert_file),
        key_file: optional_path(&n.key_file),
        reconnect_wait_max: n.reconnect_wait().max(Duration::from_millis(100)),
        stream_prefix: n.stream_prefix.clone(),
        subject_prefix: n.subject_prefix.clone(),
        shards: config.replication_log.shards,
        max_entries: config.replication_log.max_entries,
        replicas: config.replication_log.effective_replicas() as usize,
        update_existing: config.replication_log.update_existing,
        client_name: Some(config.server_name()),
        ..NatsOptions::default()
    }
}

/// Connects, retrying with backoff until it succeeds or shutdown is requested.
async fn connect(opts: NatsOptions, stop: &AtomicBool) -> Result<NatsTransport, RunError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match NatsTransport::connect(opts.clone()).await {
            Ok(t) => return Ok(t),
            Err(e) if e.is_retryable() && !stop.load(Ordering::Relaxed) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach NATS yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PUBLISH_BACKOFF_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn run_node(config: Config, flags: Flags) -> Result<(), RunError> {
    let stop = Arc::new(AtomicBool::new(false));
    spawn_signal_handler(stop.clone());
    crate::metrics::start(config.node_id, &config.prometheus).await?;
    let embedded = match config.nats.urls.is_empty() {
        true => Some(start_embedded(&config, &flags).await?),
        false => None,
    };
    let urls = match &embedded {
        Some(server) => vec![server.client_url().to_owned()],
        None => config.nats.urls.clone(),
    };
    let result = crate::metrics::with_embedded(embedded.as_ref(), async {
        let transport = Arc::new(connect(nats_options(&config, urls), &stop).await?);
        let _collector = crate::metrics::spawn_collector(&transport);
        let snapshots = match config.snapshot.enabled {
            true => Some(Arc::new(Snapshots::new(
                snapshot::open_store(&config, &transport).await?,
                config.snapshot.keep as usize,
            ))),
            false => None,
        };
        if flags.save_snapshot {
            return save_snapshot_once(&config, &transport, snapshots.as_deref()).await;
        }
        let dirty = Arc::new(AtomicBool::new(true));
        let _watcher = watch_database(&config.db_path, dirty.clone());
        let snap = SnapshotContext {
            config: Arc::new(config.clone()),
            transport: transport.clone(),
            snapshots: snapshots.clone(),
            running: std::sync::Mutex::new(None),
        };
        loop {
            restore_if_behind(&config, &transport, snapshots.as_deref(), flags.force_restore, &stop).await?;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut engine = open_engine(&config, transport.clone())?;
            let outcome = node_loop(&config, &mut engine, &stop, &dirty, &snap).await?;
            shutdown_publish(&mut engine).await;
            match outcome {
                LoopEnd::Stopped => break,
                LoopEnd::SleepTimeout => {
                    snap.start_save(false);
                    snap.wait().await;
                    break;
                }
                LoopEnd::Behind => info!("fell behind the streams; restoring a snapshot"),
            }
        }
        Ok::<(), RunError>(())
    })
    .await;
    if let Some(server) = embedded {
        server.shutdown().await;
    }
    result
}

/// Snapshot saves in the background, one at a time, so replication never waits for one.
struct SnapshotContext {
    config: Arc<Config>,
    transport: Arc<NatsTransport>,
    snapshots: Option<Arc<Snapshots>>,
    running: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SnapshotContext {
    /// Starts a save when snapshots are enabled and none is running; failures are logged
    /// and replication goes on. With `wait_for_lease`, a save that finds another node
    /// saving waits for it and saves if that one failed ([`snapshot::save_when_free`]).
    fn start_save(&self, wait_for_lease: bool) {
        let Some(snapshots) = self.snapshots.clone() else { return };
        let mut running = self.running.lock().expect("snapshot task mutex");
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            debug!("a snapshot save is still running; not starting another");
            return;
        }
        let (config, transport) = (self.config.clone(), self.transport.clone());
        *running = Some(tokio::spawn(async move {
            let saved = if wait_for_lease {
                snapshot::save_when_free(&config, &transport, &snapshots).await
            } else {
                snapshot::save(&config, &transport, &snapshots).await
            };
            if let Err(e) = saved {
                warn!(error = %e, "snapshot not saved; replication continues");
            }
        }));
    }

    /// Waits for a running save to end.
    async fn wait(&self) {
        let handle = self.running.lock().expect("snapshot task mutex").take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

async fn save_snapshot_once(
    config: &Config,
    transport: &NatsTransport,
    snapshots: Option<&Snapshots>,
) -> Result<(), RunError> {
    let snapshots = snapshots.ok_or("-save-snapshot: snapshots are disabled ([snapshot] enabled = false)")?;
    match snapshot::save(config, transport, snapshots).await? {
        Some(m) => info!(object = %m.object, "snapshot saved; exiting"),
        None => return Err("another node holds the snapshot lease; try again later".into()),
    }
    Ok(())
}

/// Restores the newest snapshot when the streams no longer hold what this node missed.
/// Local changes not yet published are published first, also those committed while the
/// node waits for a snapshot (the restore itself refuses to copy over an unpublished
/// commit); if publishing fails the restore is refused unless `force`.
async fn restore_if_behind(
    config: &Config,
    transport: &Arc<NatsTransport>,
    snapshots: Option<&Snapshots>,
    force: bool,
    stop: &AtomicBool,
) -> Result<(), RunError> {
    let node = NodeId(config.node_id);
    let db = Db::open(&config.db_path, node, CaptureOptions::default())?;
    if snapshot::needs_restore(&db, transport.as_ref()).await?.is_none() {
        return Ok(());
    }
    let snapshots = snapshots.ok_or(
        "this node is behind the streams' first entries and snapshots are disabled ([snapshot] enabled = false)",
    )?;
    drop(db);
    let manifest = loop {
        publish_before_restore(config, transport, force).await?;
        match snapshot::restore(config, snapshots).await {
            Ok(manifest) => break manifest,
            // The application committed after the publish above: publish that too, never
            // restore over it.
            Err(e) if matches!(e.downcast_ref(), Some(Error::PendingChanges(_))) => {
                info!(error = %e, "publishing local changes committed meanwhile before restoring");
            }
            // No snapshot yet, or none that verifies: exiting would only crash-loop under
            // a supervisor. Wait for a node that is up to date to save one.
            Err(e) if matches!(e.downcast_ref(), Some(Error::NotFound(_) | Error::Corrupt(_))) => {
                warn!(
                    error = %e,
                    retry_in_s = NO_SNAPSHOT_RETRY.as_secs(),
                    "this node is behind the streams and no usable snapshot exists yet; waiting for one \
                     (an up-to-date node saves one every max_entries / shards entries, or run marmot -save-snapshot there)"
                );
                let until = Instant::now() + NO_SNAPSHOT_RETRY;
                while Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(e) => return Err(e),
        }
    };
    let db = Db::open(&config.db_path, node, CaptureOptions::default())?;
    for s in 0..transport.shard_count() {
        let last = transport.bounds(Shard(s)).await?.last;
        db.set_own_replay_through(Shard(s), last)?;
    }
    if let Some(shard) = snapshot::needs_restore(&db, transport.as_ref()).await? {
        return Err(format!(
            "the newest snapshot ({}) is older than what stream shard {shard} still holds; \
             save a newer snapshot on a node that is up to date (marmot -save-snapshot)",
            manifest.object
        )
        .into());
    }
    info!(object = %manifest.object, "restored; replaying the streams from the snapshot's positions");
    Ok(())
}

/// Publishes every local change not yet published. With `force`, changes that cannot be
/// published are discarded instead (the user asked to restore over them).
async fn publish_before_restore(config: &Config, transport: &Arc<NatsTransport>, force: bool) -> Result<(), RunError> {
    let db = Db::open(&config.db_path, NodeId(config.node_id), CaptureOptions::default())?;
    let pending = db.pending_count()?;
    if pending == 0 {
        return Ok(());
    }
    let mut engine = open_engine(config, transport.clone())?;
    let published = tokio::time::timeout(SHUTDOWN_PUBLISH_TIMEOUT, async {
        while engine.publish_once().await? > 0 {}
        engine.flush().await
    })
    .await;
    match published {
        Ok(Ok(())) => info!(changes = pending, "published local changes before restoring"),
        _ if force => {
            let lost = db.discard_pending()?;
            warn!(changes = lost, "-force-restore: restoring over local changes that could not be published")
        }
        _ => {
            return Err(format!(
                "refusing to restore a snapshot: {pending} local changes are not published yet and publishing them failed; \
                 fix the connection, or start with -force-restore to restore anyway (those changes are then lost)"
            )
            .into())
        }
    }
    Ok(())
}

fn open_engine(config: &Config, transport: Arc<dyn LogTransport>) -> Result<Engine<SqliteChangeSource>, RunError> {
    let node = NodeId(config.node_id);
    let source = SqliteChangeSource::new(Db::open(&config.db_path, node, CaptureOptions::default())?);
    let db = Db::open(&config.db_path, node, CaptureOptions::default())?;
    for t in &db.schema().tables {
        debug!(table = %t.name, "replicating table");
    }
    info!(
        node_id = config.node_id,
        tables = db.schema().tables.len(),
        skipped = db.schema().skipped.len(),
        "capture installed"
    );
    let engine_config = EngineConfig {
        encode: EncodeOptions { compress: config.replication_log.compress, ..EncodeOptions::default() },
        publish: config.publish,
        replicate: config.replicate,
        clock_skew_ms_max: config.max_clock_skew_ms,
        ..EngineConfig::default()
    };
    Ok(Engine::new(source, db, transport, engine_config))
}

fn spawn_signal_handler(stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping"),
            _ = term.recv() => info!("SIGTERM received; stopping"),
        }
        stop.store(true, Ordering::SeqCst);
    });
}

/// Watches the database file and its WAL; any change marks local changes as possibly
/// pending. Returns the watcher (dropping it stops watching) or `None` when the platform
/// refuses, in which case polling covers it.
fn watch_database(db_path: &Path, dirty: Arc<AtomicBool>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = db_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = db_path.file_name()?.to_os_string();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let ours = event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&*name.to_string_lossy())));
            if ours {
                dirty.store(true, Ordering::Release);
            }
        }
    })
    .map_err(|e| warn!(error = %e, "file notification unavailable; polling instead"))
    .ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| warn!(error = %e, "file notification unavailable; polling instead"))
        .ok()?;
    Some(watcher)
}

struct Timers {
    last_local_check: Instant,
    last_maintain: Instant,
    last_activity: Instant,
    publish_retry_at: Instant,
    publish_backoff: Duration,
    last_snapshot: Instant,
    entries_since_snapshot: u64,
}

/// Why the node loop ended.
#[derive(Debug, PartialEq, Eq)]
enum LoopEnd {
    /// SIGINT or SIGTERM.
    Stopped,
    /// No activity for `sleep_timeout`.
    SleepTimeout,
    /// A stream dropped entries this node had not read: restore a snapshot.
    Behind,
}

async fn node_loop(
    config: &Config,
    engine: &mut Engine<SqliteChangeSource>,
    stop: &AtomicBool,
    dirty: &AtomicBool,
    snap: &SnapshotContext,
) -> Result<LoopEnd, RunError> {
    let now = Instant::now();
    let mut t = Timers {
        last_local_check: now,
        last_maintain: now,
        last_activity: now,
        publish_retry_at: now,
        publish_backoff: Duration::from_millis(100),
        last_snapshot: now,
        entries_since_snapshot: 0,
    };
    let snapshot_every_entries =
        (config.replication_log.max_entries / u64::from(config.replication_log.shards.max(1))).max(1);
    let mut acks = crate::ack_flush::AckFlush::default();
    let local_check = config.polling_interval().unwrap_or(LOCAL_CHECK_FALLBACK);
    let shards = engine.transport().shard_count();
    info!(shards, publish = config.publish, replicate = config.replicate, "replicating");
    while !stop.load(Ordering::Relaxed) {
        let mut work = 0usize;
        let due = dirty.swap(false, Ordering::AcqRel) || t.last_local_check.elapsed() >= local_check;
        if due && Instant::now() >= t.publish_retry_at {
            t.last_local_check = Instant::now();
            work += publish(engine, &mut t, dirty).await;
        }
        for s in 0..shards {
            let wait = if work == 0 && s + 1 == shards { IDLE_WAIT } else { Duration::ZERO };
            match engine.receive_once(Shard(s), wait).await {
                Ok(n) => work += n,
                Err(e @ Error::Truncated { .. }) => {
                    warn!(error = %e, "this node missed entries the stream no longer holds");
                    return Ok(LoopEnd::Behind);
                }
                Err(e) if e.is_retryable() => {
                    warn!(shard = s, error = %e, "receive failed; retrying");
                    tokio::time::sleep(IDLE_WAIT).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if work > 0 {
            t.last_activity = Instant::now();
        }
        acks.maybe_flush(engine).await;
        crate::metrics::record(engine);
        t.entries_since_snapshot += work as u64;
        let by_entries = t.entries_since_snapshot >= snapshot_every_entries;
        let by_time = config.snapshot.interval().is_some_and(|i| t.last_snapshot.elapsed() >= i);
        if snap.snapshots.is_some() && (by_entries || by_time) {
            t.entries_since_snapshot = 0;
            t.last_snapshot = Instant::now();
            engine.flush().await?;
            snap.start_save(true);
        }
        if t.last_maintain.elapsed() >= config.cleanup_interval() {
            t.last_maintain = Instant::now();
            engine.maintain().await?;
        }
        if let Some(sleep) = config.sleep_timeout() {
            if t.last_activity.elapsed() >= sleep {
                info!(idle_ms = sleep.as_millis() as u64, "sleep_timeout reached; exiting");
                return Ok(LoopEnd::SleepTimeout);
            }
        }
    }
    Ok(LoopEnd::Stopped)
}

async fn publish(engine: &mut Engine<SqliteChangeSource>, t: &mut Timers, dirty: &AtomicBool) -> usize {
    match engine.publish_once().await {
        Ok(n) => {
            t.publish_backoff = Duration::from_millis(100);
            if n > 0 {
                // More may have been committed while publishing.
                dirty.store(true, Ordering::Release);
            }
            n as usize
        }
        Err(e) => {
            warn!(error = %e, retry_in_ms = t.publish_backoff.as_millis() as u64,
                "publish failed; nothing was marked published, retrying");
            t.publish_retry_at = Instant::now() + t.publish_backoff;
            t.publish_backoff = (t.publish_backoff * 2).min(PUBLISH_BACKOFF_MAX);
            dirty.store(true, Ordering::Release);
            0
        }
    }
}

async fn shutdown_publish(engine: &mut Engine<SqliteChangeSource>) {
    let deadline = Instant::now() + SHUTDOWN_PUBLISH_TIMEOUT;
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), engine.publish_once()).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => debug!(changes = n, "published before exit"),
            Ok(Err(e)) => {
                warn!(error = %e, "could not publish before exit; the changes stay pending");
                break;
            }
            Err(_) => warn!("publishing before exit timed out; the changes stay pending"),
        }
    }
    if let Err(e) = engine.flush().await {
        warn!(error = %e, "could not record progress before exit; it will be redone");
    }
    info!("stopped");
}
