//! Running a node: the embedded `nats-server` (when `nats.urls` is empty), the JetStream
//! transport, the engine loop, local-change notification, signals and shutdown; and the
//! one-shot `-cleanup` mode.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use marmot_core::engine::{Engine, EngineConfig};
use marmot_core::snapshots::Snapshots;
use marmot_core::sqlite::{CommitPoints, Db, SqliteChangeSource, BATCH_ROWS_MAX};
use marmot_core::wire::EncodeOptions;
use marmot_core::{Error, LogTransport, NodeId, Shard};
use marmot_transports::{EmbeddedOptions, EmbeddedServer, NatsOptions, NatsTransport};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::flags::Flags;
use crate::sampler::{Sampler, Waker};
use crate::snapshot;

/// What [`run`] may fail with; `main` logs it and exits with status 1.
pub type RunError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How long the loop waits for remote entries when there is nothing to do.
const IDLE_WAIT: Duration = Duration::from_millis(5);
/// Maintenance that holds the node loop longer than this is logged (at debug).
const MAINTAIN_SLOW: Duration = Duration::from_millis(20);
/// Checked for local changes at least this often, even without a file notification.
const LOCAL_CHECK_FALLBACK: Duration = Duration::from_secs(1);
/// Longest pause between publish retries.
const PUBLISH_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long shutdown spends publishing what is pending.
const SHUTDOWN_PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, a node that must restore, with no usable snapshot in the store,
/// asks the cluster for one and looks again; the first waits are shorter.
const NO_SNAPSHOT_RETRY: Duration = Duration::from_secs(15);
/// A stream whose entries span less than this (when full) is too short to ride out a
/// stall or a restart without a snapshot: warned about at start and every
/// [`RETENTION_CHECK_EVERY`].
const RETENTION_SPAN_MIN: Duration = Duration::from_secs(10);
/// How often a running node checks how much time its streams hold.
const RETENTION_CHECK_EVERY: Duration = Duration::from_secs(600);

/// Warns when a full stream holds less than [`RETENTION_SPAN_MIN`] of changes.
async fn check_retention(config: &Config, transport: &NatsTransport) {
    for s in 0..transport.shard_count() {
        match transport.retained_span(Shard(s)).await {
            Ok(Some((entries, span))) if span < RETENTION_SPAN_MIN => warn!(
                shard = s,
                entries,
                span_ms = span.as_millis() as u64,
                max_entries = config.replication_log.max_entries,
                "this stream keeps only {} ms of changes at the recent publish rate: a node that stalls or stops \
                 for longer must restore a snapshot; raise replication_log.max_entries to at least entries per \
                 second x the longest stall to ride out (docs/operations.md)",
                span.as_millis()
            ),
            Ok(_) => {}
            Err(e) => debug!(shard = s, error = %e, "could not check the stream's retention"),
        }
    }
}

/// The first wait before applying again on a full disk; it doubles up to
/// [`PUBLISH_BACKOFF_MAX`].
const DISK_FULL_RETRY_MIN: Duration = Duration::from_millis(200);
/// The first wait for a snapshot asked from the cluster.
const SNAPSHOT_WAIT_MIN: Duration = Duration::from_millis(500);

