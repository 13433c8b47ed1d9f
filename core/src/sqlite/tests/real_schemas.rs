//! Schemas as applications write them: REPLACE through a secondary UNIQUE, keys equal under
//! a collation or by value, application triggers, unique index collations, NULL keys,
//! tables created while running, snapshots. Each test is a case that once diverged.

use super::*;

/// Publishes every node's pending changes to every other node, until nothing is pending.
fn sync(nodes: &mut [&mut Node]) {
    for _ in 0..4 {
        let mut batches = Vec::new();
        for n in nodes.iter_mut() {
            if let Some(p) = n.db.read_pending().expect("read_pending") {
                n.db.acknowledge(p.through).expect("acknowledge");
                batches.push(p.batch);
            }
        }
        if batches.is_empty() {
            return;
        }
        for b in &batches {
            for n in nodes.iter_mut() {
                if n.db.node() != b.origin {
                    n.apply(b);
                }
            }
        }
    }
}

fn assert_same(nodes: &[&mut Node], tables: &[&str]) {
    for t in tables {
        let first = nodes[0].dump(t);
        for (i, n) in nodes.iter().enumerate().skip(1) {
            assert_eq!(n.dump(t), first, "node {} differs from node 1 in {t:?}", i + 1);
        }
    }
}

const USERS: &str = "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT);";

#[test]
fn insert_or_replace_through_a_secondary_unique_replicates_the_displaced_row_as_a_delete() {
    for replace in [
        "INSERT OR REPLACE INTO users VALUES (2, 'x@m', 'two')",
        "REPLACE INTO users VALUES (2, 'x@m', 'two')",
        "INSERT INTO users VALUES (2, 'y@m', 'two'); UPDATE OR REPLACE users SET email = 'x@m' WHERE id = 2",
    ] {
        let (mut a, mut b) = (node(1, USERS), node(2, USERS));
        a.exec("INSERT INTO users VALUES (1, 'x@m', 'one')");
        sync(&mut [&mut a, &mut b]);
        a.exec(replace);
        assert_eq!(a.count("users"), 1, "{replace}: SQLite replaced row 1");
        sync(&mut [&mut a, &mut b]);
        assert_same(&[&mut a, &mut b], &["users"]);
        assert_eq!(b.db.aside_count().unwrap(), 0, "{replace}: row 1 is deleted, not set aside");
        a.exec("DELETE FROM users WHERE id = 2");
        sync(&mut [&mut a, &mut b]);
        assert_eq!(b.count("users"), 0, "{replace}: row 1 must not come back on the replica");
        assert_same(&[&mut a, &mut b], &["users"]);
    }
}

#[test]
fn on_conflict_replace_column_displaces_rows_as_captured_deletes() {
    let schema = "CREATE TABLE tags(id INTEGER PRIMARY KEY, slug TEXT UNIQUE ON CONFLICT REPLACE);";
    let (mut a, mut b) = (node(1, schema), node(2, schema));
    a.exec("INSERT INTO tags VALUES (1, 's'), (2, 't')");
    sync(&mut [&mut a, &mut b]);
    a.exec("INSERT INTO tags VALUES (3, 's'); UPDATE tags SET slug = 't' WHERE id = 3");
    assert_eq!(a.dump("tags"), vec![vec![int(3), text("t")]]);
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["tags"]);
}

#[test]
fn an_ignored_insert_captures_no_delete() {
    let (mut a, mut b) = (node(1, USERS), node(2, USERS));
    a.exec("INSERT INTO users VALUES (1, 'x@m', 'one')");
    sync(&mut [&mut a, &mut b]);
    a.exec("INSERT OR IGNORE INTO users VALUES (2, 'x@m', 'two'); INSERT INTO users VALUES (3, 'z@m', 'three')");
    let p = a.pending();
    assert!(rows_of(&p.batch, "users").iter().all(|(op, _)| *op == Op::Upsert), "no delete of row 1");
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["users"]);
    assert_eq!(b.count("users"), 2);
}

