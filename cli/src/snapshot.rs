//! Snapshots for a running node: the store from `[snapshot]`, saving under a NATS lease
//! (only when this node is caught up), restoring the snapshot that covers the most when the
//! streams no longer hold what this node missed, asking the cluster for a snapshot when
//! none covers it, and progress reporting for long transfers.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use marmot_core::snapshots::{Manifest, Snapshots};
use marmot_core::sqlite::Db;
use marmot_core::{Hlc, LogTransport, NodeId, Position, Shard, SnapshotStore};
use marmot_storage::{S3Options, SftpOptions, StoreOptions};
use marmot_transports::nats::lease;
use marmot_transports::NatsTransport;
use tracing::{debug, info, warn};

use crate::config::{Config, SnapshotStoreKind};
use crate::run::RunError;

/// How long a save may hold the lease before another node may take it.
const LEASE_TTL: Duration = Duration::from_secs(300);
const LEASE_KEY: &str = "snapshot";
/// How often a background save that found the lease taken looks again.
const LEASE_RETRY: Duration = Duration::from_secs(5);
/// How long a saved copy waits for the node to publish the local changes it holds.
const PUBLISH_WAIT: Duration = Duration::from_secs(30);
/// How often it looks.
const PUBLISH_POLL: Duration = Duration::from_millis(20);
/// Interval between progress log lines when not attached to a terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

