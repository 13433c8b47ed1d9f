//! The engine: one node, wiring a [`ChangeSource`], a [`LogTransport`] and the merge.
//!
//! It publishes what is pending, acknowledges what is durable, and applies what arrives.
//! Every step is an explicit call ([`Engine::publish_once`], [`Engine::receive_once`],
//! [`Engine::maintain`]) so the simulator can drive a node one step at a time; the command
//! line loops over the same steps. The engine owns no clock and no
//! randomness; waiting is bounded by the `wait` the caller passes.
//!
//! Faults tolerated: publish errors (nothing is acknowledged; the same parts are published
//! again, deduplicated by id), crashes at any point (the database holds the published
//! point and the stream positions, both moved only after the fact), redelivery (versions
//! make the merge idempotent), undecodable or unknown-schema batches (parked).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::error::{Error, Result};
use crate::model::{Batch, Hlc, NodeId, Position, SchemaChanges, Shard};
use crate::source::ChangeSource;
use crate::sqlite::Db;
use crate::transport::{LogTransport, Subscription};
use crate::wire::{self, Assembled, EncodeOptions, Reassembler, Stray};

/// Default of [`EngineConfig::clock_skew_ms_max`]: one minute.
pub const CLOCK_SKEW_MS_MAX_DEFAULT: u64 = 60_000;

/// Tunables of an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How batches are encoded.
    pub encode: EncodeOptions,
    /// Entries fetched per shard per receive step.
    pub fetch_entries_max: usize,
    /// Publish local changes (Marmot's `publish`).
    pub publish: bool,
    /// Apply remote changes (Marmot's `replicate`).
    pub replicate: bool,
    /// A remote batch whose versions are further ahead of this node's wall clock than this
    /// is logged as clock skew (0: never). Every node's clock follows the fastest one.
    pub clock_skew_ms_max: u64,
    /// An incomplete multi-part batch is parked after this many more entries of its shard
    /// (its origin crashed between parts and never publishes again), so that it never
    /// holds the shard's stored position back for ever. Keep it well below the entries a
    /// stream keeps.
    pub stray_after_entries: u64,
    /// Publishing pauses while this node's own reader of its shard is more than this many
    /// entries behind the last entry it published (for at most [`PUBLISH_HOLD_MAX`]): a
    /// node whose consumer is stalled (its server left the cluster, an election) does not
    /// push the stream past its own position, and past the other nodes' stalled at the
    /// same moment. `u64::MAX`: never pause.
    pub publish_ahead_entries_max: u64,
    /// Apply other nodes' schema changes from the schema log (`replicate_ddl`); off, the
    /// log's entries are passed over and schemas are changed on every node by hand.
    pub replicate_ddl: bool,
    /// Tombstones (versions of deleted rows) are removed once older than this, in
    /// milliseconds (0: kept for ever). Local changes left unpublished for longer are never
    /// published (the node restores a snapshot instead). The same on every node.
    pub tombstone_retention_ms: u64,
    /// Conflict-journal entries are removed once their losing write is older than this, in
    /// milliseconds (0: kept for ever).
    pub conflicts_retention_ms: u64,
}

/// Default of [`EngineConfig::tombstone_retention_ms`]: seven days.
pub const TOMBSTONE_RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

/// Default of [`EngineConfig::conflicts_retention_ms`]: seven days.
pub const CONFLICTS_RETENTION_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;

/// Longest time between two looks for tombstones to collect.
pub const COLLECT_EVERY_MS_MAX: u64 = 60_000;

/// The shard whose log orders schema changes cluster-wide.
pub const SCHEMA_SHARD: Shard = Shard(0);

/// How long another node may go on publishing with a schema that differs from this
/// node's before it is logged as a warning (a schema change takes a moment to propagate).
pub const SCHEMA_DIFFERS_WARN_MS: u64 = 60_000;

/// Longest pause of publishing while this node's reader lags (see
/// [`EngineConfig::publish_ahead_entries_max`]); afterwards publishing goes on regardless.
pub const PUBLISH_HOLD_MAX: Duration = Duration::from_secs(10);

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            encode: EncodeOptions::default(),
            fetch_entries_max: 256,
            publish: true,
            replicate: true,
            clock_skew_ms_max: CLOCK_SKEW_MS_MAX_DEFAULT,
            stray_after_entries: wire::STRAY_AFTER_ENTRIES_DEFAULT,
            publish_ahead_entries_max: u64::MAX,
            replicate_ddl: true,
            tombstone_retention_ms: TOMBSTONE_RETENTION_MS_DEFAULT,
            conflicts_retention_ms: CONFLICTS_RETENTION_MS_DEFAULT,
        }
    }
}

