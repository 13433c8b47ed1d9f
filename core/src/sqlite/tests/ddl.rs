//! Schema changes through the schema log: noticed on one node, applied on another.

use super::*;
use crate::model::SchemaChanges;

/// Takes what `from` queued for the schema log and applies it on `to`.
fn ship(from: &mut Node, to: &mut Node) -> Vec<SchemaChanges> {
    from.db.refresh_if_schema_changed().expect("refresh");
    let mut shipped = Vec::new();
    while let Some((id, changes)) = from.db.next_schema_change().expect("queued") {
        to.db.apply_schema(Shard(0), Position(0), from.db.node(), &changes).expect("apply the schema change");
        from.db.schema_change_published(id).expect("dequeue");
        shipped.push(changes);
    }
    shipped
}

fn objects(conn: &Connection) -> Vec<(String, String, Option<String>)> {
    conn.prepare(
        "SELECT type, name, sql FROM sqlite_master WHERE substr(name, 1, 10) != '__marmot__' \
         AND substr(tbl_name, 1, 10) != '__marmot__' ORDER BY type, name",
    )
    .unwrap()
    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    .unwrap()
    .collect::<rusqlite::Result<_>>()
    .unwrap()
}

const BASE: &str = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b BLOB); CREATE INDEX t_a ON t (a);";

#[test]
fn the_first_install_queues_nothing_and_a_change_is_queued_once() {
    let mut a = node(1, BASE);
    assert_eq!(a.db.next_schema_change().unwrap(), None, "the starting schema is not a change");
    a.exec("ALTER TABLE t ADD COLUMN c INTEGER DEFAULT 5");
    a.db.refresh_if_schema_changed().unwrap();
    let (id, changes) = a.db.next_schema_change().unwrap().expect("queued");
    assert_eq!(changes.objects.len(), 1);
    assert_eq!(changes.objects[0].name, "t");
    a.db.schema_change_published(id).unwrap();
    a.db.reinstall().unwrap();
    assert_eq!(a.db.next_schema_change().unwrap(), None, "noticed once");
}

#[test]
fn every_kind_of_change_ends_with_the_same_schema_and_rows() {
    let mut a = node(1, BASE);
    let mut b = node(2, BASE);
    a.exec("INSERT INTO t VALUES (1, 'x', x'01')");
    b.exec("INSERT INTO t VALUES (1, 'x', x'01')");
    let steps = [
        "ALTER TABLE t ADD COLUMN c INTEGER DEFAULT 5",
        "CREATE TABLE u (k TEXT PRIMARY KEY, v) WITHOUT ROWID; CREATE UNIQUE INDEX u_v ON u (v)",
        "CREATE VIEW tv AS SELECT id, a FROM t; CREATE TRIGGER t_stamp AFTER UPDATE OF a ON t BEGIN UPDATE t SET c = c + 1 WHERE id = NEW.id; END",
        "ALTER TABLE t RENAME COLUMN a TO title",
        "DROP INDEX t_a; ALTER TABLE t DROP COLUMN b",
        "ALTER TABLE u RENAME TO w",
        // As Django rebuilds a table on SQLite: legacy renaming leaves the view alone.
        "PRAGMA legacy_alter_table = ON; BEGIN; \
         CREATE TABLE t_new (id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '', c REAL); \
         INSERT INTO t_new (id, title, c) SELECT id, title, c FROM t; DROP TABLE t; \
         ALTER TABLE t_new RENAME TO t; COMMIT; PRAGMA legacy_alter_table = OFF",
        "DROP VIEW tv; DROP TABLE w",
    ];
    for step in steps {
        a.exec(step);
        let shipped = ship(&mut a, &mut b);
        assert!(!shipped.is_empty(), "{step}: nothing was queued");
        assert_eq!(objects(&b.app), objects(&a.app), "after {step}");
        assert_eq!(b.db.schema_fingerprint(), a.db.schema_fingerprint(), "after {step}");
    }
    assert_eq!(b.dump("t"), a.dump("t"));
    assert_eq!(b.dump("t"), vec![vec![int(1), text("x"), real(5.0)]]);
}