/// Builds the configured snapshot store.
pub async fn open_store(config: &Config, transport: &NatsTransport) -> Result<Arc<dyn SnapshotStore>, RunError> {
    let s = &config.snapshot;
    let options = match s.store {
        SnapshotStoreKind::Nats => StoreOptions::Nats(marmot_storage::NatsOptions {
            jetstream: transport.jetstream().clone(),
            bucket: s.nats.bucket_or_default(&config.nats.stream_prefix),
            replicas: s.nats.replicas.max(1) as usize,
        }),
        SnapshotStoreKind::S3 => StoreOptions::S3(S3Options {
            endpoint: s.s3.endpoint.clone(),
            path: s.s3.path.clone(),
            bucket: s.s3.bucket.clone(),
            access_key: s.s3.access_key.clone(),
            secret: s.s3.secret.clone(),
            session_token: s.s3.session_token.clone(),
            use_ssl: s.s3.use_ssl,
            ..S3Options::default()
        }),
        SnapshotStoreKind::Webdav => StoreOptions::WebDav { url: s.webdav.url.clone() },
        SnapshotStoreKind::Sftp => {
            StoreOptions::Sftp(SftpOptions { url: s.sftp.url.clone(), host_key: s.sftp.host_key.clone() })
        }
        SnapshotStoreKind::File => StoreOptions::File { location: s.file.path.clone() },
        SnapshotStoreKind::Url => StoreOptions::Url {
            url: s.url.url.clone(),
            options: s.url.options.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        },
    };
    Ok(marmot_storage::open(options).await?)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Why a save did not happen.
#[derive(Debug)]
pub enum NotSaved {
    /// Another node holds the lease (it is saving right now).
    LeaseTaken,
    /// This node is behind a stream: its snapshot would be of no use to a node that needs
    /// one, and must not take the lease from a node that is up to date.
    Behind(String),
    /// This node leaves the named tables out of replication: its copies of them are not
    /// the cluster's (see [`marmot_core::Error::PartialSelection`]).
    PartialSelection(String),
    /// The copy holds local changes (through this version) that were not published within
    /// [`PUBLISH_WAIT`] (see [`marmot_core::Error::SnapshotUnpublished`]).
    Unpublished(Hlc),
}

/// How far behind a stream's last entry a node may be and still save a snapshot: a
/// quarter of what one shard's stream keeps, at least one entry.
pub fn save_slack(config: &Config) -> u64 {
    (config.replication_log.entries_per_shard() / 4).max(1)
}

/// `Some(reason)` when a stored position (`positions`, from [`Db::positions`]) is more
/// than `slack` entries behind its stream's last entry.
pub async fn behind(
    positions: &BTreeMap<Shard, Position>,
    transport: &dyn LogTransport,
    slack: u64,
) -> Result<Option<String>, RunError> {
    for s in 0..transport.shard_count() {
        let last = transport.bounds(Shard(s)).await?.last;
        let done = positions.get(&Shard(s)).copied().unwrap_or_default();
        if done.0 + slack < last.0 {
            return Ok(Some(format!("at position {} of shard {s}, whose last entry is {}", done.0, last.0)));
        }
    }
    Ok(None)
}

/// Saves a snapshot under the lease, through its own database connection, with the copy
/// and compression on a blocking thread, when this node is caught up with every stream.
pub async fn save(
    config: &Config,
    transport: &NatsTransport,
    snapshots: &Snapshots,
) -> Result<Result<Manifest, NotSaved>, RunError> {
    let db = Db::open(&config.db_path, NodeId(config.node_id), config.capture_options())?;
    let excluded = db.excluded_tables();
    if !excluded.is_empty() {
        return Ok(Err(NotSaved::PartialSelection(excluded.join(", "))));
    }
    let positions = db.positions()?;
    drop(db);
    if let Some(reason) = behind(&positions, transport, save_slack(config)).await? {
        return Ok(Err(NotSaved::Behind(reason)));
    }
    let bucket = format!("{}-snapshot-lease", config.nats.stream_prefix);
    let replicas = config.replication_log.effective_replicas() as usize;
    let store = lease::lease_bucket(transport.jetstream(), &bucket, LEASE_TTL, replicas).await?;
    let holder = format!("node-{}", config.node_id);
    let Some(mut held) = lease::try_acquire(&store, LEASE_KEY, &holder).await? else {
        debug!("another node holds the snapshot lease");
        return Ok(Err(NotSaved::LeaseTaken));
    };
    let started = Instant::now();
    let result = held.hold_while(LEASE_TTL / 3, save_held(config, snapshots)).await;
    if let Err(e) = held.release().await {
        warn!(error = %e, "could not release the snapshot lease; it expires on its own");
    }
    let manifest = match result? {
        Ok(m) => m,
        Err(not) => return Ok(Err(not)),
    };
    info!(ms = started.elapsed().as_millis() as u64, db_bytes = manifest.db_bytes, "snapshot uploaded");
    Ok(Ok(manifest))
}

/// A save in the background. When another node holds the lease, waits for it to end and
/// then saves, unless a snapshot newer than the newest at the start appeared meanwhile:
/// a node whose saves fail (a broken store, no space) cannot keep the cluster without
/// snapshots by holding the lease at the moments the others try. Gives up after the
/// lease's time to live.
pub async fn save_when_free(
    config: &Config,
    transport: &NatsTransport,
    snapshots: &Snapshots,
) -> Result<Option<Manifest>, RunError> {
    let newest = |list: Vec<Manifest>| list.iter().map(|m| m.created_ms).max();
    let mut before = None;
    let give_up = Instant::now() + LEASE_TTL;
    loop {
        match save(config, transport, snapshots).await? {
            Ok(manifest) => return Ok(Some(manifest)),
            Err(NotSaved::Behind(reason)) => {
                info!(reason, "not saving a snapshot: this node is not caught up with the streams");
                return Ok(None);
            }
            Err(NotSaved::PartialSelection(tables)) => {
                info!(tables, "not saving a snapshot: this node does not replicate every table");
                return Ok(None);
            }
            Err(NotSaved::Unpublished(through)) => {
                info!(%through, "not saving a snapshot: its local changes were not published in time");
                return Ok(None);
            }
            Err(NotSaved::LeaseTaken) => {}
        }
        if before.is_none() {
            before = Some(newest(snapshots.list(&config.data_dir()).await?));
            info!("waiting for the other node's snapshot; saving after it if it fails");
        }
        if Instant::now() >= give_up {
            warn!("the snapshot lease stayed taken; not saving this time");
            return Ok(None);
        }
        tokio::time::sleep(LEASE_RETRY).await;
        let now = newest(snapshots.list(&config.data_dir()).await?);
        if before.is_some_and(|b| now > b) {
            info!("another node saved a snapshot; not saving this time");
            return Ok(None);
        }
    }
}

/// Writes the snapshot file, waits until the node loop has published the local changes
/// the copy holds (a snapshot must hold only published changes), uploads it.
async fn save_held(config: &Config, snapshots: &Snapshots) -> Result<Result<Manifest, NotSaved>, RunError> {
    // Temporary files go next to the database (same file system).
    let (path, dir, node, now) = (config.db_path.clone(), config.data_dir(), NodeId(config.node_id), now_ms());
    let opts = config.capture_options();
    let saved = tokio::task::spawn_blocking(move || {
        let db = Db::open(&path, node, opts)?;
        let saved = Snapshots::write_file(&db, &dir, now)?;
        let deadline = Instant::now() + PUBLISH_WAIT;
        let published = loop {
            match saved.check_published(&db) {
                Err(marmot_core::Error::SnapshotUnpublished(_)) if Instant::now() < deadline => {
                    std::thread::sleep(PUBLISH_POLL)
                }
                other => break other,
            }
        };
        match published {
            Ok(()) => Ok(Ok(saved)),
            Err(e) => {
                let _ = std::fs::remove_file(&saved.path);
                match e {
                    marmot_core::Error::SnapshotUnpublished(through) => Ok(Err(NotSaved::Unpublished(through))),
                    e => Err(e),
                }
            }
        }
    })
    .await??;
    match saved {
        Ok(saved) => Ok(Ok(snapshots.upload_file(node, now, saved).await?)),
        Err(not) => Ok(Err(not)),
    }
}

/// Whether this node's stored positions are behind what the streams still hold.
pub async fn needs_restore(db: &Db, transport: &dyn LogTransport) -> Result<Option<Shard>, RunError> {
    for s in 0..transport.shard_count() {
        let shard = Shard(s);
        let bounds = transport.bounds(shard).await?;
        let stored_epoch = db.stream_epoch(shard)?;
        // A position in a log since deleted and created again means nothing in the new one.
        let recreated = stored_epoch != 0 && bounds.epoch != 0 && stored_epoch != bounds.epoch;
        let done = if recreated { Position(0) } else { db.position(shard)? };
        if !bounds.can_resume_after(done) {
            warn!(
                shard = s,
                position = done.0,
                first = bounds.first.0,
                "the stream no longer holds what this node missed; a snapshot is needed"
            );
            return Ok(Some(shard));
        }
    }
    Ok(None)
}

/// Restores, into the database at `config.db_path`, the snapshot that covers the most
/// among those the streams can be replayed from (checked before the file is touched).
pub async fn restore(
    config: &Config,
    transport: &dyn LogTransport,
    snapshots: &Snapshots,
) -> Result<Manifest, RunError> {
    let mut bounds = Vec::new();
    for s in 0..transport.shard_count() {
        bounds.push(transport.bounds(Shard(s)).await?);
    }
    let shards = transport.shard_count();
    let usable = move |m: &Manifest| m.usable_with(shards, |s| bounds[s.0 as usize]);
    let mut db = Db::open(&config.db_path, NodeId(config.node_id), config.capture_options())?;
    let mut progress = ProgressReporter::new("restoring snapshot");
    let manifest = snapshots
        .restore_best(&mut db, &config.data_dir(), &usable, &mut |done, total| progress.report(done, total))
        .await?;
    progress.finish();
    Ok(manifest)
}

/// The subject on which a node that needs a snapshot asks the cluster for one.
pub fn request_subject(config: &Config) -> String {
    format!("{}-snapshot-request", config.nats.subject_prefix)
}

/// Asks the cluster for a snapshot: every node that is caught up answers by saving one
/// (one of them gets the lease).
pub async fn request(config: &Config, transport: &NatsTransport) -> Result<(), RunError> {
    let client = transport.client();
    client.publish(request_subject(config), format!("node-{}", config.node_id).into()).await?;
    client.flush().await?;
    Ok(())
}

/// Prints transfer progress: a live line on a terminal, a log line every few seconds
/// otherwise.
pub struct ProgressReporter {
    what: &'static str,
    started: Instant,
    last: Instant,
    terminal: bool,
}

impl ProgressReporter {
    /// A reporter for an operation named `what`.
    pub fn new(what: &'static str) -> Self {
        let now = Instant::now();
        ProgressReporter { what, started: now, last: now, terminal: std::io::stderr().is_terminal() }
    }

    /// Reports `done` of `total` bytes.
    pub fn report(&mut self, done: u64, total: u64) {
        let every = if self.terminal { Duration::from_millis(200) } else { PROGRESS_LOG_EVERY };
        if self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let left = if rate > 0.0 { (total.saturating_sub(done)) as f64 / rate } else { 0.0 };
        let mib = |b: f64| b / (1024.0 * 1024.0);
        if self.terminal {
            eprint!(
                "\r{}: {:.1}/{:.1} MiB, {:.1} MiB/s, {:.0}s left   ",
                self.what,
                mib(done as f64),
                mib(total as f64),
                mib(rate),
                left
            );
        } else {
            info!(
                what = self.what,
                done_bytes = done,
                total_bytes = total,
                rate_bytes_per_s = rate as u64,
                seconds_left = left as u64,
                "progress"
            );
        }
    }

    /// Ends the progress line.
    pub fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
