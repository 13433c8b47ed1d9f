//! Scenarios: what a simulation run does, generated from a seed or by proptest.
//!
//! One strategy serves both: `marmot-sim --seed N` draws a scenario from it with a
//! ChaCha RNG seeded by `N`, and the property test lets proptest draw and shrink it.

use marmot_core::sqlite::TableSelection;
use marmot_core::Value;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// One value written by the workload (every storage class, edge cases included).
pub fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Integer),
        (-3i64..3).prop_map(Value::Integer),
        prop_oneof![
            Just(-0.0f64),
            Just(f64::INFINITY),
            Just(f64::MIN),
            Just(0.1),
            any::<f64>().prop_filter("no NaN", |f| !f.is_nan())
        ]
        .prop_map(Value::Real),
        prop_oneof![Just(String::new()), Just("ü 日本 \"q\"".to_owned()), "[a-z]{0,6}"].prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(Value::Blob),
    ]
}

#[allow(missing_docs)] // fields are the statement's parameters
/// One statement of a local transaction. Keys come from small ranges so nodes collide.
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Insert or replace a row of `items`.
    UpsertItem { id: i64, name: String, qty: i64, price: f64, data: Vec<u8>, val: Value },
    /// Update one column of an `items` row.
    UpdateItemVal { id: i64, val: Value },
    /// Move an `items` row to another primary key.
    MoveItem { from: i64, to: i64 },
    /// Delete an `items` row.
    DeleteItem { id: i64 },
    /// Insert or replace a row of the composite-key table `"order"`.
    UpsertOrder { key: String, ab: i64, u: Value },
    /// Delete a row of `"order"`.
    DeleteOrder { key: String, ab: i64 },
    /// Insert or replace a `users` row (its `email` is UNIQUE).
    UpsertUser { id: i64, email: Option<String>, name: Value },
    /// Change a user's email.
    SetEmail { id: i64, email: Option<String> },
    /// Delete a `users` row.
    DeleteUser { id: i64 },
    /// `INSERT OR REPLACE` a `users` row: SQLite deletes other rows holding its email.
    ReplaceUser { id: i64, email: Option<String>, name: Value },
    /// `UPDATE OR REPLACE` a user's email: SQLite deletes the row that held it.
    ReplaceEmail { id: i64, email: Option<String> },
    /// `INSERT OR IGNORE` a `users` row: nothing happens when the id or email is taken.
    IgnoreUser { id: i64, email: Option<String> },
    /// Upsert a row of `names` (a `NOCASE` key) under some spelling of its key.
    UpsertName { k: String, v: Value },
    /// Change a `names` key (maybe only its letter case).
    RenameName { from: String, to: String },
    /// Delete a `names` row (any spelling matches).
    DeleteName { k: String },
    /// `REPLACE INTO nums` (an untyped key: `1` and `1.0` are one row).
    ReplaceNum { k: Value, v: Value },
    /// Delete a `nums` row.
    DeleteNum { k: Value },
    /// Upsert a `handles` row (its handle is unique under `NOCASE`).
    SetHandle { id: i64, handle: Option<String> },
    /// Insert or upsert an `nk` row; a NULL key always inserts a new, local row.
    UpsertNk { k: Option<String>, v: Value },
    /// Set `v` of every `nk` row, NULL-keyed ones included.
    UpdateNk { v: Value },
    /// Set an `nk` row's key to NULL (it leaves replication: a delete elsewhere).
    NullNk { k: String },
    /// Upsert a row of `late`, the table the migration creates (nothing before it ran).
    UpsertLate { id: i64, v: String },
}