const NAMES: &str = "CREATE TABLE names(k TEXT COLLATE NOCASE PRIMARY KEY, v);";

#[test]
fn nocase_keys_spelled_differently_on_two_nodes_are_one_row_everywhere() {
    let (mut a, mut b, mut c) = (node(1, NAMES), node(2, NAMES), node(3, NAMES));
    a.exec("INSERT INTO names VALUES ('bob', 'from a')");
    b.exec("INSERT INTO names VALUES ('Bob', 'from b')");
    sync(&mut [&mut a, &mut b, &mut c]);
    assert_same(&[&mut a, &mut b, &mut c], &["names"]);
    assert_eq!(c.count("names"), 1);
    // The newer write (b's) wins, with its spelling.
    assert_eq!(c.dump("names"), vec![vec![text("Bob"), text("from b")]]);
    // A key change that only changes case is a write of the same row.
    a.exec("UPDATE names SET k = 'BOB' WHERE k = 'bob'");
    sync(&mut [&mut a, &mut b, &mut c]);
    assert_same(&[&mut a, &mut b, &mut c], &["names"]);
    assert_eq!(c.dump("names"), vec![vec![text("BOB"), text("from b")]]);
}

#[test]
fn keys_equal_by_value_but_not_by_bytes_are_one_row() {
    // Found by the simulation (seed 40): in a WITHOUT ROWID table the key spelling of the
    // winning write was not written.
    for schema in ["CREATE TABLE m(k PRIMARY KEY, v);", "CREATE TABLE m(k PRIMARY KEY, v) WITHOUT ROWID;"] {
        let (mut a, mut b, mut c) = (node(1, schema), node(2, schema), node(3, schema));
        b.exec("INSERT INTO m VALUES (1.0, 'b')");
        sync(&mut [&mut a, &mut b, &mut c]);
        a.exec("INSERT INTO m VALUES (1, 'a') ON CONFLICT(k) DO NOTHING; REPLACE INTO m VALUES (1, 'a')");
        sync(&mut [&mut a, &mut b, &mut c]);
        assert_same(&[&mut a, &mut b, &mut c], &["m"]);
        assert_eq!(c.dump("m"), vec![vec![int(1), text("a")]], "{schema}");
    }
}

#[test]
fn a_table_keyed_by_a_custom_collation_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let app = Connection::open(&path).unwrap();
    app.create_collation("REV", |a: &str, b: &str| b.cmp(a)).unwrap();
    app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE r(k TEXT COLLATE REV PRIMARY KEY, v); CREATE TABLE ok(id INTEGER PRIMARY KEY);").unwrap();
    let db = Db::open(&path, NodeId(1), CaptureOptions::default()).unwrap();
    let skipped = db.schema().skipped.iter().find(|s| s.name == "r").expect("r is skipped");
    assert!(skipped.reason.contains("REV"), "the reason names the collation: {}", skipped.reason);
    assert!(db.schema().table("ok").is_some(), "other tables still replicate");
}

const HANDLES: &str = "CREATE TABLE handles(id INTEGER PRIMARY KEY, handle TEXT); \
                       CREATE UNIQUE INDEX handles_handle ON handles(handle COLLATE NOCASE);";

#[test]
fn unique_index_collation_decides_conflicts_in_either_order() {
    let (mut a, mut b) = (node(1, HANDLES), node(2, HANDLES));
    a.exec("INSERT INTO handles VALUES (1, 'Alice')");
    b.exec("INSERT INTO handles VALUES (2, 'alice')");
    let (pa, pb) = (a.acknowledge_all().batch, b.acknowledge_all().batch);
    let (mut c, mut d) = (node(3, HANDLES), node(4, HANDLES));
    c.apply(&pa);
    c.apply(&pb);
    d.apply(&pb);
    d.apply(&pa);
    a.apply(&pb);
    b.apply(&pa);
    assert_same(&[&mut a, &mut b, &mut c, &mut d], &["handles"]);
    assert_eq!(c.count("handles"), 1, "one row holds the handle, the other waits aside");
}

