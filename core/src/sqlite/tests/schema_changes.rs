//! Changes the application makes around a schema change, before Marmot notices it: none
//! is lost, and every node converges to the origin's rows.

use super::*;

/// Publishes what `from` has pending to `to`, and acknowledges it on `from`.
fn ship(from: &mut Node, to: &mut Node) -> Pending {
    let p = from.acknowledge_all();
    to.apply(&p.batch);
    p
}

#[test]
fn rows_written_around_add_column_carry_the_new_column() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'before', 1.0)");
    // The application migrates and writes at once; the old triggers capture row 2
    // without `extra`, and row 1 was captured before the column existed.
    a.exec("ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'dflt'; INSERT INTO t VALUES (2, 'after', 2.0, 'set');");
    b.exec("ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'dflt'");
    let p = ship(&mut a, &mut b);
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![
            (Op::Upsert, vec![int(1), text("before"), real(1.0), text("dflt")]),
            (Op::Upsert, vec![int(2), text("after"), real(2.0), text("set")]),
        ],
        "unpublished rows are re-read with the new column, not sent with NULL"
    );
    assert_eq!(b.dump("t"), a.dump("t"));

    // Captured after the re-install: the new triggers include the column.
    a.exec("UPDATE t SET extra = 'changed' WHERE id = 1");
    ship(&mut a, &mut b);
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn a_later_change_to_the_row_still_wins_after_the_re_layout() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'one', 1.0)");
    a.exec("ALTER TABLE t ADD COLUMN extra TEXT; UPDATE t SET extra = 'x', name = 'uno' WHERE id = 1;");
    a.exec("DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (3, 'three', 3.0, 'z');");
    b.exec("ALTER TABLE t ADD COLUMN extra TEXT");
    ship(&mut a, &mut b);
    assert_eq!(a.dump("t"), vec![vec![int(3), text("three"), real(3.0), text("z")]]);
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn a_rebuilt_table_with_reordered_columns_keeps_its_unpublished_rows_right() {
    let mut a = node(1, T);
    let mut b = node(2, "CREATE TABLE t(score REAL, id INTEGER PRIMARY KEY, name TEXT);");
    a.exec("INSERT INTO t VALUES (1, 'one', 1.0); DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (2, 'two', 2.0);");
    // SQLite's documented way to change a table's shape: build, copy, drop, rename.
    a.exec(
        "BEGIN; CREATE TABLE t_new(score REAL, id INTEGER PRIMARY KEY, name TEXT); \
         INSERT INTO t_new SELECT score, id, name FROM t; DROP TABLE t; ALTER TABLE t_new RENAME TO t; COMMIT;",
    );
    let p = ship(&mut a, &mut b);
    let rows = rows_of(&p.batch, "t");
    assert!(rows.contains(&(Op::Delete, vec![NULL, int(1), NULL])), "the delete keeps its key: {rows:?}");
    assert!(rows.contains(&(Op::Upsert, vec![real(2.0), int(2), text("two")])), "re-laid out: {rows:?}");
    assert_eq!(b.dump("t"), vec![vec![real(2.0), int(2), text("two")]]);
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn rows_of_a_table_created_before_marmot_noticed_are_sent() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    let schema = "CREATE TABLE fresh(k TEXT PRIMARY KEY, v INTEGER);";
    a.exec(&format!("{schema} INSERT INTO fresh VALUES ('a', 1), ('b', 2);"));
    b.exec(schema);
    let p = ship(&mut a, &mut b);
    assert_eq!(rows_of(&p.batch, "fresh").len(), 2);
    assert_eq!(b.dump("fresh"), vec![vec![text("a"), int(1)], vec![text("b"), int(2)]]);

    // Captured from now on, once each.
    a.exec("INSERT INTO fresh VALUES ('c', 3)");
    assert_eq!(rows_of(&ship(&mut a, &mut b).batch, "fresh").len(), 1);
    assert_eq!(b.dump("fresh"), a.dump("fresh"));
}

#[test]
fn a_table_dropped_and_created_again_has_its_new_rows_sent() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'old', 1.0)");
    ship(&mut a, &mut b);
    a.exec("DROP TABLE t; CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score REAL); INSERT INTO t VALUES (1, 'new', 9.0);");
    ship(&mut a, &mut b);
    assert_eq!(b.dump("t"), vec![vec![int(1), text("new"), real(9.0)]]);
}