#[allow(missing_docs)] // fields are the step's parameters
/// One step of a scenario. Node indexes are taken modulo the node count.
#[derive(Clone, Debug)]
pub enum Action {
    /// The application on `node` commits one transaction.
    Write { node: usize, ops: Vec<WriteOp> },
    /// The application on `node` inserts `size` fresh rows of one group into `groups` and
    /// the group's row into `group_tags`, in one transaction (for the atomicity oracle).
    Group { node: usize, size: u8 },
    /// The engine of `node` publishes what is pending.
    Publish { node: usize },
    /// The engine of `node` reads and applies what `shard` has.
    Receive { node: usize, shard: u32 },
    /// The engine of `node` does its housekeeping; with `caught_up`, right after reading
    /// everything its shards show (the moment tombstone collection looks for).
    Maintain { node: usize, caught_up: bool },
    /// The `marmot` process of `node` crashes now and restarts.
    Crash { node: usize },
    /// The next publish of `node` crashes after publishing, before acknowledging.
    CrashBeforeAck { node: usize },
    /// The next apply of `node` crashes after `rows` row changes, before committing.
    CrashMidApply { node: usize, rows: u8 },
    /// Cut `node` off the transport, or heal it.
    Partition { node: usize, on: bool },
    /// Time passes (delayed entries become visible, clocks advance).
    Tick,
    /// Shards drop entries every node has already consumed.
    Truncate { deep: bool },
    /// The operator stops `node`'s marmot (publishing what is pending), runs `marmot
    /// -cleanup` on its database (Marmot's tables and triggers gone: versions, positions,
    /// log) and starts it again.
    Cleanup { node: usize },
    /// The logs' data is lost and the logs created again, empty (only once every node has
    /// consumed everything: the nodes first read what they can).
    RecreateStreams,
    /// The `marmot` of `node` saves a snapshot into the store.
    SaveSnapshot { node: usize },
    /// `node` restores the newest usable snapshot (publishing what is pending first), as a
    /// node that was away too long, or a new one, does.
    Restore { node: usize },
    /// The application on `node` runs the schema migration (adds `items.extra`), if it has
    /// not yet; every node runs it when the chaos phase ends.
    Migrate { node: usize },
}

/// Fault knobs of a run.
#[derive(Clone, Debug)]
pub struct FaultMix {
    /// Maximum delivery delay in ticks.
    pub delay_ticks_max: u64,
    /// Probability of a rewind per read.
    pub redeliver_probability: f64,
    /// Probability that a publish fails before storing.
    pub publish_fail_probability: f64,
    /// Probability that a publish stores and reports failure.
    pub publish_lost_ack_probability: f64,
    /// Bytes per part (small values force multi-part batches).
    pub part_bytes_max: usize,
    /// Compress batches.
    pub compress: bool,
    /// Entries after which an incomplete batch is parked as a stray (small, so that the
    /// parts of a batch whose publish partly failed are parked, then adopted when the
    /// origin publishes the rest).
    pub stray_after_entries: u64,
}

/// A whole simulation run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Number of nodes (2–5).
    pub nodes: usize,
    /// Number of shards (1–3).
    pub shards: u32,
    /// Per-node clock skew in milliseconds.
    pub skew_ms: Vec<u64>,
    /// Faults during the chaos phase.
    pub faults: FaultMix,
    /// The chaos phase; afterwards everything is healed and the nodes run to quiescence.
    pub actions: Vec<Action>,
    /// Which tables each node replicates (`[replication]`); node 0 always replicates every
    /// table (snapshots come from nodes that do).
    pub selections: Vec<TableSelection>,
    /// `tombstone_retention` in milliseconds (0: tombstones kept). Runs that collect
    /// tombstones have clocks skewed by at most 5 ms (the skew margin of the horizon), and
    /// no stream recreation (a change whose only copy was in a lost stream and which its
    /// origin no longer publishes would be lost; see docs/internals.md).
    pub tombstone_retention_ms: u64,
    /// Per node: rows a batch of local changes holds before the reader cuts a backlog at a
    /// commit point (`usize::MAX`: never cut).
    pub batch_rows_max: Vec<usize>,
}

fn email() -> impl Strategy<Value = Option<String>> {
    prop_oneof![Just(None), prop::sample::select(vec!["x@m", "y@m", "z@m"]).prop_map(|s| Some(s.to_owned()))]
}