#[test]
fn partial_unique_index_conflicts_only_inside_its_condition() {
    let schema = "CREATE TABLE s(id INTEGER PRIMARY KEY, slug TEXT, live INTEGER); \
                  CREATE UNIQUE INDEX s_live ON s(slug) WHERE live = 1;";
    let (mut a, mut b, mut c) = (node(1, schema), node(2, schema), node(3, schema));
    a.exec("INSERT INTO s VALUES (1, 'x', 1)");
    b.exec("INSERT INTO s VALUES (2, 'x', 0)");
    c.exec("INSERT INTO s VALUES (3, 'x', 1)");
    sync(&mut [&mut a, &mut b, &mut c]);
    assert_same(&[&mut a, &mut b, &mut c], &["s"]);
    assert_eq!(a.count("s"), 2, "the row outside the index is no conflict; one live 'x' waits aside");
}

#[test]
fn a_unique_index_on_an_expression_refuses_the_table_with_its_reason() {
    let n = node(1, "CREATE TABLE e(id INTEGER PRIMARY KEY, email TEXT); CREATE UNIQUE INDEX e_l ON e(lower(email));");
    let skipped = n.db.schema().skipped.iter().find(|s| s.name == "e").expect("e is skipped");
    assert!(skipped.reason.contains("e_l"), "{}", skipped.reason);
}

const SHOP: &str = "
CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT, qty INTEGER, updated_at INTEGER);
CREATE TABLE stock(item TEXT PRIMARY KEY, n INTEGER);
CREATE TABLE audit(id INTEGER PRIMARY KEY, what TEXT);
CREATE TABLE seen(x);
CREATE VIRTUAL TABLE orders_fts USING fts5(item, content='orders', content_rowid='id');
CREATE TRIGGER orders_ai AFTER INSERT ON orders BEGIN
  UPDATE stock SET n = n - NEW.qty WHERE item = NEW.item;
  INSERT INTO audit(what) VALUES ('order ' || NEW.id);
  UPDATE orders SET updated_at = (SELECT count(*) FROM seen) WHERE id = NEW.id;
  INSERT INTO orders_fts(rowid, item) VALUES (NEW.id, NEW.item);
  INSERT INTO seen VALUES (NEW.id);
END;
";

#[test]
fn application_triggers_write_replicated_tables_once_and_local_tables_everywhere() {
    let (mut a, mut b) = (node(1, SHOP), node(2, SHOP));
    b.exec("INSERT INTO seen VALUES ('b has an older local row')");
    a.exec("INSERT INTO stock VALUES ('apple', 100)");
    sync(&mut [&mut a, &mut b]);
    a.exec("INSERT INTO orders(id, item, qty) VALUES (1, 'apple', 7)");
    sync(&mut [&mut a, &mut b]);
    b.exec("INSERT INTO orders(id, item, qty) VALUES (2, 'apple', 5)");
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["orders", "stock", "audit"]);
    assert_eq!(a.dump("stock"), vec![vec![text("apple"), int(88)]], "each order counted once, on its origin");
    assert_eq!(a.count("audit"), 2, "one audit row per order, not one per node");
    // Concurrent orders: the counter is a row like any other, last writer wins, the same everywhere.
    a.exec("INSERT INTO orders(id, item, qty) VALUES (3, 'apple', 1)");
    b.exec("INSERT INTO orders(id, item, qty) VALUES (4, 'apple', 2)");
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["orders", "stock"]);
    // The FTS5 index is not replicated: the trigger keeps it on every node.
    for n in [&a, &b] {
        let hits: i64 = n
            .app
            .query_row("SELECT count(*) FROM orders_fts WHERE orders_fts MATCH 'apple'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(hits, 4, "full-text search finds every order on every node");
        assert_eq!(
            n.count("seen"),
            if n.db.node() == NodeId(2) { 5 } else { 4 },
            "local tables are written on every node"
        );
    }
}

