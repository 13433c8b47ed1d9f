//! The simulated world: nodes (each a real SQLite file with real triggers, an application
//! connection and a `marmot` engine) on one memory transport, driven one action at a time.
//!
//! What the nodes start with is in [`crate::schema`], what applications write in
//! [`crate::workload`], the faults in [`crate::faults`] and the checks in
//! [`crate::oracle`]; this module runs the phases and counts what happened
//! ([`crate::counters`]).

use std::path::PathBuf;
use std::sync::Arc;

use futures::executor::block_on;
use marmot_core::engine::{Engine, EngineConfig, EngineStats, Faults};
use marmot_core::sqlite::{CaptureOptions, CommitPoints, Db, SqliteChangeSource};
use marmot_core::wire::EncodeOptions;
use marmot_core::{Error, LogTransport, NodeId, Shard};
use marmot_transports::{MemoryLog, MemoryTransport};
use rusqlite::Connection;

use crate::counters::Counters;
use crate::faults::fault_config;
use crate::model::Write;
use crate::scenario::{Action, Scenario, WriteOp};
use crate::{oracle, schema, workload};

const QUIESCE_ROUNDS_MAX: usize = 400;
/// What [`Engine::publish_once`] fails with when `Faults::crash_before_ack` fires.
const CRASH_BEFORE_ACK: &str = "publish: after publish, before acknowledge";
/// What applying a batch fails with when `Faults::crash_after_rows` fires.
const CRASH_MID_APPLY: &str = "apply: before commit";

pub(crate) struct Node {
    pub(crate) path: PathBuf,
    pub(crate) app: Connection,
    transport: MemoryTransport,
    pub(crate) engine: Option<Engine<SqliteChangeSource>>,
    pub(crate) log_seen: u64,
    pub(crate) next_gid: i64,
    /// Commit points recorded after the application's transactions, where the node's
    /// reader may cut a backlog (as `marmot`'s sampler records them).
    points: Arc<CommitPoints>,
    /// Rows set aside when last looked at (new ones are counted).
    aside: u64,
}

/// A failed check, with what was seen.
#[derive(Debug)]
pub struct Failure(pub String);

/// The simulated cluster.
pub struct World {
    _dir: tempfile::TempDir,
    pub(crate) log: MemoryLog,
    pub(crate) nodes: Vec<Node>,
    pub(crate) scenario: Scenario,
    pub(crate) writes: Vec<Write>,
    /// Events, in order; equal traces mean equal runs.
    pub trace: Vec<String>,
    tick: u64,
    /// What the world itself counted; [`World::counters`] adds the transport's and engines'.
    pub(crate) counters: Counters,
    /// Stats of engines dropped by crashes and restores.
    pub(crate) retired: Vec<EngineStats>,
    /// The snapshot store every node saves to and restores from.
    pub(crate) snapshots: marmot_core::snapshots::Snapshots,
    /// How many times each migration ran (on any node).
    pub(crate) migrations_run: Vec<u32>,
    /// Row changes that reached the log in complete batches (runs with a retention).
    pub(crate) stored: crate::expiry::StoredWrites,
}

/// What node `i`'s capture runs with: the simulated clock and the node's selection.
pub(crate) fn capture_options(s: &Scenario, i: usize) -> CaptureOptions {
    CaptureOptions {
        time_ms_sql: schema::TIME_SQL.to_owned(),
        selection: s.selections[i].clone(),
        conflicts: true,
        ..CaptureOptions::default()
    }
}

fn engine_config(s: &Scenario) -> EngineConfig {
    let defaults = EngineConfig::default();
    EngineConfig {
        encode: EncodeOptions { compress: s.faults.compress, part_bytes_max: s.faults.part_bytes_max },
        fetch_entries_max: 8,
        stray_after_entries: s.faults.stray_after_entries,
        tombstone_retention_ms: s.tombstone_retention_ms,
        // The journal's oracle compares every entry at the end.
        conflicts_retention_ms: 0,
        // The horizon's skew margin: the largest skew drawn (every clock is at least 0).
        clock_skew_ms_max: match s.tombstone_retention_ms {
            0 => defaults.clock_skew_ms_max,
            _ => s.skew_ms.iter().copied().max().unwrap_or(0) + 1,
        },
        ..defaults
    }
}