/// Statements against the schemas applications write: REPLACE through a unique value,
/// keys equal under a collation or by value, a `NOCASE` unique index, NULL keys, a table
/// created by a migration.
fn real_schema_op() -> impl Strategy<Value = WriteOp> {
    let name_key = prop::sample::select(vec!["bob", "Bob", "BOB", "al", "AL"]).prop_map(str::to_owned);
    let num_key = prop::sample::select(vec![
        Value::Integer(1),
        Value::Real(1.0),
        Value::Integer(2),
        Value::Real(2.5),
        Value::Text("1".into()),
    ]);
    let handle = prop_oneof![
        Just(None),
        prop::sample::select(vec!["Alice", "alice", "ALICE", "bob"]).prop_map(|s| Some(s.to_owned()))
    ];
    let nk_key = prop::sample::select(vec!["a", "b"]).prop_map(str::to_owned);
    prop_oneof![
        prop_oneof![
            (1i64..6, email(), value()).prop_map(|(id, email, name)| WriteOp::ReplaceUser { id, email, name }),
            (1i64..6, email()).prop_map(|(id, email)| WriteOp::ReplaceEmail { id, email }),
            (1i64..6, email()).prop_map(|(id, email)| WriteOp::IgnoreUser { id, email }),
            (name_key.clone(), value()).prop_map(|(k, v)| WriteOp::UpsertName { k, v }),
            (name_key.clone(), name_key.clone()).prop_map(|(from, to)| WriteOp::RenameName { from, to }),
            name_key.prop_map(|k| WriteOp::DeleteName { k }),
            (num_key.clone(), value()).prop_map(|(k, v)| WriteOp::ReplaceNum { k, v }),
            num_key.prop_map(|k| WriteOp::DeleteNum { k }),
        ],
        prop_oneof![
            (1i64..5, handle).prop_map(|(id, handle)| WriteOp::SetHandle { id, handle }),
            (prop_oneof![Just(None), nk_key.clone().prop_map(Some)], value())
                .prop_map(|(k, v)| WriteOp::UpsertNk { k, v }),
            value().prop_map(|v| WriteOp::UpdateNk { v }),
            nk_key.prop_map(|k| WriteOp::NullNk { k }),
            (1i64..4, "[a-z]{0,3}").prop_map(|(id, v)| WriteOp::UpsertLate { id, v }),
        ],
    ]
}

fn write_op() -> impl Strategy<Value = WriteOp> {
    prop_oneof![2 => classic_op(), 1 => real_schema_op()]
}