#[test]
fn rows_in_flight_under_a_former_column_name_land_in_the_renamed_column() {
    let mut a = node(1, BASE);
    let mut b = node(2, BASE);
    b.exec("INSERT INTO t VALUES (7, 'before', NULL)");
    let old = b.acknowledge_all().batch;
    a.exec("ALTER TABLE t RENAME COLUMN a TO title");
    ship(&mut a, &mut b);
    a.apply(&old);
    assert_eq!(a.dump("t"), vec![vec![int(7), text("before"), Value::Null]]);
}

#[test]
fn a_rebuild_by_the_application_then_applying_keeps_the_guard_working() {
    let mut a = node(
        1,
        "CREATE TABLE late (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE other (k PRIMARY KEY, n);\
                         CREATE TRIGGER late_t AFTER INSERT ON late BEGIN INSERT INTO other VALUES (NEW.id, 1); END;",
    );
    let mut b = node(
        2,
        "CREATE TABLE late (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE other (k PRIMARY KEY, n);\
                         CREATE TRIGGER late_t AFTER INSERT ON late BEGIN INSERT INTO other VALUES (NEW.id, 1); END;",
    );
    a.exec("INSERT INTO late VALUES (1, 'one')");
    let first = a.acknowledge_all().batch;
    b.apply(&first);
    a.exec(
        "BEGIN; CREATE TABLE late_new (id INTEGER PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0); \
         INSERT INTO late_new (id, v) SELECT id, v FROM late; DROP TABLE late; ALTER TABLE late_new RENAME TO late; \
         CREATE TRIGGER late_t AFTER INSERT ON late BEGIN INSERT INTO other VALUES (NEW.id, 1); END; COMMIT",
    );
    ship(&mut a, &mut b);
    assert_eq!(objects(&b.app), objects(&a.app));
    // The rebuilt table's rows are sent again by its origin, in the new layout.
    let resent = a.acknowledge_all().batch;
    assert_eq!(rows_of(&resent, "late").len(), 1);
    b.apply(&resent);
    a.exec("INSERT INTO late (id, v) VALUES (2, 'two')");
    let next = a.acknowledge_all().batch;
    b.apply(&next);
    assert_eq!(b.dump("late"), a.dump("late"));
    assert_eq!(b.dump("other"), a.dump("other"), "the application trigger ran once per row on each node");
}

#[test]
fn concurrent_changes_of_one_table_end_as_the_later_entry_says_on_both_nodes() {
    let mut a = node(1, BASE);
    let mut b = node(2, BASE);
    a.exec("ALTER TABLE t ADD COLUMN c TEXT");
    b.exec("ALTER TABLE t ADD COLUMN c INTEGER");
    a.db.refresh_if_schema_changed().unwrap();
    b.db.refresh_if_schema_changed().unwrap();
    let (_, from_a) = a.db.next_schema_change().unwrap().unwrap();
    let (_, from_b) = b.db.next_schema_change().unwrap().unwrap();
    // The log holds a's entry, then b's: each node applies both in that order.
    for n in [&mut a, &mut b] {
        n.db.apply_schema(Shard(0), Position(0), NodeId(1), &from_a).unwrap();
        n.db.apply_schema(Shard(0), Position(0), NodeId(2), &from_b).unwrap();
    }
    assert_eq!(objects(&a.app), objects(&b.app));
    assert!(objects(&a.app).iter().any(|o| o.2.as_deref().is_some_and(|s| s.contains("c INTEGER"))));
}

