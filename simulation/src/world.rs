//! The simulated world: nodes (each a real SQLite file with real triggers, an application
//! connection and a `marmot` engine) on one memory transport, driven one action at a time.

use std::path::PathBuf;
use std::sync::Arc;

use futures::executor::block_on;
use marmot_core::engine::{Engine, EngineConfig, Faults};
use marmot_core::sqlite::{CaptureOptions, Db, SqliteChangeSource};
use marmot_core::wire::EncodeOptions;
use marmot_core::{Error, Hlc, LogTransport, NodeId, Position, Shard, Value, Version};
use marmot_transports::{FaultConfig, MemoryLog, MemoryTransport};
use rusqlite::{params, Connection};

use crate::model::{self, Dump, Write};
use crate::scenario::{Action, Scenario, WriteOp};

/// The schema every node starts with: a table of every value type, a composite-key
/// `WITHOUT ROWID` table with awkward identifiers, a table with a secondary `UNIQUE`,
/// and the group table for the atomicity oracle.
pub const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, data BLOB, val);
CREATE TABLE "order" ("key" TEXT NOT NULL, "a ""b""" INTEGER NOT NULL, "ü", PRIMARY KEY ("key", "a ""b""")) WITHOUT ROWID;
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE, name);
CREATE TABLE groups (gid INTEGER PRIMARY KEY, grp INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE TABLE __marmot__simtime (ms INTEGER NOT NULL);
INSERT INTO __marmot__simtime VALUES (1700000000000);
"#;

/// (table, primary-key columns, unique columns) of [`SCHEMA`], for the oracle.
pub fn tables() -> Vec<(&'static str, Vec<usize>, Vec<usize>)> {
    vec![
        ("groups", vec![0], vec![]),
        ("items", vec![0], vec![]),
        ("order", vec![0, 1], vec![]),
        ("users", vec![0], vec![1]),
    ]
}

/// The migration nodes run at different times: a column added while writes go on.
pub const MIGRATION: &str = "ALTER TABLE items ADD COLUMN extra TEXT DEFAULT 'd'";

const TIME_SQL: &str = "(SELECT ms FROM __marmot__simtime)";
const QUIESCE_ROUNDS_MAX: usize = 400;

struct Node {
    path: PathBuf,
    app: Connection,
    transport: MemoryTransport,
    engine: Option<Engine<SqliteChangeSource>>,
    log_seen: u64,
    next_gid: i64,
    migrated: bool,
}

/// A failed check, with what was seen.
#[derive(Debug)]
pub struct Failure(pub String);

/// The simulated cluster.
pub struct World {
    _dir: tempfile::TempDir,
    log: MemoryLog,
    nodes: Vec<Node>,
    scenario: Scenario,
    writes: Vec<Write>,
    /// Events, in order; equal traces mean equal runs.
    pub trace: Vec<String>,
    tick: u64,
}

fn engine_config(s: &Scenario) -> EngineConfig {
    EngineConfig {
        encode: EncodeOptions { compress: s.faults.compress, part_bytes_max: s.faults.part_bytes_max },
        fetch_entries_max: 8,
        publish: true,
        replicate: true,
    }
}

fn fault_config(s: &Scenario) -> FaultConfig {
    FaultConfig {
        delay_ticks_max: s.faults.delay_ticks_max,
        redeliver_probability: s.faults.redeliver_probability,
        redeliver_entries_max: 4,
        publish_fail_probability: s.faults.publish_fail_probability,
        publish_lost_ack_probability: s.faults.publish_lost_ack_probability,
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
            app.execute_batch(SCHEMA).map_err(|e| Failure(format!("schema: {e}")))?;
            let transport = log.connect(fault_config(&scenario));
            nodes.push(Node {
                path,
                app,
                transport,
                engine: None,
                log_seen: 0,
                next_gid: (i as i64 + 1) << 32,
                migrated: false,
            });
        }
        let mut world = World { _dir: dir, log, nodes, scenario, writes: Vec::new(), trace: Vec::new(), tick: 0 };
        for i in 0..world.nodes.len() {
            world.start(i)?;
        }
        world.set_time()?;
        Ok(world)
    }

    fn start(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let id = NodeId(i as u64 + 1);
        let opts = CaptureOptions { time_ms_sql: TIME_SQL.to_owned() };
        let open = || Db::open(&node.path, id, opts.clone()).map_err(|e| Failure(format!("node {id}: open: {e}")));
        let source = SqliteChangeSource::new(open()?);
        let db = open()?;
        let transport: Arc<dyn LogTransport> = Arc::new(node.transport.clone());
        node.engine = Some(Engine::new(source, db, transport, engine_config(&self.scenario)));
        Ok(())
    }

    fn set_time(&mut self) -> Result<(), Failure> {
        for (i, n) in self.nodes.iter().enumerate() {
            let ms = 1_700_000_000_000u64 + self.tick * 3 + self.scenario.skew_ms[i % self.scenario.skew_ms.len()];
            n.app
                .execute("UPDATE __marmot__simtime SET ms = ?1", [ms as i64])
                .map_err(|e| Failure(format!("set time: {e}")))?;
        }
        Ok(())
    }

    /// Runs the chaos phase, heals everything, runs to quiescence and checks the oracles.
    pub fn run(&mut self) -> Result<(), Failure> {
        let actions = self.scenario.actions.clone();
        for (step, action) in actions.iter().enumerate() {
            self.act(action).map_err(|Failure(m)| Failure(format!("step {step} ({action:?}): {m}")))?;
        }
        self.heal()?;
        self.quiesce()?;
        self.check_convergence()
    }

    fn act(&mut self, action: &Action) -> Result<(), Failure> {
        let n = self.nodes.len();
        match action {
            Action::Write { node, ops } => self.write(node % n, ops),
            Action::Group { node, size } => self.group(node % n, *size),
            Action::Publish { node } => {
                self.engine_op(node % n, |e| block_on(e.publish_once()).map(|c| format!("published {c}")))
            }
            Action::Receive { node, shard } => {
                let shard = Shard(shard % self.scenario.shards);
                self.engine_op(node % n, |e| {
                    block_on(e.receive_once(shard, std::time::Duration::ZERO))
                        .map(|c| format!("received {c} from {shard}"))
                })
            }
            Action::Maintain { node } => {
                self.engine_op(node % n, |e| block_on(e.maintain()).map(|_| "maintained".into()))
            }
            Action::Crash { node } => self.crash(node % n, "crash"),
            Action::CrashBeforeAck { node } => {
                self.arm(node % n, Faults { crash_before_ack: true, crash_after_rows: None })
            }
            Action::CrashMidApply { node, rows } => {
                self.arm(node % n, Faults { crash_before_ack: false, crash_after_rows: Some(*rows as u64) })
            }
            Action::Partition { node, on } => {
                self.log.set_partitioned(node % n, *on);
                self.trace.push(format!("partition {} {on}", node % n));
                Ok(())
            }
            Action::Tick => {
                self.tick += 1;
                self.log.tick();
                self.set_time()
            }
            Action::Truncate => self.truncate(),
            Action::Migrate { node } => self.migrate(node % n),
        }
    }

    fn migrate(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        if !node.migrated {
            node.app.execute_batch(MIGRATION).map_err(|e| Failure(format!("node {i}: migration: {e}")))?;
            node.migrated = true;
            self.trace.push(format!("node {i}: migrated"));
        }
        Ok(())
    }

    fn arm(&mut self, i: usize, faults: Faults) -> Result<(), Failure> {
        self.trace.push(format!("arm {i} {faults:?}"));
        self.nodes[i].engine.as_mut().expect("engine running").set_faults(faults);
        Ok(())
    }

    fn crash(&mut self, i: usize, why: &str) -> Result<(), Failure> {
        self.trace.push(format!("node {i} {why}; restart"));
        self.nodes[i].engine = None;
        self.start(i)
    }

    fn engine_op(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut Engine<SqliteChangeSource>) -> marmot_core::Result<String>,
    ) -> Result<(), Failure> {
        let result = f(self.nodes[i].engine.as_mut().expect("engine running"));
        match result {
            Ok(what) => self.trace.push(format!("node {i}: {what}")),
            Err(Error::InjectedCrash(at)) => return self.crash(i, at),
            Err(e) if e.is_retryable() => self.trace.push(format!("node {i}: retryable error: {e}")),
            Err(e) => return Err(Failure(format!("node {i}: {e}"))),
        }
        self.check_atomicity(i)
    }

    fn write(&mut self, i: usize, ops: &[WriteOp]) -> Result<(), Failure> {
        let app = &self.nodes[i].app;
        app.execute_batch("BEGIN IMMEDIATE").map_err(|e| Failure(format!("begin: {e}")))?;
        let mut done = 0;
        for op in ops {
            app.execute_batch("SAVEPOINT op").map_err(|e| Failure(format!("savepoint: {e}")))?;
            match run_op(app, op, self.nodes[i].migrated) {
                Ok(_) => done += 1,
                Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    app.execute_batch("ROLLBACK TO op").map_err(|e| Failure(format!("rollback: {e}")))?;
                }
                Err(e) => return Err(Failure(format!("node {i}: {op:?}: {e}"))),
            }
            app.execute_batch("RELEASE op").map_err(|e| Failure(format!("release: {e}")))?;
        }
        app.execute_batch("COMMIT").map_err(|e| Failure(format!("commit: {e}")))?;
        self.trace.push(format!("node {i}: wrote {done}/{} ops", ops.len()));
        self.record_writes(i)
    }

    fn group(&mut self, i: usize, size: u8) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let grp = node.next_gid;
        node.app.execute_batch("BEGIN").map_err(|e| Failure(format!("begin: {e}")))?;
        for k in 0..size as i64 {
            node.app
                .execute("INSERT INTO groups(gid, grp, size) VALUES (?1, ?2, ?3)", params![grp + k, grp, size])
                .map_err(|e| Failure(format!("group insert: {e}")))?;
        }
        node.app.execute_batch("COMMIT").map_err(|e| Failure(format!("commit: {e}")))?;
        node.next_gid += 16;
        self.trace.push(format!("node {i}: group {grp} of {size}"));
        self.record_writes(i)
    }

    /// Adds what capture logged for the application's last transaction to the model.
    fn record_writes(&mut self, i: usize) -> Result<(), Failure> {
        let node = &mut self.nodes[i];
        let err = |e: rusqlite::Error| Failure(format!("reading the log: {e}"));
        let mut stmt = node
            .app
            .prepare("SELECT l.*, t.name FROM __marmot__log l JOIN __marmot__tables t ON t.id = l.tbl WHERE l.hlc > ?1 ORDER BY l.hlc")
            .map_err(err)?;
        let ncols = stmt.column_count();
        let rows: Vec<(u64, i64, Vec<Value>, String)> = stmt
            .query_map([node.log_seen as i64], |r| {
                let values =
                    (3..ncols - 1).map(|c| r.get_ref(c).map(Value::from)).collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((r.get::<_, i64>(0)? as u64, r.get(2)?, values, r.get(ncols - 1)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(err)?;
        drop(stmt);
        let tables = tables();
        for (hlc, op, values, table) in rows {
            node.log_seen = node.log_seen.max(hlc);
            let (_, pk_cols, _) = tables
                .iter()
                .find(|t| t.0 == table)
                .ok_or_else(|| Failure(format!("captured unknown table {table}")))?;
            let width = table_width(&table);
            let image: Vec<Value> = values.into_iter().take(width).collect();
            let pk = pk_cols.iter().map(|&c| image[c].clone()).collect();
            let version = Version { hlc: Hlc(hlc), node: NodeId(i as u64 + 1) };
            self.writes.push(Write { table, pk, version, image: (op == 0).then_some(image) });
        }
        Ok(())
    }

    fn truncate(&mut self) -> Result<(), Failure> {
        for s in 0..self.scenario.shards {
            let mut min = u64::MAX;
            for n in &self.nodes {
                let p =
                    n.engine.as_ref().expect("engine").db().position(Shard(s)).map_err(|e| Failure(e.to_string()))?;
                min = min.min(p.0);
            }
            self.log.truncate(Shard(s), Position(min + 1));
            self.trace.push(format!("truncate {s} before {}", min + 1));
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            self.migrate(i)?;
            self.log.set_partitioned(i, false);
            self.log.set_faults(i, FaultConfig::default());
            if let Some(e) = self.nodes[i].engine.as_mut() {
                e.set_faults(Faults::default());
            }
        }
        for _ in 0..self.scenario.faults.delay_ticks_max + 1 {
            self.tick += 1;
            self.log.tick();
        }
        self.set_time()
    }

    fn quiesce(&mut self) -> Result<(), Failure> {
        let mut idle_rounds = 0;
        for _ in 0..QUIESCE_ROUNDS_MAX {
            let mut work = 0;
            for i in 0..self.nodes.len() {
                let e = self.nodes[i].engine.as_mut().expect("engine");
                block_on(e.maintain()).map_err(|e| Failure(format!("node {i}: maintain: {e}")))?;
                work += block_on(e.step()).map_err(|e| Failure(format!("node {i}: step: {e}")))?;
                self.check_atomicity(i)?;
            }
            idle_rounds = if work == 0 { idle_rounds + 1 } else { 0 };
            if idle_rounds >= 2 {
                return Ok(());
            }
        }
        Err(Failure("nodes did not quiesce".into()))
    }

    /// No node ever shows part of a remote transaction: every group is whole or absent.
    fn check_atomicity(&self, i: usize) -> Result<(), Failure> {
        let bad: Option<(i64, i64, i64)> = self.nodes[i]
            .app
            .query_row("SELECT grp, size, count(*) FROM groups GROUP BY grp HAVING count(*) != size LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map(Some)
            .or_else(|e| if matches!(e, rusqlite::Error::QueryReturnedNoRows) { Ok(None) } else { Err(e) })
            .map_err(|e| Failure(format!("atomicity check: {e}")))?;
        match bad {
            Some((grp, size, n)) => {
                Err(Failure(format!("node {i} shows {n} of the {size} rows of group {grp}: a partial transaction")))
            }
            None => Ok(()),
        }
    }

    /// Every node equals the last-writer-wins model on the columns every node always had,
    /// and every node equals every other on all columns (the migration's column too).
    fn check_convergence(&self) -> Result<(), Failure> {
        let expected = model::expected(&self.writes, &tables());
        let mut first: Option<Dump> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            let got = dump(&n.app).map_err(|e| Failure(format!("dump: {e}")))?;
            let mut original = got.clone();
            for (table, rows) in original.iter_mut() {
                for row in rows {
                    row.truncate(table_width(table));
                }
            }
            if original != expected {
                let diff = describe_diff(&expected, &original);
                return Err(Failure(format!("node {i} differs from the last-writer-wins model: {diff}")));
            }
            match &first {
                None => first = Some(got),
                Some(node0) if *node0 != got => {
                    let diff = describe_diff(node0, &got);
                    return Err(Failure(format!("node {i} differs from node 0 in the migrated column: {diff}")));
                }
                Some(_) => {}
            }
        }
        Ok(())
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

fn table_width(table: &str) -> usize {
    match table {
        "items" => 6,
        "order" => 3,
        "users" => 3,
        _ => 3,
    }
}

fn run_op(app: &Connection, op: &WriteOp, migrated: bool) -> rusqlite::Result<usize> {
    match op {
        WriteOp::UpsertItem { id, name, qty, price, data, val } if migrated => app.execute(
            "INSERT INTO items(id, name, qty, price, data, val, extra) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?2 || '+') \
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, qty = excluded.qty, price = excluded.price, data = excluded.data, val = excluded.val, extra = excluded.extra",
            params![id, name, qty, price, data, val],
        ),
        WriteOp::UpsertItem { id, name, qty, price, data, val } => app.execute(
            "INSERT INTO items(id, name, qty, price, data, val) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, qty = excluded.qty, price = excluded.price, data = excluded.data, val = excluded.val",
            params![id, name, qty, price, data, val],
        ),
        WriteOp::UpdateItemVal { id, val } => app.execute("UPDATE items SET val = ?2 WHERE id = ?1", params![id, val]),
        WriteOp::MoveItem { from, to } => app.execute("UPDATE items SET id = ?2 WHERE id = ?1", params![from, to]),
        WriteOp::DeleteItem { id } => app.execute("DELETE FROM items WHERE id = ?1", [id]),
        WriteOp::UpsertOrder { key, ab, u } => app.execute(
            r#"INSERT INTO "order"("key", "a ""b""", "ü") VALUES (?1, ?2, ?3) ON CONFLICT("key", "a ""b""") DO UPDATE SET "ü" = excluded."ü""#,
            params![key, ab, u],
        ),
        WriteOp::DeleteOrder { key, ab } => app.execute(r#"DELETE FROM "order" WHERE "key" = ?1 AND "a ""b""" = ?2"#, params![key, ab]),
        WriteOp::UpsertUser { id, email, name } => app.execute(
            "INSERT INTO users(id, email, name) VALUES (?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET email = excluded.email, name = excluded.name",
            params![id, email, name],
        ),
        WriteOp::SetEmail { id, email } => app.execute("UPDATE users SET email = ?2 WHERE id = ?1", params![id, email]),
        WriteOp::DeleteUser { id } => app.execute("DELETE FROM users WHERE id = ?1", [id]),
    }
}

/// The canonical dump of the user tables: rows sorted by primary key, values exact.
pub fn dump(conn: &Connection) -> rusqlite::Result<Dump> {
    let mut out = Dump::new();
    for (table, pk, _) in tables() {
        let sql = format!("SELECT * FROM \"{table}\"");
        let mut stmt = conn.prepare(&sql)?;
        let n = stmt.column_count();
        let mut rows: Vec<Vec<Value>> = stmt
            .query_map([], |r| (0..n).map(|i| r.get_ref(i).map(Value::from)).collect())?
            .collect::<rusqlite::Result<_>>()?;
        rows.sort_by_key(|r| pk.iter().map(|&i| model::value_key(&r[i])).collect::<Vec<_>>());
        out.insert(table.to_owned(), rows);
    }
    Ok(out)
}

fn describe_diff(expected: &Dump, got: &Dump) -> String {
    for (table, rows) in expected {
        let g = got.get(table).cloned().unwrap_or_default();
        if *rows != g {
            let missing: Vec<_> = rows.iter().filter(|r| !g.contains(r)).collect();
            let extra: Vec<_> = g.iter().filter(|r| !rows.contains(r)).collect();
            return format!("table {table}: missing {missing:?}, unexpected {extra:?}");
        }
    }
    "dumps differ".into()
}

/// Runs one scenario; the seed drives the transport's fault RNG.
pub fn run_scenario(scenario: Scenario, seed: u64) -> Result<World, (Failure, Vec<String>)> {
    let mut world = World::new(scenario, seed).map_err(|f| (f, Vec::new()))?;
    match world.run() {
        Ok(()) => Ok(world),
        Err(f) => Err((f, world.trace.clone())),
    }
}