#[test]
fn rows_with_a_null_key_are_not_replicated_and_leave_other_rows_alone() {
    let schema = "CREATE TABLE nk(k TEXT PRIMARY KEY, v);";
    let (mut a, mut b) = (node(1, schema), node(2, schema));
    a.exec("INSERT INTO nk VALUES (NULL, 1); INSERT INTO nk VALUES ('x', 1);");
    for _ in 0..3 {
        a.exec("UPDATE nk SET v = v + 1");
        sync(&mut [&mut a, &mut b]);
    }
    assert_eq!(b.dump("nk"), vec![vec![text("x"), int(4)]]);
    assert!(a.db.schema().table("nk").unwrap().pk_nullable);
    assert_eq!(a.db.null_key_rows().unwrap(), vec![("nk".to_owned(), 1)]);
}

#[test]
fn rows_of_a_table_created_a_moment_ago_are_never_folded_without_their_versions() {
    let mut n = node(1, T);
    // The side-car's reader connection notices the new table first and installs its capture.
    let mut reader = Db::open(&n.path, NodeId(1), CaptureOptions::default()).unwrap();
    n.exec("CREATE TABLE fresh(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO fresh VALUES (1, 'local');");
    reader.read_pending().unwrap();
    n.exec("INSERT INTO fresh VALUES (2, 'local')");
    let local = reader.read_pending().unwrap().expect("pending");
    assert_eq!(rows_of(&local.batch, "fresh").len(), 2, "both local rows are published");
    // Maintenance on the merge connection, which has not seen the new table yet, must not
    // pass over its log rows.
    let _ = n.db.clean_published();
    let older = local.through.0 - 1000;
    let remote = batch(2, "fresh", &["id", "v"], &[0], vec![upsert(older, vec![int(2), text("older remote")])]);
    n.apply(&remote);
    assert_eq!(n.dump("fresh"), vec![vec![int(1), text("local")], vec![int(2), text("local")]]);
}

#[test]
fn a_snapshot_keeps_the_versions_of_unpublished_local_writes() {
    let (mut a, mut b) = (node(1, T), node(2, T));
    a.exec("INSERT INTO t VALUES (1, 'newer on a', NULL)");
    let through = a.pending().through;
    let dir = tempfile::tempdir().unwrap();
    let file = a.db.save_snapshot(dir.path(), &dir.path().join("snap.zst")).unwrap();
    b.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    let older = batch(3, "t", &T_COLS, &[0], vec![upsert(through.0 - 1, vec![int(1), text("older"), NULL])]);
    b.apply(&older);
    assert_eq!(b.dump("t"), vec![vec![int(1), text("newer on a"), NULL]], "the restored row keeps its version");
}

#[test]
fn a_restore_refuses_to_erase_a_commit_that_is_not_published() {
    let (mut a, mut b) = (node(1, T), node(2, T));
    b.exec("INSERT INTO t VALUES (9, 'from the snapshot', NULL)");
    b.acknowledge_all();
    let dir = tempfile::tempdir().unwrap();
    let file = b.db.save_snapshot(dir.path(), &dir.path().join("snap.zst")).unwrap();
    a.exec("INSERT INTO t VALUES (1, 'committed while waiting for a snapshot', NULL)");
    let refused = a.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {});
    assert!(matches!(refused, Err(crate::Error::PendingChanges(1))), "{refused:?}");
    assert_eq!(a.dump("t"), vec![vec![int(1), text("committed while waiting for a snapshot"), NULL]], "unchanged");
    // Once published, the restore goes ahead (and the stream brings the change back).
    a.acknowledge_all();
    a.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    assert_eq!(a.dump("t"), vec![vec![int(9), text("from the snapshot"), NULL]]);
}