#[test]
fn a_table_the_application_dropped_can_be_created_again_by_the_schema_log() {
    let mut a = node(1, BASE);
    let mut b = node(2, BASE);
    // b's Marmot guards `t` with TEMP triggers; b's application drops it on its own
    // connection, and a newer change from a (a's clock ahead) creates it again through
    // b's Marmot connection.
    b.exec("DROP TABLE t");
    a.exec("ALTER TABLE t ADD COLUMN c");
    a.db.refresh_if_schema_changed().unwrap();
    let (_, mut changes) = a.db.next_schema_change().unwrap().unwrap();
    changes.hlc = Hlc(changes.hlc.0 + (60_000 << 16));
    b.db.apply_schema(Shard(0), Position(0), NodeId(1), &changes).expect("the guard installs again");
    let table = |n: &Node| objects(&n.app).into_iter().find(|o| o.1 == "t");
    assert_eq!(table(&b), table(&a));
    a.exec("INSERT INTO t (id, a) VALUES (1, 'x')");
    let batch = a.acknowledge_all().batch;
    b.apply(&batch);
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn an_older_change_published_late_does_not_undo_a_newer_one() {
    let mut a = node(1, BASE);
    let mut b = node(2, BASE);
    a.exec("CREATE TABLE scratch (id INTEGER PRIMARY KEY)");
    a.db.refresh_if_schema_changed().unwrap();
    let (_, create) = a.db.next_schema_change().unwrap().unwrap();
    // b learns of `scratch` (as from a snapshot of a) and drops it, later.
    b.db.apply_schema(Shard(0), Position(0), NodeId(1), &create).unwrap();
    b.exec("DROP TABLE scratch");
    b.db.refresh_if_schema_changed().unwrap();
    let (_, drop) = b.db.next_schema_change().unwrap().unwrap();
    assert!(drop.hlc > create.hlc, "the drop is versioned after what b had seen");
    // The log holds the drop first, then a's create, published late: both end without it.
    for (n, _) in [(&mut a, 0), (&mut b, 1)] {
        n.db.apply_schema(Shard(0), Position(0), NodeId(2), &drop).unwrap();
        n.db.apply_schema(Shard(0), Position(0), NodeId(1), &create).unwrap();
        assert!(!objects(&n.app).iter().any(|o| o.1 == "scratch"), "scratch came back");
    }
}

#[test]
fn a_change_made_while_marmot_was_stopped_does_not_beat_one_made_elsewhere_meanwhile() {
    let mut a = node(1, BASE);
    let mut b = node(2, BASE);
    // a's Marmot is stopped; its application adds a column. Meanwhile b adds another one.
    a.exec("ALTER TABLE t ADD COLUMN x INT");
    b.exec("ALTER TABLE t ADD COLUMN y TEXT");
    b.db.refresh_if_schema_changed().unwrap();
    let (_, from_b) = b.db.next_schema_change().unwrap().unwrap();
    // a's Marmot starts: the change it finds is not stamped "now".
    a.db = Db::open(&a.path, NodeId(1), CaptureOptions::default()).unwrap();
    let (_, from_a) = a.db.next_schema_change().unwrap().unwrap();
    assert!(from_a.hlc < from_b.hlc, "{:?} !< {:?}", from_a.hlc, from_b.hlc);
    for n in [&mut a, &mut b] {
        n.db.apply_schema(Shard(0), Position(0), NodeId(1), &from_a).unwrap();
        n.db.apply_schema(Shard(0), Position(0), NodeId(2), &from_b).unwrap();
    }
    assert_eq!(objects(&a.app), objects(&b.app));
    assert!(objects(&a.app).iter().any(|o| o.2.as_deref().is_some_and(|s| s.contains("y TEXT"))));
}

#[test]
fn a_change_found_at_start_after_cleanup_comes_after_the_nodes_earlier_changes() {
    let at = |ms: u64| CaptureOptions { time_ms_sql: ms.to_string(), ..CaptureOptions::default() };
    let mut a = node_with(1, BASE, at(1_000));
    let mut b = node(2, BASE);
    a.exec("CREATE TABLE scratch (id INTEGER PRIMARY KEY)");
    let create = ship(&mut a, &mut b);
    assert!(objects(&b.app).iter().any(|o| o.1 == "scratch"));
    // `marmot -cleanup`, then Marmot starts again: the schema is recorded afresh. The
    // application drops the table and Marmot crashes before noticing; it finds the drop
    // when it starts.
    crate::sqlite::cleanup(&a.app).unwrap();
    a.db = Db::open(&a.path, NodeId(1), at(2_000)).unwrap();
    a.exec("DROP TABLE scratch");
    a.db = Db::open(&a.path, NodeId(1), at(3_000)).unwrap();
    let (_, drop) = a.db.next_schema_change().unwrap().expect("the drop is queued");
    assert!(drop.hlc > create[0].hlc, "{:?} !> {:?}: the drop was made after the create", drop.hlc, create[0].hlc);
    b.db.apply_schema(Shard(0), Position(0), NodeId(1), &drop).unwrap();
    assert!(!objects(&b.app).iter().any(|o| o.1 == "scratch"), "the drop reached b");
}

#[test]
fn a_rebuild_that_tightens_a_constraint_waits_for_the_rows_its_transaction_fixed() {
    let mut a = node(1, "CREATE TABLE u (id INTEGER PRIMARY KEY, nick TEXT)");
    let mut b = node(2, "CREATE TABLE u (id INTEGER PRIMARY KEY, nick TEXT)");
    a.exec("INSERT INTO u VALUES (1, NULL), (2, 'bo')");
    let rows = a.acknowledge_all().batch;
    b.apply(&rows);
    a.exec(
        "BEGIN; UPDATE u SET nick = 'anon' WHERE nick IS NULL; \
         CREATE TABLE u_new (id INTEGER PRIMARY KEY, nick TEXT NOT NULL); INSERT INTO u_new SELECT * FROM u; \
         DROP TABLE u; ALTER TABLE u_new RENAME TO u; COMMIT;",
    );
    // The schema change arrives first (another stream): row 1 does not fit yet.
    ship(&mut a, &mut b);
    assert_eq!(objects(&b.app), objects(&a.app));
    let resent = a.acknowledge_all().batch;
    b.apply(&resent);
    assert_eq!(b.dump("u"), a.dump("u"));
}

/// Runs `sql` on `a`, ships its schema change and its rows to `b`, and checks both hold
/// the same schema and the same rows in `tables`.
fn migrate_and_compare(a: &mut Node, b: &mut Node, sql: &str, tables: &[&str]) {
    a.exec(sql);
    ship(a, b);
    if let Some(p) = a.db.read_pending().unwrap() {
        a.db.acknowledge(p.through).unwrap();
        b.apply(&p.batch);
    }
    assert_eq!(objects(&b.app), objects(&a.app), "schema after {sql}");
    for t in tables {
        assert_eq!(b.dump(t), a.dump(t), "rows of {t} after {sql}");
    }
}

/// Two nodes that start equal, with rows in `t` (and `t_new`) replicated.
fn two_nodes(schema: &str, rows: &str) -> (Node, Node) {
    let mut a = node(1, schema);
    let mut b = node(2, schema);
    a.exec(rows);
    let batch = a.acknowledge_all().batch;
    b.apply(&batch);
    (a, b)
}

#[test]
fn tables_that_change_identity_under_one_name_keep_their_rows_everywhere() {
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE t_new (id INTEGER PRIMARY KEY, v TEXT, extra INT);";
    let rows =
        "INSERT INTO t VALUES (1, 'old1'), (2, 'old2'); INSERT INTO t_new VALUES (1, 'new1', 10), (3, 'new3', 30);";
    // A blue/green swap in one transaction.
    let (mut a, mut b) = two_nodes(schema, rows);
    migrate_and_compare(
        &mut a,
        &mut b,
        "BEGIN; ALTER TABLE t RENAME TO t_old; ALTER TABLE t_new RENAME TO t; COMMIT;",
        &["t", "t_old"],
    );
    assert_eq!(b.dump("t").len(), 2);
    // A table renamed, its old name kept as a view.
    let (mut a, mut b) = two_nodes(schema, rows);
    migrate_and_compare(
        &mut a,
        &mut b,
        "BEGIN; ALTER TABLE t RENAME TO t2; CREATE VIEW t AS SELECT * FROM t2; COMMIT;",
        &["t2"],
    );
    assert_eq!(b.dump("t2").len(), 2);
    // Dropped and created again in one transaction: the new table's rows only.
    let (mut a, mut b) = two_nodes(schema, rows);
    migrate_and_compare(
        &mut a,
        &mut b,
        "BEGIN; DROP TABLE t; CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (5, 'n'); COMMIT;",
        &["t"],
    );
    assert_eq!(b.dump("t"), vec![vec![int(5), text("n")]]);
}

#[test]
fn a_view_that_becomes_a_table_and_back() {
    let schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); CREATE VIEW vw AS SELECT id FROM t;";
    let (mut a, mut b) = two_nodes(schema, "INSERT INTO t VALUES (1, 'x');");
    migrate_and_compare(
        &mut a,
        &mut b,
        "BEGIN; DROP VIEW vw; CREATE TABLE vw (id INTEGER PRIMARY KEY); INSERT INTO vw VALUES (7); COMMIT;",
        &["vw", "t"],
    );
    assert_eq!(b.dump("vw"), vec![vec![int(7)]]);
    migrate_and_compare(&mut a, &mut b, "BEGIN; DROP TABLE vw; CREATE VIEW vw AS SELECT id FROM t; COMMIT;", &["t"]);
}