/// Runs the node (or the one-shot mode the flags select) until it stops.
pub fn run(config: Config, flags: Flags) -> Result<(), RunError> {
    if flags.cleanup {
        return cleanup(&config.db_path);
    }
    if flags.keep_set_aside {
        return keep_set_aside(&config);
    }
    if flags.command.is_some() {
        return Err("this subcommand is not implemented in this build yet".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run_node(config, flags))
}

fn keep_set_aside(config: &Config) -> Result<(), RunError> {
    let _lock = crate::lock::DbLock::acquire(&config.db_path)?;
    let mut db = Db::open(&config.db_path, NodeId(config.node_id), config.capture_options())?;
    let Some(rows) = db.keep_set_aside()? else {
        return Err("-keep-set-aside: this node has set no changes aside; nothing to do".into());
    };
    warn!(
        rows,
        "-keep-set-aside: the rows this node had set aside are published again, as changes made now, when it \
         starts; nodes waiting for a snapshot restore the one it saves"
    );
    Ok(())
}

fn cleanup(db_path: &Path) -> Result<(), RunError> {
    let conn = rusqlite::Connection::open(db_path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let set_aside: Option<i64> = conn
        .query_row("SELECT value FROM __marmot__state WHERE key = 'restore_required'", [], |r| r.get(0))
        .unwrap_or(None);
    if set_aside.is_some_and(|v| v != 0) {
        warn!(
            "this node had set aside local changes older than tombstone_retention and had not restored a snapshot \
             yet: they stay in its tables, which other nodes do not have"
        );
    }
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
        // v1: `connect_retries` retries after the first attempt; 0 (new) waits for ever.
        connect_attempts_max: (n.connect_retries > 0).then(|| n.connect_retries as usize + 1),
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

/// Connects, retrying with backoff until it succeeds or shutdown is requested (`None`).
async fn connect(opts: NatsOptions, stop: &Stop) -> Result<Option<NatsTransport>, RunError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let Some(connected) = stop.unless(NatsTransport::connect(opts.clone())).await else { return Ok(None) };
        match connected {
            Ok(t) => return Ok(Some(t)),
            Err(e) if e.is_retryable() && !stop.requested() => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot reach NATS yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PUBLISH_BACKOFF_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A stop request (SIGINT, SIGTERM): a flag for loops that poll it, and a future for waits
/// that must end promptly on a signal (connecting, starting the embedded server, waiting
/// for or downloading a snapshot).
#[derive(Clone)]
struct Stop(Arc<tokio::sync::watch::Sender<bool>>);

impl Stop {
    fn new() -> Stop {
        Stop(Arc::new(tokio::sync::watch::channel(false).0))
    }

    fn requested(&self) -> bool {
        *self.0.borrow()
    }

    fn request(&self) {
        self.0.send_replace(true);
    }

    /// Runs `fut` to its end, or `None` when a stop is requested first.
    async fn unless<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        let mut rx = self.0.subscribe();
        tokio::select! {
            biased;
            _ = rx.wait_for(|stop| *stop) => None,
            value = fut => Some(value),
        }
    }
}

async fn run_node(config: Config, flags: Flags) -> Result<(), RunError> {
    let stop = Stop::new();
    spawn_signal_handler(stop.clone());
    let _lock = match flags.save_snapshot {
        true => None,
        false => Some(crate::lock::DbLock::acquire(&config.db_path)?),
    };
    crate::metrics::start(config.node_id, &config.prometheus).await?;
    let embedded = match config.nats.urls.is_empty() {
        true => match stop.unless(start_embedded(&config, &flags)).await {
            Some(server) => Some(server?),
            None => return Ok(()),
        },
        false => None,
    };
    let urls = match &embedded {
        Some(server) => vec![server.client_url().to_owned()],
        None => config.nats.urls.clone(),
    };
    let result = crate::metrics::with_embedded(embedded.as_ref(), async {
        let Some(transport) = connect(nats_options(&config, urls), &stop).await? else { return Ok(()) };
        let transport = Arc::new(transport);
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
        check_retention(&config, &transport).await;
        let dirty = Arc::new(AtomicBool::new(true));
        let waker = crate::sampler::Waker::default();
        // `polling_interval` > 0: look for local changes on that timer only (file-system
        // notifications may be unavailable or unreliable, e.g. on network file systems).
        let _watcher = match config.polling_interval() {
            None => watch_database(&config.db_path, dirty.clone(), waker.clone()),
            Some(every) => {
                info!(every_ms = every.as_millis() as u64, "polling the database for local changes (polling_interval)");
                None
            }
        };
        let snap = SnapshotContext {
            config: Arc::new(config.clone()),
            transport: transport.clone(),
            snapshots: snapshots.clone(),
            running: std::sync::Mutex::new(None),
            requested: Arc::new(AtomicBool::new(false)),
        };
        let _requests = match snapshots {
            Some(_) => Some(listen_for_snapshot_requests(&config, &transport, snap.requested.clone()).await?),
            None => None,
        };
        let _verify = AbortOnDrop(crate::verify::listen(Arc::new(config.clone()), &transport).await?);
        loop {
            let restore = restore_if_behind(&config, &transport, snapshots.as_deref(), flags.force_restore, &stop);
            stop.unless(restore).await.transpose()?;
            if stop.requested() {
                break;
            }
            // Fresh points per opened engine: a restore replaced the file they were read from.
            let points = Arc::new(CommitPoints::default());
            let idle = config.polling_interval().unwrap_or(LOCAL_CHECK_FALLBACK);
            let _sampler = Sampler::start(&config.db_path, points.clone(), waker.clone(), idle);
            let mut engine = open_engine(&config, transport.clone(), Some(points))?;
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
    /// Set when another node asked the cluster for a snapshot.
    requested: Arc<AtomicBool>,
}

/// Listens for other nodes asking for a snapshot and raises `requested`; the node loop
/// answers with a save when this node is caught up. The task ends when the handle drops.
async fn listen_for_snapshot_requests(
    config: &Config,
    transport: &NatsTransport,
    requested: Arc<AtomicBool>,
) -> Result<AbortOnDrop, RunError> {
    use futures::StreamExt;
    let mut sub = transport.client().subscribe(snapshot::request_subject(config)).await?;
    let me = format!("node-{}", config.node_id);
    Ok(AbortOnDrop(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let from = String::from_utf8_lossy(&msg.payload).into_owned();
            if from != me {
                info!(from, "a node asked the cluster for a snapshot");
                requested.store(true, Ordering::Release);
            }
        }
    })))
}

/// A background task aborted when this handle drops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
                snapshot::save_when_free(&config, &transport, &snapshots).await.map(|_| ())
            } else {
                match snapshot::save(&config, &transport, &snapshots).await {
                    Ok(Err(snapshot::NotSaved::Behind(reason))) => {
                        info!(reason, "not saving a snapshot: this node is not caught up with the streams");
                        Ok(())
                    }
                    Ok(Err(snapshot::NotSaved::PartialSelection(tables))) => {
                        debug!(tables, "not saving a snapshot: this node does not replicate every table");
                        Ok(())
                    }
                    Ok(Err(snapshot::NotSaved::Unpublished(through))) => {
                        info!(%through, "not saving a snapshot: its local changes were not published in time");
                        Ok(())
                    }
                    other => other.map(|_| ()),
                }
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
        Ok(m) => info!(object = %m.object, "snapshot saved; exiting"),
        Err(snapshot::NotSaved::LeaseTaken) => {
            return Err("another node holds the snapshot lease; try again later".into())
        }
        Err(snapshot::NotSaved::Behind(reason)) => {
            return Err(format!(
                "not saving a snapshot: this node is {reason}; a snapshot from it would not help a node that \
                 needs one. Save on a node that is up to date, or start this one first to catch up"
            )
            .into())
        }
        Err(snapshot::NotSaved::PartialSelection(tables)) => {
            return Err(marmot_core::Error::PartialSelection(tables).to_string().into());
        }
        Err(snapshot::NotSaved::Unpublished(through)) => {
            return Err(format!(
                "not saving a snapshot: {}; a snapshot holds only published changes: start marmot on this node so \
                 that it publishes them, then save",
                marmot_core::Error::SnapshotUnpublished(through)
            )
            .into());
        }
    }
    Ok(())
}

/// Restores a snapshot when the streams no longer hold what this node missed: the one that
/// covers the most among those the streams can be replayed from. Local changes not yet
/// published are published first, also those committed while the node waits (the restore
/// itself refuses to copy over an unpublished commit); if publishing fails the restore is
/// refused unless `force`. When no stored snapshot covers what was missed (or the store is
/// empty or unreachable), asks the cluster for one and waits, with backoff, until one does
/// or a signal arrives: a node that is behind never exits for that reason.
async fn restore_if_behind(
    config: &Config,
    transport: &Arc<NatsTransport>,
    snapshots: Option<&Snapshots>,
    force: bool,
    stop: &Stop,
) -> Result<(), RunError> {
    let node = NodeId(config.node_id);
    let db = Db::open(&config.db_path, node, config.capture_options())?;
    let expired = expired_changes(config, &db)?;
    let set_aside = db.restore_required()?;
    if expired.is_none() && !set_aside && snapshot::needs_restore(&db, transport.as_ref()).await?.is_none() {
        return Ok(());
    }
    let snapshots = snapshots.ok_or(match expired.is_some() || set_aside {
        true => {
            "local changes waited unpublished longer than tombstone_retention and snapshots are disabled \
             ([snapshot] enabled = false): this node cannot rejoin without bringing back rows deleted elsewhere; \
             copy the database of a node that is up to date here, or enable snapshots"
        }
        false => {
            "this node is behind the streams' first entries and snapshots are disabled ([snapshot] enabled = false)"
        }
    })?;
    if let Some((changes, age_ms)) = expired {
        set_aside_expired(config, &db, changes, age_ms)?;
    }
    let mut wait = WaitForSnapshot::new(db);
    loop {
        if stop.requested() {
            return Ok(());
        }
        if let Err(e) = publish_before_restore(config, transport, force).await {
            // NATS unreachable: the changes wait in the database; so does the restore.
            wait.wait(&e, stop).await?;
            continue;
        }
        let restored = snapshot::restore(config, transport.as_ref(), snapshots).await;
        match restored {
            Ok(manifest) => {
                let db = Db::open(&config.db_path, node, config.capture_options())?;
                for s in 0..transport.shard_count() {
                    let last = transport.bounds(Shard(s)).await?.last;
                    db.set_own_replay_through(Shard(s), last)?;
                }
                db.set_waiting_for_snapshot_since_ms(0)?;
                if snapshot::needs_restore(&db, transport.as_ref()).await?.is_none() {
                    info!(object = %manifest.object, "restored; replaying the streams from the snapshot's positions");
                    return Ok(());
                }
                // The streams moved past the snapshot during the download: try again.
                info!(object = %manifest.object, "the streams moved past the restored snapshot meanwhile; restoring again");
                wait.db = db;
            }
            // The application committed after the publish above: publish that too, never
            // restore over it.
            Err(e) if matches!(e.downcast_ref(), Some(Error::PendingChanges(_))) => {
                info!(error = %e, "publishing local changes committed meanwhile before restoring");
            }
            // No snapshot covers what was missed, the store is unreachable, or nothing
            // verifies: exiting would only crash-loop under a supervisor. Ask the cluster
            // for one and wait.
            Err(e) if is_waitable(&e) => {
                if let Err(e) = snapshot::request(config, transport).await {
                    debug!(error = %e, "could not ask the cluster for a snapshot; asking again later");
                }
                wait.wait(&e, stop).await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The local changes not published and how old the oldest is, in milliseconds, when it is
/// older than `tombstone_retention` (see [`Error::ChangesExpired`]).
fn expired_changes(config: &Config, db: &Db) -> Result<Option<(u64, u64)>, RunError> {
    let retention = config.tombstone_retention_ms;
    let Some(oldest) = db.oldest_pending_ms()? else { return Ok(None) };
    let age_ms = db.wall_ms()?.saturating_sub(oldest);
    if retention == 0 || age_ms <= retention {
        return Ok(None);
    }
    Ok(Some((db.pending_count()?, age_ms)))
}

/// Keeps a copy of the database with its expired local changes next to it, for the
/// operator, and marks them as never to be published: the restore that follows replaces
/// the file.
fn set_aside_expired(config: &Config, db: &Db, changes: u64, age_ms: u64) -> Result<(), RunError> {
    let now_ms = db.wall_ms()?;
    let mut name = config.db_path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".expired-{now_ms}"));
    let copy = config.db_path.with_file_name(name);
    db.conn()
        .execute("VACUUM INTO ?1", [copy.to_string_lossy()])
        .map_err(|e| format!("keeping a copy of the database before discarding expired changes: {e}"))?;
    let discarded = db.set_aside_pending()?;
    error!(
        changes = discarded.max(changes),
        age_ms,
        retention_ms = config.tombstone_retention_ms,
        copy = %copy.display(),
        "local changes waited unpublished longer than tombstone_retention; other nodes may have removed the \
         tombstones that decide them, so they are not published (they could bring back deleted rows): this node \
         restores a snapshot. The database as it was, with those changes, is kept in the copy"
    );
    Ok(())
}

/// Errors a node waiting for a snapshot waits out instead of exiting with.
fn is_waitable(e: &RunError) -> bool {
    match e.downcast_ref::<Error>() {
        // A store that refuses this node's credentials is a configuration error: refused.
        Some(e) => matches!(e, Error::NotFound(_) | Error::Corrupt(_)) || e.is_retryable(),
        None => false,
    }
}

/// The wait of a node that needs a snapshot: backoff, log lines, and `status`.
struct WaitForSnapshot {
    db: Db,
    backoff: Duration,
    since: Option<Instant>,
}

impl WaitForSnapshot {
    fn new(db: Db) -> Self {
        WaitForSnapshot { db, backoff: SNAPSHOT_WAIT_MIN, since: None }
    }

    /// Waits one backoff step (ending early on a signal), recording the wait for `status`.
    async fn wait(&mut self, error: &RunError, stop: &Stop) -> Result<(), RunError> {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            let since_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            self.db.set_waiting_for_snapshot_since_ms(since_ms)?;
        }
        warn!(
            error = %error,
            waited_s = self.since.map_or(0, |s| s.elapsed().as_secs()),
            retry_in_ms = self.backoff.as_millis() as u64,
            "this node is behind the streams and no usable snapshot exists yet; asked the cluster for one \
             and waiting (a node that is caught up saves one; or run marmot -save-snapshot there; if every \
             node set changes aside, run marmot -keep-set-aside on the one whose data to keep, then start it)"
        );
        let until = Instant::now() + self.backoff;
        while Instant::now() < until && !stop.requested() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.backoff = (self.backoff * 2).min(NO_SNAPSHOT_RETRY);
        Ok(())
    }
}

/// Publishes every local change not yet published. With `force`, changes that cannot be
/// published are discarded instead (the user asked to restore over them).
async fn publish_before_restore(config: &Config, transport: &Arc<NatsTransport>, force: bool) -> Result<(), RunError> {
    let db = Db::open(&config.db_path, NodeId(config.node_id), config.capture_options())?;
    let pending = db.pending_count()?;
    if pending == 0 {
        return Ok(());
    }
    match publish_pending(config, transport).await {
        Ok(()) => info!(changes = pending, "published local changes before restoring"),
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

/// Publishes every local change not yet published, within [`SHUTDOWN_PUBLISH_TIMEOUT`].
async fn publish_pending(config: &Config, transport: &Arc<NatsTransport>) -> Result<(), RunError> {
    let mut engine = open_engine(config, transport.clone(), None)?;
    let published = tokio::time::timeout(SHUTDOWN_PUBLISH_TIMEOUT, async {
        loop {
            match engine.publish_once().await {
                Ok(0) => break,
                Ok(_) => {}
                // Everything committed since expired changes were set aside is published.
                Err(Error::RestoreRequired) => break,
                Err(e) => return Err(e),
            }
        }
        engine.flush().await
    })
    .await;
    match published {
        Ok(result) => Ok(result?),
        Err(_) => Err(format!("publishing took longer than {} s", SHUTDOWN_PUBLISH_TIMEOUT.as_secs()).into()),
    }
}

/// Opens the engine; with `points`, a backlog of local changes is published in batches of
/// about [`BATCH_ROWS_MAX`] rows cut at those commit points.
fn open_engine(
    config: &Config,
    transport: Arc<dyn LogTransport>,
    points: Option<Arc<CommitPoints>>,
) -> Result<Engine<SqliteChangeSource>, RunError> {
    let node = NodeId(config.node_id);
    let mut source = SqliteChangeSource::new(Db::open(&config.db_path, node, config.capture_options())?);
    if let Some(points) = points {
        source = source.with_commit_points(points, BATCH_ROWS_MAX);
    }
    let db = Db::open(&config.db_path, node, config.capture_options())?;
    for t in &db.schema().tables {
        debug!(table = %t.name, "replicating table");
    }
    info!(
        node_id = config.node_id,
        tables = db.schema().tables.len(),
        skipped = db.schema().skipped.len(),
        "capture installed"
    );
    let quarter = config.replication_log.entries_per_shard() / 4;
    let engine_config = EngineConfig {
        encode: EncodeOptions { compress: config.replication_log.compress, ..EncodeOptions::default() },
        publish: config.publish,
        replicate: config.replicate,
        replicate_ddl: config.replicate_ddl,
        clock_skew_ms_max: config.max_clock_skew_ms,
        tombstone_retention_ms: config.tombstone_retention_ms,
        conflicts_retention_ms: config.conflicts.retention_ms,
        // A quarter of what one shard's stream keeps: an incomplete batch is parked well
        // before the stream drops the entries its hold would force a restart to re-read.
        stray_after_entries: quarter.clamp(8, marmot_core::wire::STRAY_AFTER_ENTRIES_DEFAULT),
        // A quarter of a shard's stream too: a node whose consumer stalls stops adding to
        // the stream well before it would roll past its own position.
        publish_ahead_entries_max: quarter.max(8),
        ..EngineConfig::default()
    };
    // Changes the application committed while Marmot was stopped are folded now, in
    // slices, rather than inside the first remote apply's write transaction.
    match db.fold_in_slices() {
        Ok(slices) if slices > 1 => info!(slices, "folded the local changes made while stopped"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not fold local changes yet; the next apply does"),
    }
    Ok(Engine::new(source, db, transport, engine_config))
}

fn spawn_signal_handler(stop: Stop) {
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
        stop.request();
    });
}

/// Watches the database file and its WAL; any change marks local changes as possibly
/// pending and wakes the commit-point sampler. Returns the watcher (dropping it stops watching) or `None` when the platform
/// refuses, in which case polling covers it.
fn watch_database(db_path: &Path, dirty: Arc<AtomicBool>, waker: Waker) -> Option<notify::RecommendedWatcher> {
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
                crate::sampler::wake(&waker);
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
    last_retention_check: Instant,
}

/// A full file system under the database: applying pauses (the stream keeps what is not
/// applied yet) and is retried with backoff; logged once when it starts and once when it
/// ends, and shown by the `disk_full` metric. Publishing goes on: it only reads.
#[derive(Default)]
struct DiskFull {
    since: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl DiskFull {
    /// Whether applying waits for the next retry.
    fn paused(&self) -> bool {
        self.retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn failed(&mut self, error: &Error) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            self.backoff = DISK_FULL_RETRY_MIN;
            warn!(error = %error,
                "the database's disk is full: applying remote changes is paused and retried until space is \
                 freed; nothing is lost (the streams keep the changes, and local ones stay pending)");
            crate::metrics::set_disk_full(true);
        } else {
            debug!(error = %error, retry_in_ms = self.backoff.as_millis() as u64, "disk still full");
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(PUBLISH_BACKOFF_MAX);
    }

    fn succeeded(&mut self) {
        if let Some(since) = self.since.take() {
            info!(paused_ms = since.elapsed().as_millis() as u64, "disk space is available again; applying resumed");
            crate::metrics::set_disk_full(false);
            self.retry_at = None;
        }
    }
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
    stop: &Stop,
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
        last_retention_check: now,
    };
    let snapshot_every_entries = config.replication_log.entries_per_shard();
    let mut acks = crate::ack_flush::AckFlush::default();
    let mut full = DiskFull::default();
    let local_check = config.polling_interval().unwrap_or(LOCAL_CHECK_FALLBACK);
    let shards = engine.transport().shard_count();
    info!(shards, publish = config.publish, replicate = config.replicate, "replicating");
    while !stop.requested() {
        let mut work = 0usize;
        let due = dirty.swap(false, Ordering::AcqRel) || t.last_local_check.elapsed() >= local_check;
        if due && Instant::now() >= t.publish_retry_at {
            t.last_local_check = Instant::now();
            match publish(engine, &mut t, dirty).await {
                Ok(n) => work += n,
                Err(e) => {
                    warn!(error = %e, "local changes outlived tombstone_retention; restoring a snapshot instead of publishing them");
                    return Ok(LoopEnd::Behind);
                }
            }
        }
        for s in 0..shards {
            let wait = if work == 0 && s + 1 == shards { IDLE_WAIT } else { Duration::ZERO };
            if full.paused() {
                break;
            }
            match engine.receive_once(Shard(s), wait).await {
                Ok(n) => {
                    work += n;
                    full.succeeded();
                }
                Err(e @ Error::Truncated { .. }) => {
                    warn!(error = %e, "this node missed entries the stream no longer holds");
                    return Ok(LoopEnd::Behind);
                }
                Err(e) if e.is_disk_full() => full.failed(&e),
                Err(e) if e.is_retryable() => {
                    warn!(shard = s, error = %e, "receive failed; retrying");
                    tokio::time::sleep(IDLE_WAIT).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if full.paused() {
            // Nothing to apply meanwhile: do not spin.
            tokio::time::sleep(IDLE_WAIT).await;
        }
        if work > 0 {
            t.last_activity = Instant::now();
        }
        acks.maybe_flush(engine).await;
        crate::metrics::record(engine);
        t.entries_since_snapshot += work as u64;
        let by_entries = t.entries_since_snapshot >= snapshot_every_entries;
        let by_time = config.snapshot.interval().is_some_and(|i| t.last_snapshot.elapsed() >= i);
        let asked = snap.requested.swap(false, Ordering::AcqRel);
        if snap.snapshots.is_some() && (by_entries || by_time || asked) {
            t.entries_since_snapshot = 0;
            t.last_snapshot = Instant::now();
            match engine.flush().await {
                Ok(()) => snap.start_save(true),
                Err(e) if e.is_disk_full() => full.failed(&e),
                Err(e) => return Err(e.into()),
            }
        }
        if t.last_retention_check.elapsed() >= RETENTION_CHECK_EVERY {
            t.last_retention_check = Instant::now();
            check_retention(config, &snap.transport).await;
        }
        if t.last_maintain.elapsed() >= config.cleanup_interval() && !full.paused() {
            t.last_maintain = Instant::now();
            match engine.maintain().await {
                Ok(more) => {
                    let took = t.last_maintain.elapsed();
                    if took >= MAINTAIN_SLOW {
                        debug!(ms = took.as_millis() as u64, "maintenance held the loop");
                    }
                    if more {
                        // Due again on the next turn of the loop, after publishing and
                        // applying what arrived meanwhile.
                        t.last_maintain =
                            Instant::now().checked_sub(config.cleanup_interval()).unwrap_or(t.last_maintain);
                    }
                }
                Err(e) if e.is_disk_full() => full.failed(&e),
                Err(e) => return Err(e.into()),
            }
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

/// Publishes what is pending; a failure is retried with backoff. Only
/// [`Error::ChangesExpired`] is returned: the node must restore a snapshot.
async fn publish(engine: &mut Engine<SqliteChangeSource>, t: &mut Timers, dirty: &AtomicBool) -> Result<usize, Error> {
    match engine.publish_once().await {
        Ok(n) => {
            t.publish_backoff = Duration::from_millis(100);
            if n > 0 || engine.publishing_held() {
                // More may have been committed while publishing.
                dirty.store(true, Ordering::Release);
            }
            Ok(n as usize)
        }
        Err(e @ (Error::ChangesExpired { .. } | Error::RestoreRequired)) => Err(e),
        Err(e) => {
            warn!(error = %e, retry_in_ms = t.publish_backoff.as_millis() as u64,
                "publish failed; nothing was marked published, retrying");
            t.publish_retry_at = Instant::now() + t.publish_backoff;
            t.publish_backoff = (t.publish_backoff * 2).min(PUBLISH_BACKOFF_MAX);
            dirty.store(true, Ordering::Release);
            Ok(0)
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