impl World {
    /// Builds the nodes of `scenario`, with transport faults seeded by `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Result<World, Failure> {
        let dir = tempfile::tempdir().map_err(|e| Failure(format!("tempdir: {e}")))?;
        let log = MemoryLog::new(scenario.shards, 1 << 40, seed);
        let mut nodes = Vec::new();
        for i in 0..scenario.nodes {
            let path = dir.path().join(format!("node-{}.db", i + 1));
            let app = Connection::open(&path).map_err(|e| Failure(format!("open: {e}")))?;
            // The simulation models process crashes, not power loss: no fsync per commit.
            app.execute_batch("PRAGMA synchronous = OFF").map_err(|e| Failure(format!("synchronous: {e}")))?;
            app.execute_batch(schema::SCHEMA).map_err(|e| Failure(format!("schema: {e}")))?;
            let transport = log.connect(fault_config(&scenario.faults));
            nodes.push(Node {
                path,
                app,
                transport,
                engine: None,
                log_seen: 0,
                points: Arc::default(),
                next_gid: (i as i64 + 1) << 32,
                aside: 0,
            });
        }
        let mut world = World {
            _dir: dir,
            log,
            nodes,
            scenario,
            writes: Vec::new(),
            trace: Vec::new(),
            tick: 0,
            counters: Counters::default(),
            retired: Vec::new(),
            snapshots: crate::snapshots::snapshots(),
            migrations_run: vec![0; schema::MIGRATIONS.len()],
            stored: Default::default(),
        };
        for i in 0..world.nodes.len() {
            world.start(i)?;
        }
        world.set_time()?;
        Ok(world)
    }

    pub(crate) fn start(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        // A new process samples afresh (a restore re-versions what was committed during it).
        node.points = Arc::default();
        let id = NodeId(i as u64 + 1);
        let opts = capture_options(&self.scenario, i);
        let open = || Db::open(&node.path, id, opts.clone()).map_err(|e| Failure(format!("node {id}: open: {e}")));
        let source = SqliteChangeSource::new(open()?).with_commit_points(
            node.points.clone(),
            self.scenario.batch_rows_max[i % self.scenario.batch_rows_max.len()],
        );
        let db = open()?;
        let transport: Arc<dyn LogTransport> = Arc::new(node.transport.clone());
        node.engine = Some(Engine::new(source, db, transport, engine_config(&self.scenario)));
        Ok(())
    }

    /// Whether node `i` replicates every table (only such nodes save snapshots).
    pub(crate) fn replicates_all(&self, i: usize) -> bool {
        self.scenario.selections[i] == marmot_core::sqlite::TableSelection::default()
    }

    /// Advances logical time by one tick (the capture clocks follow at [`World::set_time`]).
    pub(crate) fn advance_tick(&mut self) {
        self.tick += 1;
        self.log.tick();
    }

    /// Node `i`'s wall clock, in milliseconds.
    pub(crate) fn now_ms(&self, i: usize) -> u64 {
        1_700_000_000_000u64 + self.tick * 3 + self.scenario.skew_ms[i % self.scenario.skew_ms.len()]
    }

    /// Where nodes write temporary files (snapshots on their way to the store).
    pub(crate) fn work_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub(crate) fn set_time(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            let (n, ms) = (&self.nodes[i], self.now_ms(i));
            n.app
                .execute("UPDATE __marmot__simtime SET ms = ?1", [ms as i64])
                .map_err(|e| Failure(format!("set time: {e}")))?;
        }
        Ok(())
    }

    /// Runs the chaos phase, heals everything, runs to quiescence and checks the oracles.
    /// Atomicity is checked on every node after every action.
    pub fn run(&mut self) -> Result<(), Failure> {
        let actions = self.scenario.actions.clone();
        self.counters.retention_runs = u64::from(self.scenario.tombstone_retention_ms > 0);
        for (step, action) in actions.iter().enumerate() {
            self.act(action)
                .and_then(|()| self.check_atomicity_everywhere())
                .map_err(|Failure(m)| Failure(format!("step {step} ({action:?}): {m}")))?;
            self.scan_log();
        }
        self.heal()?;
        self.check_atomicity_everywhere()?;
        self.quiesce()?;
        oracle::check_schemas(&self.migrations_run, self.nodes.iter().map(|n| &n.app))?;
        let nodes = self.nodes.iter().zip(&self.scenario.selections);
        oracle::check_convergence(&self.writes, nodes.map(|(n, selection)| (&n.app, selection)))?;
        self.check_journals()?;
        if self.scenario.tombstone_retention_ms > 0 {
            self.collect_when_quiet()?;
            let nodes = self.nodes.iter().zip(&self.scenario.selections);
            oracle::check_convergence(&self.writes, nodes.map(|(n, selection)| (&n.app, selection)))?;
        }
        self.check_digests()
    }

    /// Every node's conflict journal equals the oracle's set of lost writes.
    fn check_journals(&mut self) -> Result<(), Failure> {
        self.scan_log();
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .zip(&self.scenario.selections)
            .map(|(n, selection)| (n.engine.as_ref().expect("engine running").db(), selection))
            .collect();
        self.counters.conflicts_journaled += crate::journal::check(&self.stored.published, &nodes)?;
        Ok(())
    }

    /// After quiescence, lets the retention and the clock skew pass: every node, caught up,
    /// collects every tombstone (none is younger than the horizon then, unless a parked
    /// batch holds it back), and the rows stay the same.
    fn collect_when_quiet(&mut self) -> Result<(), Failure> {
        // Until every node's horizon (its wall clock less the retention and the skew
        // allowance) is past every version any node holds.
        let skew = self.scenario.skew_ms.iter().copied().max().unwrap_or(0) + 1;
        let mut newest_ms = 0;
        for n in &self.nodes {
            let clock = n.engine.as_ref().expect("engine").db().clock().map_err(|e| Failure(e.to_string()))?;
            newest_ms = newest_ms.max(clock.millis());
        }
        while (0..self.nodes.len()).any(|i| self.now_ms(i) <= newest_ms + self.scenario.tombstone_retention_ms + skew) {
            self.advance_tick();
        }
        // Two looks, a tick apart (more than the collection cadence of retention / 8).
        for _ in 0..2 {
            self.advance_tick();
            self.set_time()?;
            for i in 0..self.nodes.len() {
                let e = self.nodes[i].engine.as_mut().expect("engine");
                while block_on(e.maintain()).map_err(|e| Failure(format!("node {i}: maintain: {e}")))? {}
            }
        }
        for i in 0..self.nodes.len() {
            let db = self.nodes[i].engine.as_ref().expect("engine").db();
            let fail = |e: Error| Failure(format!("node {i}: {e}"));
            let held = db.tombstones_held().map_err(fail)?;
            if held > 0 && db.parked().map_err(fail)?.is_empty() {
                let app = &self.nodes[i].app;
                let versions: Vec<(i64, i64)> = app
                    .prepare("SELECT hlc, node FROM __marmot__versions WHERE deleted = 1")
                    .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                    .map_err(|e| Failure(format!("node {i}: reading tombstones: {e}")))?;
                let published = db.published_hlc().map_err(fail)?;
                return Err(Failure(format!(
                    "node {i}: {held} tombstones left after the retention passed: (hlc, node) {versions:?}, \
                     published through {published}, restore required: {}",
                    db.restore_required().map_err(fail)?
                )));
            }
        }
        self.trace.push("tombstones collected after the retention passed".into());
        Ok(())
    }

    fn act(&mut self, action: &Action) -> Result<(), Failure> {
        if std::env::var_os("SIM_DUMP_ACTIONS").is_some() {
            self.trace.push(format!("ACTION {action:?}"));
        }
        let n = self.nodes.len();
        match action {
            Action::Write { node, ops } => self.write(node % n, ops),
            Action::Group { node, size } => self.group(node % n, *size),
            Action::Publish { node } => {
                let before = self.entries_stored();
                let mut through = None;
                self.engine_op(node % n, |e| {
                    let c = block_on(e.publish_once())?;
                    through = (c > 0).then(|| e.source().acknowledged());
                    Ok(format!("published {c} through {}", e.source().acknowledged()))
                })?;
                // Nothing is committed meanwhile: a change logged after what was published
                // was cut off by a commit point.
                if let Some(through) = through {
                    let last: i64 = self.nodes[node % n]
                        .app
                        .query_row("SELECT coalesce(max(hlc), 0) FROM __marmot__log", [], |r| r.get(0))
                        .map_err(|e| Failure(format!("node {}: reading the log: {e}", node % n)))?;
                    self.counters.backlogs_cut += u64::from(last as u64 > through.0);
                }
                self.count_parts(before);
                Ok(())
            }
            Action::Receive { node, shard } => {
                let shard = Shard(shard % self.scenario.shards);
                self.engine_op(node % n, |e| {
                    block_on(e.receive_once(shard, std::time::Duration::ZERO))
                        .map(|c| format!("received {c} from {shard}"))
                })
            }
            Action::Maintain { node, caught_up } => {
                let shards = self.scenario.shards;
                self.engine_op(node % n, |e| {
                    let mut read = 0;
                    for s in (0..shards).filter(|_| *caught_up) {
                        // Bounded: redeliveries may keep a shard busy.
                        for _ in 0..64 {
                            match block_on(e.receive_once(Shard(s), std::time::Duration::ZERO))? {
                                0 => break,
                                c => read += c,
                            }
                        }
                    }
                    // `marmot` stops on a failed maintenance (cli/src/run.rs): so does the run.
                    block_on(e.maintain()).map(|_| format!("maintained after reading {read}")).map_err(|e| match e {
                        Error::InjectedCrash(_) => e,
                        e if e.is_disk_full() => e,
                        e => Error::Corrupt(format!("maintenance failed, marmot would stop: {e}")),
                    })
                })
            }
            Action::Crash { node } => {
                self.counters.crashes += 1;
                self.crash(node % n, "crash")
            }
            Action::CrashBeforeAck { node } => {
                self.arm(node % n, Faults { crash_before_ack: true, crash_after_rows: None })
            }
            Action::CrashMidApply { node, rows } => {
                self.arm(node % n, Faults { crash_before_ack: false, crash_after_rows: Some(*rows as u64) })
            }
            Action::Partition { node, on } => self.partition(node % n, *on),
            Action::Tick => {
                self.advance_tick();
                self.set_time()
            }
            Action::Truncate { deep } => self.truncate(*deep),
            Action::RecreateStreams => self.recreate_streams(),
            Action::Cleanup { node } => self.cleanup(node % n),
            Action::SaveSnapshot { node } => self.save_snapshot_if_caught_up(node % n),
            Action::Restore { node } => self.restore(node % n).map(|_| ()),
            Action::Migrate { node } => {
                let ran = self.migrate(node % n)?;
                self.counters.migrations += u64::from(ran);
                Ok(())
            }
        }
    }

    /// The application on node `i` runs the next migration its schema lacks, in one
    /// transaction; returns whether it ran one (none when its schema is up to date or in
    /// between expected schemas).
    pub(crate) fn migrate(&mut self, i: usize) -> Result<bool, Failure> {
        let node = &mut self.nodes[i];
        let fail = |e: rusqlite::Error| Failure(format!("node {i}: migration: {e}"));
        let Some(k) = schema::schema_step(&node.app).map_err(fail)?.filter(|&k| k < schema::MIGRATIONS.len()) else {
            return Ok(false);
        };
        node.app.execute_batch(&format!("BEGIN IMMEDIATE; {} COMMIT;", schema::MIGRATIONS[k])).map_err(fail)?;
        self.counters.migrations_concurrent += u64::from(self.migrations_run[k] > 0);
        self.counters.table_rebuilds += u64::from(k == 4);
        self.counters.tables_recreated += u64::from(k == 5);
        self.migrations_run[k] += 1;
        self.trace.push(format!("node {i}: ran migration {k}"));
        Ok(true)
    }

    /// The `marmot` process of node `i` crashes and restarts; its database stays.
    fn crash(&mut self, i: usize, why: &str) -> Result<(), Failure> {
        self.trace.push(format!("node {i} {why}; restart"));
        if let Some(engine) = self.nodes[i].engine.take() {
            self.retired.push(engine.stats().clone());
        }
        self.start(i)?;
        self.record_writes(i)?;
        oracle::check_atomicity(&self.nodes[i].app, i)
    }

    /// Runs `f` on node `i`'s engine: an injected crash restarts the node, a retryable
    /// error is traced, any other error fails the run.
    pub(crate) fn engine_op(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Engine<SqliteChangeSource>) -> marmot_core::Result<String>,
    ) -> Result<(), Failure> {
        let result = f(self.nodes[i].engine.as_mut().expect("engine running"));
        match result {
            Ok(what) => self.trace.push(format!("node {i}: {what}")),
            Err(Error::InjectedCrash(at)) => {
                match at {
                    CRASH_BEFORE_ACK => self.counters.crash_before_ack += 1,
                    CRASH_MID_APPLY => self.counters.crash_mid_apply += 1,
                    other => return Err(Failure(format!("node {i}: unexpected injected crash {other:?}"))),
                }
                return self.crash(i, at);
            }
            Err(e) if e.is_retryable() => self.trace.push(format!("node {i}: retryable error: {e}")),
            Err(e @ Error::Truncated { .. }) => {
                self.trace.push(format!("node {i}: {e}"));
                self.counters.restores_after_truncation += u64::from(self.restore(i)?);
            }
            Err(e @ (Error::ChangesExpired { .. } | Error::RestoreRequired)) => {
                self.trace.push(format!("node {i}: {e}"));
                self.expire(i)?;
            }
            Err(e) => return Err(Failure(format!("node {i}: {e}"))),
        }
        // Capture may log rows outside the application's transactions too: the rows of a
        // table created while running are logged when Marmot installs its triggers.
        self.record_writes(i)?;
        self.count_aside(i)?;
        oracle::check_atomicity(&self.nodes[i].app, i)
    }

    fn write(&mut self, i: usize, ops: &[WriteOp]) -> Result<(), Failure> {
        let node = &self.nodes[i];
        let done = workload::transaction(&node.app, ops, &mut self.counters)
            .map_err(|Failure(m)| Failure(format!("node {i}: {m}")))?;
        self.trace.push(format!("node {i}: wrote {done}/{} ops", ops.len()));
        self.record_writes(i)
    }

    fn group(&mut self, i: usize, size: u8) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let grp = node.next_gid;
        workload::group(&node.app, grp, size).map_err(|Failure(m)| Failure(format!("node {i}: {m}")))?;
        node.next_gid += 16;
        self.counters.group_transactions += 1;
        self.trace.push(format!("node {i}: group {grp} of {size}"));
        self.record_writes(i)
    }

    /// Adds what capture logged for node `i`'s last transaction to the model's writes.
    pub(crate) fn record_writes(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let before = self.writes.len();
        workload::record_writes(&node.app, NodeId(i as u64 + 1), &mut node.log_seen, &mut self.writes)?;
        node.points.sample(&node.app).map_err(|e| Failure(format!("node {i}: sampling a commit point: {e}")))?;
        let selection = &self.scenario.selections[i];
        if let Some(w) = self.writes[before..].iter().find(|w| !selection.selects(&w.table)) {
            return Err(Failure(format!("node {i} captured a write to {}, a table it does not replicate", w.table)));
        }
        let by_triggers = self.writes[before..].iter().filter(|w| matches!(w.table.as_str(), "audit" | "stock"));
        self.counters.trigger_writes += by_triggers.count() as u64;
        Ok(())
    }

    /// Entries stored in all shards so far (a publish that adds more than one stored a
    /// multi-part batch).
    fn entries_stored(&self) -> u64 {
        (0..self.scenario.shards).map(|s| self.log.last(Shard(s)).0).sum()
    }

    fn count_parts(&mut self, before: u64) {
        self.counters.multi_part_batches += u64::from(self.entries_stored() > before + 1);
    }

    /// Counts rows node `i` set aside since last looked at.
    fn count_aside(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let aside =
            node.engine.as_ref().expect("engine running").db().aside_count().map_err(|e| Failure(e.to_string()))?;
        self.counters.set_aside_rows += aside.saturating_sub(node.aside);
        node.aside = aside;
        Ok(())
    }

    fn check_atomicity_everywhere(&self) -> Result<(), Failure> {
        self.nodes.iter().enumerate().try_for_each(|(i, n)| oracle::check_atomicity(&n.app, i))
    }

    fn quiesce(&mut self) -> Result<(), Failure> {
        let mut idle_rounds = 0;
        for _ in 0..QUIESCE_ROUNDS_MAX {
            let mut work = 0;
            for i in 0..self.nodes.len() {
                let before = self.entries_stored();
                let e = self.nodes[i].engine.as_mut().expect("engine");
                let more = block_on(e.maintain()).map_err(|e| Failure(format!("node {i}: maintain: {e}")))?;
                work += usize::from(more);
                work += match block_on(e.step()) {
                    Ok(n) => n,
                    Err(Error::Truncated { .. }) => {
                        self.counters.restores_after_truncation += u64::from(self.restore(i)?);
                        1
                    }
                    Err(Error::ChangesExpired { .. } | Error::RestoreRequired) => {
                        self.expire(i)?;
                        1
                    }
                    // A subscription opened before the logs were recreated ends once; the
                    // next step subscribes to the new logs.
                    Err(e) if e.is_retryable() && self.counters.streams_recreated > 0 => 1,
                    Err(e) => return Err(Failure(format!("node {i}: step: {e}"))),
                };
                self.record_writes(i)?;
                self.count_parts(before);
                self.count_aside(i)?;
                self.scan_log();
                oracle::check_atomicity(&self.nodes[i].app, i)?;
            }
            idle_rounds = if work == 0 { idle_rounds + 1 } else { 0 };
            if idle_rounds >= 2 {
                return Ok(());
            }
        }
        Err(Failure("nodes did not quiesce".into()))
    }

    /// What this run exercised so far: the world's own counts, the faults the transport
    /// fired and what the engines (including crashed ones) did.
    pub fn counters(&self) -> Counters {
        let mut c = self.counters.clone();
        let fired = self.log.fired();
        c.publish_failures = fired.publish_failures;
        c.lost_acks = fired.lost_acks;
        c.redeliveries = fired.redeliveries;
        c.delayed_entries = fired.delayed_entries;
        c.live_truncations = fired.live_truncations;
        let live = self.nodes.iter().filter_map(|n| n.engine.as_ref().map(|e| e.stats()));
        for stats in self.retired.iter().chain(live) {
            c.tombstones_collected += stats.tombstones_collected;
            c.batches_applied += stats.batches_applied;
            c.rows_skipped += stats.rows_skipped;
            c.parked_batches += stats.batches_parked;
            c.strays_parked += stats.strays_parked;
            c.strays_adopted += stats.strays_adopted;
            c.streams_restarted += stats.streams_restarted;
            c.schema_changes_published += stats.schema_changes_published;
            c.schema_changes_applied += stats.schema_changes_applied;
            c.rows_excluded += stats.rows_excluded;
        }
        c.partial_nodes = (0..self.nodes.len()).filter(|&i| !self.replicates_all(i)).count() as u64;
        c
    }

    /// A fingerprint of the trace (equal for equal runs).
    pub fn trace_hash(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(self.trace.join("\n").as_bytes())
    }

    /// Number of captured writes the model holds.
    pub fn writes(&self) -> usize {
        self.writes.len()
    }
}

/// Runs one scenario; the seed drives the transport's fault RNG.
pub fn run_scenario(scenario: Scenario, seed: u64) -> Result<World, (Failure, Vec<String>)> {
    let mut world = World::new(scenario, seed).map_err(|f| (f, Vec::new()))?;
    match world.run() {
        Ok(()) => Ok(world),
        Err(f) => Err((f, world.trace.clone())),
    }
}