fn classic_op() -> impl Strategy<Value = WriteOp> {
    let id = 1i64..8;
    let key = prop::sample::select(vec!["a", "b", "ü"]).prop_map(str::to_owned);
    prop_oneof![
        4 => (id.clone(), "[a-z]{0,4}", any::<i64>(), any::<f64>().prop_filter("no NaN", |f| !f.is_nan()), prop::collection::vec(any::<u8>(), 0..4), value())
            .prop_map(|(id, name, qty, price, data, val)| WriteOp::UpsertItem { id, name, qty, price, data, val }),
        2 => (id.clone(), value()).prop_map(|(id, val)| WriteOp::UpdateItemVal { id, val }),
        1 => (id.clone(), id.clone()).prop_map(|(from, to)| WriteOp::MoveItem { from, to }),
        1 => id.clone().prop_map(|id| WriteOp::DeleteItem { id }),
        3 => (key.clone(), 0i64..3, value()).prop_map(|(key, ab, u)| WriteOp::UpsertOrder { key, ab, u }),
        1 => (key, 0i64..3).prop_map(|(key, ab)| WriteOp::DeleteOrder { key, ab }),
        3 => (1i64..6, email(), value()).prop_map(|(id, email, name)| WriteOp::UpsertUser { id, email, name }),
        2 => (1i64..6, email()).prop_map(|(id, email)| WriteOp::SetEmail { id, email }),
        1 => (1i64..6).prop_map(|id| WriteOp::DeleteUser { id }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    let node = 0usize..5;
    prop_oneof![
        8 => (node.clone(), prop::collection::vec(write_op(), 1..5)).prop_map(|(node, ops)| Action::Write { node, ops }),
        2 => (node.clone(), 2u8..5).prop_map(|(node, size)| Action::Group { node, size }),
        6 => node.clone().prop_map(|node| Action::Publish { node }),
        8 => (node.clone(), 0u32..3).prop_map(|(node, shard)| Action::Receive { node, shard }),
        1 => (node.clone(), any::<bool>()).prop_map(|(node, caught_up)| Action::Maintain { node, caught_up }),
        1 => node.clone().prop_map(|node| Action::Crash { node }),
        1 => node.clone().prop_map(|node| Action::CrashBeforeAck { node }),
        1 => (node.clone(), 0u8..4).prop_map(|(node, rows)| Action::CrashMidApply { node, rows }),
        1 => (node.clone(), any::<bool>()).prop_map(|(node, on)| Action::Partition { node, on }),
        3 => node.clone().prop_map(|node| Action::Migrate { node }),
        4 => Just(Action::Tick),
        1 => any::<bool>().prop_map(|deep| Action::Truncate { deep }),
        1 => Just(Action::RecreateStreams),
        1 => node.clone().prop_map(|node| Action::Cleanup { node }),
        1 => node.clone().prop_map(|node| Action::SaveSnapshot { node }),
        1 => node.prop_map(|node| Action::Restore { node }),
    ]
}

fn fault_mix() -> impl Strategy<Value = FaultMix> {
    (
        0u64..4,
        prop_oneof![Just(0.0), 0.0..0.2],
        prop_oneof![Just(0.0), 0.0..0.2],
        prop_oneof![Just(0.0), 0.0..0.2],
        prop_oneof![Just(1 << 20), 16usize..400],
        any::<bool>(),
        prop_oneof![Just(marmot_core::wire::STRAY_AFTER_ENTRIES_DEFAULT), 1u64..12],
    )
        .prop_map(|(delay, redeliver, fail, lost, part, compress, stray_after_entries)| FaultMix {
            delay_ticks_max: delay,
            redeliver_probability: redeliver,
            publish_fail_probability: fail,
            publish_lost_ack_probability: lost,
            part_bytes_max: part,
            compress,
            stray_after_entries,
        })
}

/// Patterns a node may exclude. The two tables a group transaction writes are always
/// selected together (a node that replicates one without the other sends half of each
/// group: a partial transaction by the user's own choice).
const EXCLUDABLE: &[&str] =
    &["names", "nums", "nk", "late*", "audit", "stock", "order", "handles", "users", "group*", "items", "n*"];
/// Patterns a node may include (`*s`: every table whose name ends in `s`, both group tables).
const INCLUDABLE: &[&str] = &["*s", "order", "late", "nk", "audit", "stock"];

/// One node's `[replication]` selection: mostly every table, else an exclude or an include
/// list of patterns.
fn selection() -> impl Strategy<Value = TableSelection> {
    let patterns = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect::<Vec<_>>();
    prop_oneof![
        4 => Just(TableSelection::default()),
        2 => prop::sample::subsequence(EXCLUDABLE, 1..4)
            .prop_map(move |p| TableSelection { include: Vec::new(), exclude: patterns(p) }),
        1 => (prop::sample::subsequence(INCLUDABLE, 1..5), prop::sample::subsequence(EXCLUDABLE, 0..2))
            .prop_map(move |(i, e)| TableSelection { include: patterns(i), exclude: patterns(e) }),
    ]
}

/// The strategy every scenario comes from.
pub fn scenario(actions_max: usize) -> impl Strategy<Value = Scenario> {
    (
        2usize..=5,
        1u32..=3,
        prop::collection::vec(0u64..50, 5),
        fault_mix(),
        prop::collection::vec(action(), 1..actions_max),
        prop::collection::vec(selection(), 5),
        prop_oneof![3 => Just(0u64), 1 => 1u64..16],
        prop::collection::vec(prop_oneof![1 => Just(usize::MAX), 2 => 1usize..12], 5),
    )
        .prop_map(
            |(
                nodes,
                shards,
                mut skew_ms,
                faults,
                mut actions,
                mut selections,
                tombstone_retention_ms,
                batch_rows_max,
            )| {
                selections[0] = TableSelection::default();
                selections.truncate(nodes);
                if tombstone_retention_ms > 0 {
                    skew_ms.iter_mut().for_each(|s| *s /= 10);
                    for a in actions.iter_mut().filter(|a| matches!(a, Action::RecreateStreams)) {
                        *a = Action::Tick;
                    }
                }
                Scenario { nodes, shards, skew_ms, faults, actions, selections, tombstone_retention_ms, batch_rows_max }
            },
        )
}

/// The scenario of seed `seed`: the same seed gives the same scenario, always.
pub fn from_seed(seed: u64, actions_max: usize) -> Scenario {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    scenario(actions_max).new_tree(&mut runner).expect("scenario strategy never rejects").current()
}