/// Crash points a test or the simulator can arm. Each fires once.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Fail after publishing a batch and before acknowledging it.
    pub crash_before_ack: bool,
    /// Fail in the middle of applying a batch, after this many row changes.
    pub crash_after_rows: Option<u64>,
}

/// Counters of what the engine did since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Batches published and acknowledged.
    pub batches_published: u64,
    /// Row changes published.
    pub changes_published: u64,
    /// Remote batches applied.
    pub batches_applied: u64,
    /// Remote row changes applied.
    pub rows_applied: u64,
    /// Remote row changes skipped as older than the stored version.
    pub rows_skipped: u64,
    /// Remote row changes passed over because their table is not replicated here.
    pub rows_excluded: u64,
    /// Entries parked (undecodable, or naming a missing table or column).
    pub batches_parked: u64,
    /// Publish attempts that failed (and will be retried).
    pub publish_errors: u64,
    /// The highest version in the most recently applied remote batch (0 before any). Its
    /// milliseconds are the origin's commit time, so `now - last_applied_hlc.millis()`
    /// right after a receive step is the replication lag (the metrics endpoint samples it).
    pub last_applied_hlc: Hlc,
    /// How far ahead of this node's wall clock the last remote batch's versions were, in
    /// milliseconds (clock skew plus transit).
    pub remote_ahead_ms: u64,
    /// Remote batches whose versions were more than `clock_skew_ms_max` ahead.
    pub skewed_batches: u64,
    /// Incomplete batches parked after waiting `stray_after_entries` for their other parts.
    pub strays_parked: u64,
    /// Parked incomplete batches fed back because more of their parts arrived.
    pub strays_adopted: u64,
    /// Shards whose log was found deleted and created again, and read from its start.
    pub streams_restarted: u64,
    /// Publish attempts skipped because this node's reader lagged what it published.
    pub publish_holds: u64,
    /// Schema changes of this node published on the schema log.
    pub schema_changes_published: u64,
    /// Entries of the schema log applied (this node's own included).
    pub schema_changes_applied: u64,
    /// Tombstones removed after the retention.
    pub tombstones_collected: u64,
}

struct ShardReader {
    sub: Box<dyn Subscription>,
    reassembler: Reassembler,
}

/// One node.
pub struct Engine<S: ChangeSource> {
    source: S,
    db: Db,
    transport: Arc<dyn LogTransport>,
    config: EngineConfig,
    readers: BTreeMap<Shard, ShardReader>,
    stats: EngineStats,
    faults: Faults,
    parked_generation: u64,
    /// Positions passed by entries that needed no database write (this node's own
    /// batches); stored by [`Engine::flush`] or with the next applied batch.
    deferred_positions: BTreeMap<Shard, Position>,
    /// Parked parts of incomplete batches, by origin and batch id: their parked ids.
    /// Loaded from the database when first needed.
    strays: Option<BTreeMap<(NodeId, u64), Vec<i64>>>,
    /// Parked parts fed back into a reassembler because more of their batch arrived;
    /// unparked once the batch is applied (or parked whole).
    adopted: BTreeMap<(NodeId, u64), Vec<i64>>,
    /// Per shard: the last position this node published, and the last one it read.
    published_at: BTreeMap<Shard, Position>,
    read_at: BTreeMap<Shard, Position>,
    /// Since when publishing pauses because this node's reader lags.
    holding_since: Option<std::time::Instant>,
    /// Other nodes whose last batch carried a schema fingerprint unlike this node's.
    peer_schemas: BTreeMap<NodeId, PeerSchema>,
    /// Whether schema changes are parked here (`None`: not looked yet).
    parked_schema: Option<bool>,
    /// When (wall ms) tombstones were last looked for.
    collected_at_ms: u64,
    /// When [`Engine::collect_conflicts`] last looked (wall-clock ms).
    conflicts_collected_at_ms: u64,
    /// Whether expired changes were set aside and a restore is due (`None`: not read yet).
    restore_required: Option<bool>,
}

/// Another node's schema, as its batches report it, when it differs from this node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSchema {
    /// Its fingerprint.
    pub fingerprint: u64,
    /// Since when (ms since the epoch) it differs from this node's.
    pub differs_since_ms: u64,
    warned: bool,
}

/// A multi-part batch: its origin and its id there.
type BatchKey = (NodeId, u64);

/// The shard an origin publishes to: its transactions stay in order.
pub fn shard_of(origin: NodeId, shards: u32) -> Shard {
    let h = xxhash_rust::xxh3::xxh3_64(&origin.0.to_le_bytes());
    Shard((h % shards.max(1) as u64) as u32)
}