#[test]
fn a_remote_clock_far_ahead_is_measured_on_arrival() {
    let mut n = node(1, T);
    let hour_ahead = Hlc::from_millis(now_ms() + 3_600_000).0;
    let out = n.apply(&batch(2, "t", &T_COLS, &[0], vec![upsert(hour_ahead, vec![int(1), text("future"), NULL])]));
    assert!((3_590_000..=3_600_100).contains(&out.remote_ahead_ms), "{}", out.remote_ahead_ms);
    assert_eq!(n.db.remote_ahead_ms().unwrap(), out.remote_ahead_ms, "kept for `marmot status`");
    assert!(n.db.clock_ahead_ms().unwrap() >= 3_590_000, "this node's clock was dragged forward with it");
}

#[test]
fn a_restore_never_moves_the_clock_back() {
    let (mut a, mut b) = (node(1, T), node(2, T));
    b.exec("INSERT INTO t VALUES (9, 'old snapshot', NULL)");
    b.acknowledge_all();
    let dir = tempfile::tempdir().unwrap();
    let file = b.db.save_snapshot(dir.path(), &dir.path().join("snap.zst")).unwrap();
    let far = Hlc::from_millis(now_ms() + 3_600_000).0;
    a.apply(&batch(3, "t", &T_COLS, &[0], vec![upsert(far, vec![int(1), text("from a fast clock"), NULL])]));
    let before = a.db.clock().unwrap();
    a.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    assert!(a.db.clock().unwrap() >= before, "the clock after a restore is not below the clock before it");
    a.exec("INSERT INTO t VALUES (1, 'written after the restore', NULL)");
    assert!(a.pending().through > before, "a write after the restore is versioned above everything seen before");
}

#[test]
fn a_snapshot_keeps_parked_batches_its_positions_have_passed() {
    // Found by the simulation: a restored node lost a change the saver had parked.
    let (mut a, mut b) = (node(1, T), node(2, T));
    let later = batch(3, "later", &["id", "v"], &[0], vec![upsert(now_ms() << 16, vec![int(1), text("waits")])]);
    let parked = b.db.apply_batch(Shard(0), Position(7), &later, None).unwrap_err();
    let bytes = crate::wire::encode_batch(&later, Default::default()).remove(0).payload;
    b.db.park(Shard(0), Position(7), &parked, &bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = b.db.save_snapshot(dir.path(), &dir.path().join("snap.zst")).unwrap();
    a.db.restore_snapshot(&file.path, &file.checksum, &mut |_, _| {}).unwrap();
    assert_eq!(a.db.parked_count().unwrap(), 1, "the parked batch came with the snapshot");
    assert_eq!(a.db.position(Shard(0)).unwrap(), Position(7));
}

// Found in review (each was confirmed with the generated SQL before the fix).

#[test]
fn a_trigger_writing_another_unique_table_does_not_lose_a_displaced_row() {
    let schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, u UNIQUE, v); \
                  CREATE TABLE audit(id INTEGER PRIMARY KEY, tag UNIQUE);";
    let (mut a, mut b) = (node(1, schema), node(2, schema));
    for n in [&a, &b] {
        n.exec(
            "CREATE TRIGGER app_audit AFTER INSERT ON t BEGIN INSERT INTO audit(tag) VALUES ('ins:' || NEW.id); END;",
        );
    }
    a.exec("INSERT INTO t VALUES (1, 'x', 0)");
    sync(&mut [&mut a, &mut b]);
    a.exec("INSERT OR REPLACE INTO t VALUES (2, 'x', 0)");
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["t", "audit"]);
    assert_eq!(b.db.aside_count().unwrap(), 0, "row 1 was deleted, not set aside");
}

#[test]
fn a_key_collation_declared_in_the_primary_key_clause_is_the_guards_too() {
    let schema = "CREATE TABLE k(k TEXT NOT NULL, v, PRIMARY KEY (k COLLATE NOCASE)) WITHOUT ROWID; \
                  CREATE TABLE seen(x); \
                  CREATE TRIGGER k_seen AFTER DELETE ON k BEGIN INSERT INTO seen VALUES (OLD.k); END;";
    let (mut a, mut b) = (node(1, schema), node(2, schema));
    b.exec("INSERT INTO k VALUES ('bob', 1)");
    sync(&mut [&mut a, &mut b]);
    let far = Hlc::from_millis(now_ms() + 1000).0;
    a.apply(&batch(3, "k", &["k", "v"], &[0], vec![delete(far, vec![text("BOB"), NULL])]));
    b.apply(&batch(3, "k", &["k", "v"], &[0], vec![delete(far, vec![text("BOB"), NULL])]));
    assert_eq!((a.count("k"), b.count("k")), (0, 0), "the delete spelled differently removed the row");
}