#[test]
fn first_install_on_existing_data_sends_nothing() {
    let mut a = node(1, &format!("{T} INSERT INTO t VALUES (1, 'existing', 1.0);"));
    assert!(a.db.read_pending().unwrap().is_none(), "rows that predate Marmot are not published on install");
}

#[test]
fn a_renamed_table_keeps_its_unpublished_rows_and_its_versions() {
    let mut a = node(1, T);
    let remote = batch(2, "t", &T_COLS, &[0], vec![upsert((now_ms() + 60_000) << 16, vec![int(5), text("r"), NULL])]);
    a.apply(&remote);
    let version = a.db.version_of("t", &[int(5)]).unwrap();
    assert!(version.is_some());
    a.exec("INSERT INTO t VALUES (1, 'before rename', 1.0); ALTER TABLE t RENAME TO t2;");
    a.exec("INSERT INTO t2 VALUES (2, 'after rename', 2.0)");
    let p = a.pending();
    assert_eq!(
        rows_of(&p.batch, "t2"),
        vec![
            (Op::Upsert, vec![int(1), text("before rename"), real(1.0)]),
            (Op::Upsert, vec![int(2), text("after rename"), real(2.0)]),
        ]
    );
    assert_eq!(a.db.version_of("t2", &[int(5)]).unwrap(), version, "the renamed table keeps its versions");
    // An older remote write to the renamed table still loses to the stored version.
    let stale = batch(3, "t2", &T_COLS, &[0], vec![upsert(now_ms() << 16, vec![int(5), text("stale"), NULL])]);
    a.apply(&stale);
    assert!(a.dump("t2").contains(&vec![int(5), text("r"), NULL]));
}

#[test]
fn a_restored_snapshot_is_not_published_again() {
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'one', 1.0), (2, 'two', 2.0)");
    a.acknowledge_all();
    let dir = tempfile::tempdir().unwrap();
    let file = a.db.save_snapshot(dir.path(), &dir.path().join("snap.zst")).unwrap();
    let mut b = node(2, T);
    b.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    assert_eq!(b.dump("t"), a.dump("t"));
    assert!(b.db.read_pending().unwrap().is_none(), "the restored rows are not re-published");
    b.exec("INSERT INTO t VALUES (3, 'three', 3.0)");
    assert_eq!(rows_of(&b.pending().batch, "t").len(), 1, "capture works after the restore");
}

#[test]
fn a_row_last_written_by_a_node_without_the_new_column_ends_with_its_default_everywhere() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'dflt'");
    a.exec("INSERT INTO t VALUES (1, 'from a', 1.0, 'x')");
    let from_a = a.acknowledge_all();
    // b has not migrated yet, and writes the same row later (its clock has seen a later
    // version, so its write wins everywhere).
    let later = batch(3, "t", &T_COLS, &[0], vec![upsert((now_ms() + 60_000) << 16, vec![int(9), NULL, NULL])]);
    b.apply(&later);
    b.exec("INSERT INTO t VALUES (1, 'from b', 2.0)");
    let from_b = b.acknowledge_all();
    a.apply(&later);
    a.apply(&from_b.batch);
    b.exec("ALTER TABLE t ADD COLUMN extra TEXT DEFAULT 'dflt'");
    b.apply(&from_a.batch);
    assert_eq!(
        a.dump("t"),
        vec![vec![int(1), text("from b"), real(2.0), text("dflt")], vec![int(9), NULL, NULL, text("dflt")]],
        "the winning write did not carry `extra`: the row takes the default, as on b after its migration"
    );
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn drop_column_works_while_capture_is_installed_and_rows_around_it_arrive() {
    let schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, old TEXT);";
    let mut a = node(1, schema);
    let mut b = node(2, schema);
    a.exec("INSERT INTO t VALUES (1, 'before', 'gone')");
    // The triggers name only the key, so SQLite lets the application drop any other column.
    a.exec("ALTER TABLE t DROP COLUMN old; INSERT INTO t VALUES (2, 'after');");
    b.exec("ALTER TABLE t DROP COLUMN old");
    let p = ship(&mut a, &mut b);
    assert_eq!(p.batch.tables[0].columns, vec!["id", "name"]);
    assert_eq!(b.dump("t"), vec![vec![int(1), text("before")], vec![int(2), text("after")]]);
    a.exec("UPDATE t SET name = 'later' WHERE id = 1");
    ship(&mut a, &mut b);
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn rename_column_with_unpublished_rows_loses_nothing() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'one', 1.0)");
    a.exec(
        "ALTER TABLE t RENAME COLUMN name TO title; ALTER TABLE t RENAME COLUMN id TO key; \
            INSERT INTO t VALUES (2, 'two', 2.0);",
    );
    b.exec("ALTER TABLE t RENAME COLUMN name TO title; ALTER TABLE t RENAME COLUMN id TO key;");
    let p = ship(&mut a, &mut b);
    assert_eq!(p.batch.tables[0].columns, vec!["key", "title", "score"]);
    assert_eq!(b.dump("t"), vec![vec![int(1), text("one"), real(1.0)], vec![int(2), text("two"), real(2.0)]]);
}