impl<S: ChangeSource> Engine<S> {
    /// A node reading local changes from `source`, merging into `db`, over `transport`.
    pub fn new(source: S, db: Db, transport: Arc<dyn LogTransport>, config: EngineConfig) -> Self {
        // Zero: the first maintenance retries parked batches, in case the schema was fixed
        // while the node was stopped.
        let parked_generation = 0;
        Engine {
            source,
            db,
            transport,
            config,
            readers: BTreeMap::new(),
            stats: EngineStats::default(),
            faults: Faults::default(),
            parked_generation,
            deferred_positions: BTreeMap::new(),
            strays: None,
            adopted: BTreeMap::new(),
            published_at: BTreeMap::new(),
            read_at: BTreeMap::new(),
            holding_since: None,
            peer_schemas: BTreeMap::new(),
            parked_schema: None,
            collected_at_ms: 0,
            conflicts_collected_at_ms: 0,
            restore_required: None,
        }
    }

    /// Other nodes whose last batch carried a schema fingerprint different from this
    /// node's.
    pub fn differing_schemas(&self) -> &BTreeMap<NodeId, PeerSchema> {
        &self.peer_schemas
    }

    /// Arms crash points (simulation and tests).
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
    }

    /// Whether publishing pauses because this node's reader lags what it published.
    pub fn publishing_held(&self) -> bool {
        self.holding_since.is_some()
    }

    /// What the engine did so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The merge connection.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The change source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn LogTransport> {
        &self.transport
    }

    /// Publishes everything pending as one batch and acknowledges it once every part is
    /// durable. Returns the number of row changes published.
    pub async fn publish_once(&mut self) -> Result<u64> {
        if !self.config.publish {
            return Ok(0);
        }
        self.publish_schema_changes().await?;
        let shard = shard_of(self.db.node(), self.transport.shard_count());
        if self.reader_lags(shard)? {
            return Ok(0);
        }
        let pending = loop {
            let Some(pending) = self.source.pending().await? else {
                // After a set-aside, changes committed since are published (they are
                // young); then the node must restore.
                let required = match self.restore_required {
                    Some(r) => r,
                    None => *self.restore_required.insert(self.db.restore_required()?),
                };
                return if required { Err(Error::RestoreRequired) } else { Ok(0) };
            };
            self.refuse_expired(&pending.batch)?;
            if !pending.batch.tables.is_empty() {
                break pending;
            }
            // Every row read was overwritten since by a newer remote write, which carries
            // it; a backlog cut into batches may have more after it.
            self.source.acknowledge(pending.through).await?;
        };
        let parts = wire::encode_batch(&pending.batch, self.config.encode);
        let transport = &self.transport;
        let results =
            futures::future::join_all(parts.iter().map(|p| transport.publish(shard, &p.id, p.payload.clone()))).await;
        let mut last = Position(0);
        for r in results {
            match r {
                Ok(p) => last = last.max(p),
                Err(e) => {
                    self.stats.publish_errors += 1;
                    return Err(e);
                }
            }
        }
        let at = self.published_at.entry(shard).or_default();
        *at = (*at).max(last);
        if std::mem::take(&mut self.faults.crash_before_ack) {
            return Err(Error::InjectedCrash("publish: after publish, before acknowledge"));
        }
        self.source.acknowledge(pending.through).await?;
        let n = pending.batch.len() as u64;
        self.stats.batches_published += 1;
        self.stats.changes_published += n;
        debug!(shard = %shard, changes = n, parts = parts.len(), through = %pending.through, "published batch");
        Ok(n)
    }

    /// Sets every pending local change aside, never to be published, after
    /// [`Error::ChangesExpired`]: once this engine has published what was committed since,
    /// it answers [`Error::RestoreRequired`] and the node restores a snapshot. Returns how
    /// many were set aside.
    pub fn set_aside_pending(&mut self) -> Result<u64> {
        let n = self.db.set_aside_pending()?;
        self.restore_required = Some(true);
        Ok(n)
    }

    /// Refuses to publish local changes older than the tombstone retention (see
    /// [`Error::ChangesExpired`]).
    fn refuse_expired(&self, batch: &Batch) -> Result<()> {
        let retention_ms = self.config.tombstone_retention_ms;
        let Some(oldest) = batch.min_hlc() else { return Ok(()) };
        let age_ms = self.db.wall_ms()?.saturating_sub(oldest.millis());
        if retention_ms == 0 || age_ms <= retention_ms {
            return Ok(());
        }
        Err(Error::ChangesExpired { changes: batch.len() as u64, age_ms, retention_ms })
    }

    /// Publishes this node's queued schema changes on the schema log, oldest first, each
    /// dequeued once durable.
    async fn publish_schema_changes(&mut self) -> Result<()> {
        self.db.refresh_if_schema_changed()?;
        while let Some((id, changes)) = self.db.next_schema_change()? {
            let n = changes.objects.len();
            let batch = Batch {
                origin: self.db.node(),
                schema: Some(changes),
                schema_fingerprint: self.db.schema_fingerprint(),
                ..Batch::default()
            };
            for part in wire::encode_batch(&batch, self.config.encode) {
                if let Err(e) = self.transport.publish(SCHEMA_SHARD, &part.id, part.payload).await {
                    self.stats.publish_errors += 1;
                    return Err(e);
                }
            }
            self.db.schema_change_published(id)?;
            self.stats.schema_changes_published += 1;
            info!(objects = n, "published a schema change");
        }
        Ok(())
    }

    /// Whether publishing should pause: this node's reader of `shard` is more than
    /// `publish_ahead_entries_max` behind what it published, and has been for less than
    /// [`PUBLISH_HOLD_MAX`].
    fn reader_lags(&mut self, shard: Shard) -> Result<bool> {
        // A node that does not read (`replicate = false`) has no reader to wait for.
        if !self.config.replicate {
            return Ok(false);
        }
        let Some(&published) = self.published_at.get(&shard) else { return Ok(false) };
        let read = match self.read_at.get(&shard) {
            Some(&p) => p,
            None => self.db.position(shard)?,
        };
        if published.0.saturating_sub(read.0) <= self.config.publish_ahead_entries_max {
            if let Some(since) = self.holding_since.take() {
                debug!(shard = %shard, held_ms = since.elapsed().as_millis() as u64, "reader caught up; publishing again");
            }
            return Ok(false);
        }
        let since = *self.holding_since.get_or_insert_with(|| {
            debug!(shard = %shard, published = %published, read = %read,
                "this node's reader lags what it published; publishing pauses until it catches up");
            std::time::Instant::now()
        });
        if since.elapsed() < PUBLISH_HOLD_MAX {
            self.stats.publish_holds += 1;
            return Ok(true);
        }
        Ok(false)
    }

    async fn reader(&mut self, shard: Shard) -> Result<&mut ShardReader> {
        if !self.readers.contains_key(&shard) {
            self.check_epoch(shard).await?;
            let from = self.db.position(shard)?;
            let sub = self.transport.subscribe(shard, from).await?;
            debug!(shard = %shard, after = %from, "subscribed");
            let reassembler = Reassembler::new(self.config.stray_after_entries);
            self.readers.insert(shard, ShardReader { sub, reassembler });
        }
        Ok(self.readers.get_mut(&shard).expect("reader just inserted"))
    }

    /// Records (or checks) the epoch of every shard's log, as subscribing does; a snapshot
    /// saved afterwards names the logs its positions belong to.
    pub async fn check_epochs(&mut self) -> Result<()> {
        for s in 0..self.transport.shard_count() {
            self.check_epoch(Shard(s)).await?;
        }
        Ok(())
    }

    /// Makes sure the stored position of `shard` belongs to the log the transport has now:
    /// a log deleted and created again (its data lost) is read again from its start,
    /// instead of skipping its first entries up to the old position.
    async fn check_epoch(&mut self, shard: Shard) -> Result<()> {
        let bounds = self.transport.bounds(shard).await?;
        let epoch = bounds.epoch;
        let stored = self.db.stream_epoch(shard)?;
        if epoch == 0 || stored == epoch {
            return Ok(());
        }
        if stored == 0 {
            if self.db.position(shard)? == Position(0) {
                // Nothing read from this log yet: a new node, or one whose Marmot state was
                // removed (`-cleanup`, a lost database file). What the log holds of this
                // node's own changes may be missing here: apply them like remote ones, so
                // that an older remote write never wins over them on this node only.
                self.db.set_own_replay_through(shard, bounds.last)?;
            }
            return self.db.set_stream_epoch(shard, epoch);
        }
        warn!(shard = %shard, position = %self.db.position(shard)?,
            "the stream of this shard was deleted and created again (its data lost); reading the new one from its start");
        self.stats.streams_restarted += 1;
        self.db.restart_shard(shard, epoch)
    }

    /// Reads what `shard` has (waiting at most `wait` for the first entry) and applies it.
    /// Returns the number of entries processed. After any error the shard is re-read from
    /// the stored position, so nothing is skipped.
    pub async fn receive_once(&mut self, shard: Shard, wait: Duration) -> Result<usize> {
        if !self.config.replicate {
            return Ok(0);
        }
        let max = self.config.fetch_entries_max;
        let entries = match self.reader(shard).await?.sub.next_entries(max, wait).await {
            Ok(e) => e,
            Err(e) => {
                self.readers.remove(&shard);
                return Err(e);
            }
        };
        let n = entries.len();
        for entry in entries {
            if let Err(e) = self.process(shard, entry.position, &entry.payload) {
                self.readers.remove(&shard);
                return Err(e);
            }
            let at = self.read_at.entry(shard).or_default();
            *at = (*at).max(entry.position);
        }
        Ok(n)
    }

    fn process(&mut self, shard: Shard, position: Position, payload: &[u8]) -> Result<()> {
        let (key, early) = self.adopt_parked_parts(shard, payload)?;
        if !early.is_empty() {
            // The parked parts completed a batch whose other parts were here already: this
            // entry is one more copy of a part of it.
            let before = Position(position.0 - 1);
            for assembled in early {
                let reader = self.readers.get_mut(&shard).expect("reader exists while processing");
                let safe = reader.reassembler.safe_position(before);
                self.handle(shard, before, safe, assembled)?;
            }
            return self.unpark_adopted(key);
        }
        let reader = self.readers.get_mut(&shard).expect("reader exists while processing");
        let assembled = reader.reassembler.feed(position, payload);
        let strays = reader.reassembler.take_strays();
        // Strays are parked with a position short of this entry and of every part of a
        // batch this entry completes: that batch is applied (and its position stored)
        // below, and a crash in between must re-read it whole.
        let park_at = reader.reassembler.safe_position(Position(position.0 - 1));
        let safe = reader.reassembler.safe_position(position);
        for stray in strays {
            self.park_stray(shard, park_at, stray)?;
        }
        let done = !matches!(assembled, Assembled::Incomplete);
        self.handle(shard, position, safe, assembled)?;
        if done {
            self.unpark_adopted(key)?;
        }
        Ok(())
    }

    /// Unparks the parked parts of the batch `key` once the batch is handled.
    fn unpark_adopted(&mut self, key: Option<BatchKey>) -> Result<()> {
        if let Some(ids) = key.and_then(|k| self.adopted.remove(&k)) {
            for id in ids {
                self.db.unpark(id)?;
            }
        }
        Ok(())
    }

    fn handle(&mut self, shard: Shard, position: Position, safe: Position, assembled: Assembled) -> Result<()> {
        match assembled {
            Assembled::Incomplete => Ok(()),
            Assembled::Bad { error, bytes } => self.park(shard, safe, &error, &bytes),
            Assembled::Batch(Batch { schema: Some(changes), origin, .. }) => {
                self.apply_schema(shard, position, safe, origin, &changes)
            }
            Assembled::Batch(batch)
                if batch.origin == self.db.node() && position > self.db.own_replay_through(shard)? =>
            {
                // Our own changes coming back: nothing to apply, no write to wait for.
                self.deferred_positions.insert(shard, safe);
                Ok(())
            }
            Assembled::Batch(batch) => {
                let crash = self.faults.crash_after_rows.take();
                match self.db.apply_entry(shard, safe, &batch, crash) {
                    Ok(out) => {
                        if batch.origin != self.db.node() {
                            self.stats.batches_applied += 1;
                            self.stats.rows_applied += out.applied;
                            self.stats.rows_skipped += out.skipped;
                            self.stats.rows_excluded += out.excluded;
                            self.stats.last_applied_hlc = batch.max_hlc().unwrap_or_default();
                            self.note_schema(batch.origin, batch.schema_fingerprint)?;
                            if self.parked_schema != Some(false) {
                                self.retry_parked_schema()?;
                            }
                            self.note_skew(batch.origin, out.remote_ahead_ms);
                            debug!(shard = %shard, position = %position, origin = %batch.origin,
                                applied = out.applied, skipped = out.skipped, "applied batch");
                        }
                        Ok(())
                    }
                    Err(error) if error.is_data_error() => {
                        let opts = EncodeOptions { compress: true, part_bytes_max: usize::MAX };
                        let bytes = wire::encode_batch(&batch, opts).remove(0).payload;
                        self.park(shard, safe, &error, &bytes)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// When `payload` is a part of a batch whose earlier parts were parked as a stray,
    /// feeds those parts back into the shard's reassembler first. Returns the entry's
    /// batch key while parked parts of it are in play, and what the parked parts completed.
    fn adopt_parked_parts(&mut self, shard: Shard, payload: &[u8]) -> Result<(Option<BatchKey>, Vec<Assembled>)> {
        if self.strays.is_none() {
            let mut strays: BTreeMap<(NodeId, u64), Vec<i64>> = BTreeMap::new();
            for (id, _, bytes) in self.db.parked()? {
                if let Some((origin, batch_id, _)) = wire::decode_stray(&bytes) {
                    strays.entry((origin, batch_id)).or_default().push(id);
                }
            }
            self.strays = Some(strays);
        }
        let strays = self.strays.as_mut().expect("loaded above");
        if strays.is_empty() && self.adopted.is_empty() {
            return Ok((None, Vec::new()));
        }
        let Some(key) = Reassembler::multi_part_key(payload) else { return Ok((None, Vec::new())) };
        let mut early = Vec::new();
        if let Some(ids) = strays.remove(&key) {
            let reader = self.readers.get_mut(&shard).expect("reader exists while processing");
            for (id, _, bytes) in self.db.parked()?.into_iter().filter(|(id, _, _)| ids.contains(id)) {
                if let Some((_, _, parts)) = wire::decode_stray(&bytes) {
                    early.extend(reader.reassembler.adopt(&parts));
                    self.stats.strays_adopted += 1;
                    info!(parked_id = id, origin = %key.0, batch = key.1, "more of a parked incomplete batch arrived");
                }
            }
            self.adopted.entry(key).or_default().extend(ids);
        }
        Ok((self.adopted.contains_key(&key).then_some(key), early))
    }

    fn park_stray(&mut self, shard: Shard, position: Position, stray: Stray) -> Result<()> {
        let error = Error::Corrupt(format!(
            "incomplete batch {} of node {}: {} of its {} parts arrived, the rest not within {} entries \
             (its origin stopped between parts; it publishes those changes again if it comes back)",
            stray.batch_id,
            stray.origin,
            stray.parts.len(),
            stray.part_count,
            self.config.stray_after_entries
        ));
        self.park(shard, position, &error, &wire::encode_stray(&stray))?;
        self.stats.strays_parked += 1;
        // Reloaded when next needed, with this one's id.
        self.strays = None;
        Ok(())
    }

    /// Applies an entry of the schema log; one that cannot be applied here is parked.
    fn apply_schema(
        &mut self,
        shard: Shard,
        position: Position,
        safe: Position,
        origin: NodeId,
        changes: &SchemaChanges,
    ) -> Result<()> {
        if !self.config.replicate_ddl {
            self.deferred_positions.insert(shard, safe);
            return Ok(());
        }
        match self.db.apply_schema(shard, safe, origin, changes) {
            Ok(notes) => {
                self.stats.schema_changes_applied += 1;
                for note in notes {
                    warn!(origin = %origin, position = %position, "{note}");
                }
                let names: Vec<&str> = changes.objects.iter().map(|o| o.name.as_str()).collect();
                info!(origin = %origin, position = %position, objects = ?names,
                    fingerprint = %format!("{:016x}", self.db.schema_fingerprint()), "applied a schema change");
                Ok(())
            }
            Err(error) if error.is_data_error() => {
                error!(origin = %origin, position = %position, error = %error,
                    "a schema change from the schema log cannot be applied here; it is parked and this \
                     node's schema now differs from the other nodes' (see `marmot status`): make the schema \
                     match by hand, then restart");
                let batch = Batch { origin, schema: Some(changes.clone()), ..Batch::default() };
                let opts = EncodeOptions { compress: true, part_bytes_max: usize::MAX };
                let bytes = wire::encode_batch(&batch, opts).remove(0).payload;
                self.parked_schema = Some(true);
                self.park(shard, safe, &error, &bytes)
            }
            Err(e) => Err(e),
        }
    }

    /// Notes the schema fingerprint another node's batch carried: a difference is logged
    /// when it lasts longer than [`SCHEMA_DIFFERS_WARN_MS`].
    fn note_schema(&mut self, origin: NodeId, fingerprint: u64) -> Result<()> {
        let ours = self.db.schema_fingerprint();
        if fingerprint == 0 || fingerprint == ours {
            self.peer_schemas.remove(&origin);
            return Ok(());
        }
        let now = self.db.wall_ms()?;
        let peer = self.peer_schemas.entry(origin).or_insert_with(|| {
            debug!(origin = %origin, "node {origin} publishes with another schema than this node's \
                (normal while a schema change propagates)");
            PeerSchema { fingerprint, differs_since_ms: now, warned: false }
        });
        if peer.fingerprint != fingerprint {
            *peer = PeerSchema { fingerprint, differs_since_ms: now, warned: false };
        }
        if !peer.warned && now.saturating_sub(peer.differs_since_ms) > SCHEMA_DIFFERS_WARN_MS {
            peer.warned = true;
            warn!(origin = %origin, theirs = %format!("{fingerprint:016x}"), ours = %format!("{ours:016x}"),
                "node {origin}'s schema has differed from this node's for over a minute: compare `marmot status` \
                 on both; a schema change that could not be applied is parked");
        }
        Ok(())
    }

    fn note_skew(&mut self, origin: NodeId, ahead_ms: u64) {
        self.stats.remote_ahead_ms = ahead_ms;
        let max = self.config.clock_skew_ms_max;
        if max == 0 || ahead_ms <= max {
            return;
        }
        self.stats.skewed_batches += 1;
        // Once per hundred such batches: a skewed peer would otherwise flood the log.
        if self.stats.skewed_batches % 100 == 1 {
            warn!(origin = %origin, ahead_ms, max_clock_skew_ms = max,
                "a remote change is versioned further ahead of this node's clock than max_clock_skew: \
                 check NTP on node {origin}; every node's clock follows the fastest one");
        }
    }

    fn park(&mut self, shard: Shard, position: Position, error: &Error, bytes: &[u8]) -> Result<()> {
        self.db.park(shard, position, error, bytes)?;
        self.stats.batches_parked += 1;
        warn!(shard = %shard, position = %position, error = %error, "parked a batch that cannot be applied");
        Ok(())
    }

    /// Makes acknowledgements and deferred positions durable.
    pub async fn flush(&mut self) -> Result<()> {
        self.source.flush().await?;
        for (shard, position) in std::mem::take(&mut self.deferred_positions) {
            self.db.store_position(shard, position)?;
        }
        Ok(())
    }

    /// Housekeeping: makes acknowledgements durable, deletes one slice of published log
    /// rows, returns set-aside rows whose unique values became free, and retries parked
    /// batches after a schema change. Returns whether published rows are left to delete
    /// (call again soon; a slice is one short write transaction, so the caller can publish
    /// and apply in between).
    pub async fn maintain(&mut self) -> Result<bool> {
        self.flush().await?;
        // Schema first: no log row is folded or cleaned against a schema Marmot has not read.
        self.db.refresh_if_schema_changed()?;
        let mut more = false;
        match self.db.clean_published_step().and_then(|(_, m)| {
            more = m;
            self.db.reconcile()
        }) {
            Err(Error::SchemaChanged) => debug!("schema changed during maintenance; the next one catches up"),
            other => {
                other?;
            }
        }
        if self.db.schema_generation() != self.parked_generation {
            self.parked_generation = self.db.schema_generation();
            self.retry_parked()?;
        }
        more |= self.collect_tombstones().await?;
        more |= self.collect_conflicts()?;
        Ok(more)
    }

    /// Removes one slice of conflict-journal entries older than their retention, and of
    /// base notes below the tombstone horizon (no write that old can arrive any more).
    /// Looks at most every eighth of the retention (and every minute). Returns whether
    /// more are left.
    fn collect_conflicts(&mut self) -> Result<bool> {
        let retention = self.config.conflicts_retention_ms;
        let (_, horizon) = self.db.tombstones_collected()?;
        if retention == 0 && horizon.0 == 0 {
            return Ok(false);
        }
        let now = self.db.wall_ms()?;
        let every = match retention {
            0 => COLLECT_EVERY_MS_MAX,
            r => (r / 8).clamp(1, COLLECT_EVERY_MS_MAX),
        };
        if now < self.conflicts_collected_at_ms + every {
            return Ok(false);
        }
        self.conflicts_collected_at_ms = now;
        let before = match retention {
            0 => Hlc(0),
            r => Hlc::from_millis(now.saturating_sub(r)),
        };
        let (n, more) = self.db.collect_conflicts_step(before, horizon)?;
        if n > 0 {
            debug!(removed = n, "removed old conflict-journal entries and base notes");
        }
        if more {
            self.conflicts_collected_at_ms = 0;
        }
        Ok(more)
    }

    /// Removes one slice of tombstones older than the retention, when it is safe (see
    /// `sqlite::tombstones`): notes first whether this node has applied everything its
    /// logs hold now. Looks at most every eighth of the retention (and every minute).
    /// Returns whether more are left.
    async fn collect_tombstones(&mut self) -> Result<bool> {
        let retention = self.config.tombstone_retention_ms;
        if retention == 0 || !self.config.replicate {
            return Ok(false);
        }
        let now = self.db.wall_ms()?;
        if now < self.collected_at_ms + (retention / 8).clamp(1, COLLECT_EVERY_MS_MAX) {
            return Ok(false);
        }
        self.collected_at_ms = now;
        let mut caught_up = true;
        for s in 0..self.transport.shard_count() {
            let shard = Shard(s);
            // Unreachable servers (a partition) only mean: not known to be caught up now.
            // Maintenance never fails for them.
            let bounds = match self.transport.bounds(shard).await {
                Ok(b) => b,
                Err(e) => {
                    debug!(error = %e, "stream bounds unavailable; not collecting tombstones this time");
                    caught_up = false;
                    break;
                }
            };
            let epoch = self.db.stream_epoch(shard)?;
            let recreated = epoch != 0 && bounds.epoch != 0 && epoch != bounds.epoch;
            // Read through, not stored through: the stored position stays short of an
            // incomplete batch, whose remaining parts its origin can only publish within
            // the retention of its versions (so above the horizon noted now).
            let stored = self.db.position(shard)?;
            let read = self.read_at.get(&shard).copied().unwrap_or(stored).max(stored);
            if recreated || read < bounds.last {
                caught_up = false;
                break;
            }
        }
        if caught_up {
            self.db.note_caught_up(now)?;
        }
        let since = self.db.caught_up_ms()?;
        let mut horizon = since.saturating_sub(retention).saturating_sub(self.config.clock_skew_ms_max);
        if let Some(parked) = self.oldest_parked_ms()? {
            horizon = horizon.min(parked.saturating_sub(self.config.clock_skew_ms_max));
        }
        if horizon == 0 {
            return Ok(false);
        }
        let (n, more) = self.db.collect_tombstones_step(Hlc::from_millis(horizon))?;
        if n > 0 {
            self.stats.tombstones_collected += n;
            debug!(tombstones = n, horizon_ms = horizon, "collected tombstones older than the retention");
        }
        if more {
            // Due again at the next maintenance.
            self.collected_at_ms = 0;
        }
        Ok(more)
    }

    /// The wall-clock milliseconds of the oldest row change in a parked batch (which this
    /// node applies once its schema fits): tombstones younger than it are kept.
    fn oldest_parked_ms(&self) -> Result<Option<u64>> {
        let mut oldest: Option<u64> = None;
        for (_, _, bytes) in self.db.parked()? {
            // A stray (part of an incomplete batch) does not decode alone: it is applied only
            // with parts its origin publishes later, within the retention by the publishing
            // rule, so it holds nothing back.
            let Ok(batch) = wire::decode_single(&bytes) else { continue };
            if let Some(h) = batch.min_hlc() {
                oldest = Some(oldest.map_or(h.millis(), |o| o.min(h.millis())));
            }
        }
        Ok(oldest)
    }

    /// Applies parked schema changes that now apply: one that failed on rows its
    /// origin changed in the same transaction (a constraint the migration satisfied) goes
    /// through once those rows arrived. Safe at any time: per object, a newer change
    /// applied since wins. Returns how many were applied.
    pub fn retry_parked_schema(&mut self) -> Result<u64> {
        let (mut applied, mut left) = (0, false);
        for (id, _, bytes) in self.db.parked()? {
            let Ok(Batch { schema: Some(changes), origin, .. }) = wire::decode_single(&bytes) else { continue };
            match self.db.apply_schema(Shard(0), Position(0), origin, &changes) {
                Ok(notes) => {
                    self.db.unpark(id)?;
                    applied += 1;
                    self.stats.schema_changes_applied += 1;
                    for note in notes {
                        warn!(origin = %origin, "{note}");
                    }
                    info!(parked_id = id, origin = %origin, "applied a parked schema change");
                }
                Err(e) if e.is_data_error() => left = true,
                Err(e) => return Err(e),
            }
        }
        self.parked_schema = Some(left);
        Ok(applied)
    }

    /// Applies parked batches that now fit the local schema. Returns how many were applied.
    pub fn retry_parked(&mut self) -> Result<u64> {
        let mut applied = self.retry_parked_schema()?;
        for (id, _, bytes) in self.db.parked()? {
            let Ok(batch) = wire::decode_single(&bytes) else { continue };
            if batch.schema.is_some() {
                continue;
            }
            match self.db.apply_parked(id, &batch) {
                Ok(_) => {
                    self.db.unpark(id)?;
                    applied += 1;
                    info!(parked_id = id, origin = %batch.origin, "applied a parked batch");
                }
                Err(e) if e.is_data_error() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(applied)
    }

    /// One round: publish, then receive from every shard without waiting.
    pub async fn step(&mut self) -> Result<usize> {
        let mut work = self.publish_once().await? as usize;
        for s in 0..self.transport.shard_count() {
            work += self.receive_once(Shard(s), Duration::ZERO).await?;
        }
        Ok(work)
    }
}