#[test]
fn a_partial_index_predicate_ending_in_a_comment_still_works() {
    let schema = "CREATE TABLE s(id INTEGER PRIMARY KEY, slug TEXT, d INTEGER); \
                  CREATE UNIQUE INDEX s_live ON s(slug) WHERE d = 0 -- only live rows\n;";
    let (mut a, mut b) = (node(1, schema), node(2, schema));
    a.exec("INSERT INTO s VALUES (1, 'x', 0)");
    b.exec("INSERT INTO s VALUES (2, 'x', 0)");
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["s"]);
    assert_eq!(a.count("s"), 1);
}

#[test]
fn generated_columns_do_not_shift_which_columns_are_unique() {
    let schema = "CREATE TABLE g(id INTEGER PRIMARY KEY, gen AS (id * 10), cat TEXT, u TEXT UNIQUE);";
    let (mut a, mut b) = (node(1, schema), node(2, schema));
    let info = a.db.schema().table("g").expect("replicated").clone();
    assert_eq!(info.unique.iter().map(|u| u.columns.clone()).collect::<Vec<_>>(), vec![vec![2]], "u, not cat");
    a.exec("INSERT INTO g(id, cat, u) VALUES (1, 'books', 'a'), (2, 'books', 'b')");
    sync(&mut [&mut a, &mut b]);
    assert_same(&[&mut a, &mut b], &["g"]);
    assert_eq!(b.count("g"), 2, "two rows may share a category");
    let n = node(3, "CREATE TABLE h(id INTEGER PRIMARY KEY, gen AS (id * 10) UNIQUE);");
    let skipped = n.db.schema().skipped.iter().find(|s| s.name == "h").expect("h is skipped");
    assert!(skipped.reason.contains("generated"), "{}", skipped.reason);
}

/// Issue #13, finding 6: a large backlog of local changes (written while Marmot was
/// stopped) is folded and cleaned in slices of at most `WRITE_SLICE_ROWS` rows per write
/// transaction, so the application never waits long for the write lock. The time per
/// slice is printed, not asserted.
#[test]
fn a_large_local_backlog_is_folded_and_cleaned_in_bounded_slices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let app = Connection::open(&path).unwrap();
    app.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);").unwrap();
    let db = Db::open(&path, NodeId(1), CaptureOptions::default()).unwrap();
    let rows = 2 * crate::sqlite::merge::WRITE_SLICE_ROWS + 5;
    let tx = app.unchecked_transaction().unwrap();
    for i in 1..=rows {
        tx.execute("INSERT INTO t(id, v) VALUES (?1, 'x')", [i]).unwrap();
    }
    tx.commit().unwrap();
    let started = std::time::Instant::now();
    let slices = db.fold_in_slices().unwrap();
    println!("folded {rows} rows in {slices} slices, {:?} per slice", started.elapsed() / slices as u32);
    assert_eq!(slices, 3, "two full slices and the rest");
    let last: i64 = app.query_row("SELECT max(hlc) FROM __marmot__log", [], |r| r.get(0)).unwrap();
    db.acknowledge(crate::Hlc(last as u64)).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(db.clean_published().unwrap(), rows as u64);
    println!("cleaned {rows} rows in {:?}", started.elapsed());
    let left: i64 = app.query_row("SELECT count(*) FROM __marmot__log", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0);
    assert!(db.version_of("t", &[Value::Integer(rows)]).unwrap().is_some(), "the last row has its version");
}