#[test]
fn a_log_written_by_the_previous_layout_is_converted_and_read() {
    // Layout 1 kept whole images, each value at its column's position: key `k` is column 1.
    let schema = "CREATE TABLE t(v TEXT, k TEXT PRIMARY KEY);";
    let mut a = node(1, schema);
    let mut b = node(2, schema);
    a.exec(
        "INSERT INTO t VALUES ('one', 'a'); \
         ALTER TABLE __marmot__log ADD COLUMN c1; \
         UPDATE __marmot__log SET c1 = c0, c0 = 'one'; \
         DELETE FROM __marmot__state WHERE key = 'log_layout'; \
         UPDATE __marmot__tables SET key_columns = NULL;",
    );
    a.db.reinstall().unwrap();
    let layout: i64 =
        a.app.query_row("SELECT value FROM __marmot__state WHERE key = 'log_layout'", [], |r| r.get(0)).unwrap();
    assert_eq!(layout, 2);
    let p = ship(&mut a, &mut b);
    assert_eq!(rows_of(&p.batch, "t"), vec![(Op::Upsert, vec![text("one"), text("a")])]);
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn a_changed_primary_key_sends_every_row_again() {
    let mut a = node(1, "CREATE TABLE t(id INTEGER PRIMARY KEY, code TEXT NOT NULL, v TEXT);");
    let mut b = node(2, "CREATE TABLE t(code TEXT PRIMARY KEY, id INTEGER NOT NULL, v TEXT);");
    a.exec("INSERT INTO t VALUES (1, 'x', 'one'), (2, 'y', 'two')");
    a.acknowledge_all();
    a.exec(
        "BEGIN; CREATE TABLE t_new(code TEXT PRIMARY KEY, id INTEGER NOT NULL, v TEXT); \
         INSERT INTO t_new SELECT code, id, v FROM t; DROP TABLE t; ALTER TABLE t_new RENAME TO t; COMMIT;",
    );
    a.db.reinstall().unwrap();
    let p = ship(&mut a, &mut b);
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![(Op::Upsert, vec![text("x"), int(1), text("one")]), (Op::Upsert, vec![text("y"), int(2), text("two")])]
    );
    assert_eq!(b.dump("t"), a.dump("t"));
}

#[test]
fn a_node_that_dropped_a_column_applies_rows_from_nodes_that_still_have_it() {
    let schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, old TEXT);";
    let mut a = node(1, schema);
    let mut b = node(2, schema);
    a.exec("ALTER TABLE t DROP COLUMN old");
    a.db.reinstall().unwrap();
    // b has not dropped it yet: its rows carry `old`, which a leaves out.
    b.exec("INSERT INTO t VALUES (1, 'from b', 'legacy')");
    let p = ship(&mut b, &mut a);
    assert_eq!(p.batch.tables[0].columns, vec!["id", "name", "old"]);
    assert_eq!(a.dump("t"), vec![vec![int(1), text("from b")]]);
    // A column never seen here still parks the batch until this node has it.
    let unknown =
        batch(2, "t", &["id", "name", "newer"], &[0], vec![upsert(u64::MAX >> 2, vec![int(2), text("x"), int(1)])]);
    assert!(matches!(
        a.db.apply_batch(Shard(0), Position(0), &unknown, None),
        Err(crate::Error::SchemaMismatch { .. })
    ));
    // Added back, the column is the table's again.
    a.exec("ALTER TABLE t ADD COLUMN old TEXT");
    a.db.reinstall().unwrap();
    b.exec("UPDATE t SET old = 'kept' WHERE id = 1");
    ship(&mut b, &mut a);
    assert_eq!(a.dump("t"), vec![vec![int(1), text("from b"), text("kept")]]);
}
