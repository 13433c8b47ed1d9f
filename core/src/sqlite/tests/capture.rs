//! Capture and the reader: what the triggers record and how `read_pending` returns it.

use super::*;

#[test]
fn insert_update_delete_are_captured_in_commit_order() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.5)");
    let first = n.pending();
    assert_eq!(rows_of(&first.batch, "t"), vec![(Op::Upsert, vec![int(1), text("a"), real(1.5)])]);
    n.acknowledge_all();
    n.exec("UPDATE t SET name = 'b' WHERE id = 1");
    let second = n.pending();
    assert_eq!(rows_of(&second.batch, "t"), vec![(Op::Upsert, vec![int(1), text("b"), real(1.5)])]);
    n.acknowledge_all();
    n.exec("DELETE FROM t WHERE id = 1");
    let third = n.pending();
    assert_eq!(third.batch.origin, NodeId(1));
    assert_eq!(rows_of(&third.batch, "t"), vec![(Op::Delete, vec![int(1), NULL, NULL])]);
    let v: Vec<Hlc> = [&first, &second, &third].iter().flat_map(|p| hlcs(&p.batch)).collect();
    assert!(v.windows(2).all(|w| w[0] < w[1]), "successive writes get increasing versions: {v:?}");
    assert_eq!(third.through, *v.last().unwrap());
    assert!(v[0] >= Hlc::from_millis(now_ms() - 60_000), "hlc is at least the wall clock: {}", v[0]);
}

#[test]
fn a_row_written_several_times_before_a_read_travels_once_as_it_is_now() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.5)");
    n.exec("UPDATE t SET name = 'b' WHERE id = 1");
    n.exec("INSERT INTO t VALUES (2, 'x', 0.5)");
    n.exec("DELETE FROM t WHERE id = 2");
    let p = n.pending();
    // The newest version of each row, with its values (or its absence) as the read sees them.
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![(Op::Upsert, vec![int(1), text("b"), real(1.5)]), (Op::Delete, vec![int(2), NULL, NULL])]
    );
    let logged: Vec<i64> = {
        let mut stmt = n.app.prepare("SELECT hlc FROM __marmot__log ORDER BY hlc").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(hlcs(&p.batch), vec![Hlc(logged[1] as u64), Hlc(logged[3] as u64)]);
    assert_eq!(p.through, Hlc(logged[3] as u64));
}

#[test]
fn update_that_changes_the_primary_key_is_a_delete_and_a_write() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.5)");
    n.acknowledge_all();
    n.exec("UPDATE t SET id = 2 WHERE id = 1");
    let p = n.pending();
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![(Op::Delete, vec![int(1), NULL, NULL]), (Op::Upsert, vec![int(2), text("a"), real(1.5)])]
    );
    let v = hlcs(&p.batch);
    assert!(v[0] < v[1], "the write of the new key comes after the delete of the old one");
}

#[test]
fn update_that_keeps_the_primary_key_is_one_write() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.5)");
    n.acknowledge_all();
    n.exec("UPDATE t SET id = 1, score = NULL WHERE id = 1");
    assert_eq!(rows_of(&n.pending().batch, "t"), vec![(Op::Upsert, vec![int(1), text("a"), NULL])]);
}

#[test]
fn multi_row_transaction_is_read_as_one_batch_in_commit_order() {
    let mut n = node(1, &format!("{T} CREATE TABLE u(k TEXT PRIMARY KEY, v BLOB);"));
    n.exec(
        "BEGIN;
         INSERT INTO t VALUES (1, 'a', 1.0);
         INSERT INTO u VALUES ('x', x'00ff');
         INSERT INTO u VALUES ('y', x'01');
         INSERT INTO t VALUES (2, 'b', 2.0);
         UPDATE t SET name = 'c' WHERE id = 1;
         DELETE FROM u WHERE k = 'x';
         COMMIT;",
    );
    let p = n.pending();
    assert_eq!(p.batch.len(), 4, "one change per written row");
    assert_eq!(
        rows_of(&p.batch, "t"),
        vec![(Op::Upsert, vec![int(2), text("b"), real(2.0)]), (Op::Upsert, vec![int(1), text("c"), real(1.0)])]
    );
    assert_eq!(
        rows_of(&p.batch, "u"),
        vec![(Op::Upsert, vec![text("y"), Value::Blob(vec![1])]), (Op::Delete, vec![text("x"), NULL])]
    );
    // Across tables the versions give the order of each row's last write: u.y, t2, t1', u.x.
    let order = |t: usize, r: usize| p.batch.tables.iter().find(|c| c.table == ["t", "u"][t]).unwrap().rows[r].hlc;
    let seq = [order(1, 0), order(0, 0), order(0, 1), order(1, 1)];
    assert!(seq.windows(2).all(|w| w[0] < w[1]), "versions follow commit order: {seq:?}");
}

#[test]
fn rolled_back_transaction_is_not_captured() {
    let mut n = node(1, T);
    n.exec("BEGIN; INSERT INTO t VALUES (1, 'a', 1.0); ROLLBACK;");
    assert!(n.db.read_pending().unwrap().is_none());
}

#[test]
fn read_pending_twice_before_acknowledge_returns_the_same_changes_then_newer_ones() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    let first = n.pending();
    assert_eq!(n.pending(), first);
    n.exec("INSERT INTO t VALUES (2, 'b', 2.0)");
    let second = n.pending();
    assert_eq!(second.batch.len(), 2);
    assert!(second.through > first.through);
}

#[test]
fn acknowledged_changes_are_not_returned_again() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO t VALUES (2, 'b', 2.0);");
    let p = n.pending();
    n.db.acknowledge(p.through).unwrap();
    assert!(n.db.read_pending().unwrap().is_none());
    assert_eq!(n.db.pending_count().unwrap(), 0);
    assert_eq!(n.db.published_hlc().unwrap(), p.through);
    // Acknowledging an older point is a no-op.
    n.db.acknowledge(Hlc(1)).unwrap();
    assert!(n.db.read_pending().unwrap().is_none());
}

#[test]
fn changes_committed_after_the_read_stay_pending_after_acknowledge() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    let p = n.pending();
    n.exec("INSERT INTO t VALUES (2, 'b', 2.0)");
    n.db.acknowledge(p.through).unwrap();
    let rest = n.pending();
    assert_eq!(rows_of(&rest.batch, "t"), vec![(Op::Upsert, vec![int(2), text("b"), real(2.0)])]);
}

fn log_rows(n: &Node) -> i64 {
    n.app.query_row("SELECT count(*) FROM __marmot__log", [], |r| r.get(0)).unwrap()
}

#[test]
fn clean_published_deletes_only_published_log_rows() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO t VALUES (2, 'b', 2.0);");
    let p = n.pending();
    n.exec("INSERT INTO t VALUES (3, 'c', 3.0)");
    assert_eq!(n.db.clean_published().unwrap(), 0, "nothing is published yet");
    n.db.acknowledge(p.through).unwrap();
    assert_eq!(n.db.clean_published().unwrap(), 2);
    assert_eq!(log_rows(&n), 1);
    assert_eq!(rows_of(&n.pending().batch, "t"), vec![(Op::Upsert, vec![int(3), text("c"), real(3.0)])]);
    assert_eq!(n.dump("t").len(), 3, "user data is untouched");
}

#[test]
fn clock_never_goes_backwards_when_published_log_rows_are_cleaned() {
    // A frozen physical clock: only the clock row and the log keep versions increasing.
    let opts = CaptureOptions { time_ms_sql: "1000".into(), ..CaptureOptions::default() };
    let mut n = node_with(1, T, opts);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO t VALUES (2, 'b', 2.0);");
    let p = n.pending();
    // The install itself took the first version of that millisecond (where this
    // database's own changes start).
    let install = Hlc::from_millis(1000).0;
    assert_eq!(hlcs(&p.batch), vec![Hlc(install + 1), Hlc(install + 2)]);
    n.db.acknowledge(p.through).unwrap();
    assert_eq!(n.db.clean_published().unwrap(), 2);
    assert_eq!(log_rows(&n), 0, "the log is empty after cleaning");
    assert_eq!(n.db.clock().unwrap(), p.through, "the clock keeps the highest cleaned version");
    n.exec("UPDATE t SET name = 'z' WHERE id = 1");
    let later = n.pending();
    assert!(hlcs(&later.batch)[0] > p.through, "a later write gets a higher version than everything before");
    // Versions of the cleaned rows were folded before their log rows went away.
    let (v, deleted) = n.db.version_of("t", &[int(2)]).unwrap().expect("version of row 2 kept");
    assert_eq!((v.hlc, v.node, deleted), (p.through, NodeId(1), false));
}

#[test]
fn local_versions_increase_even_if_the_wall_clock_is_behind_them() {
    let opts = CaptureOptions { time_ms_sql: "5".into(), ..CaptureOptions::default() };
    let mut n = node_with(1, T, opts);
    for i in 0..50 {
        n.exec(&format!("INSERT INTO t VALUES ({i}, 'x', 0.0)"));
    }
    let v = hlcs(&n.pending().batch);
    assert_eq!(v.len(), 50);
    assert!(v.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn writes_made_while_the_side_car_is_closed_are_captured() {
    let Node { db, app, path, _dir } = node(1, T);
    drop(db);
    app.execute_batch("INSERT INTO t VALUES (7, 'offline', 7.0)").unwrap();
    let mut reopened = Db::open(&path, NodeId(1), CaptureOptions::default()).unwrap();
    let p = reopened.read_pending().unwrap().expect("offline write pending");
    assert_eq!(rows_of(&p.batch, "t"), vec![(Op::Upsert, vec![int(7), text("offline"), real(7.0)])]);
}

#[test]
fn table_created_after_open_is_captured_after_the_schema_refresh() {
    let mut n = node(1, T);
    n.exec("CREATE TABLE later(id INTEGER PRIMARY KEY, v TEXT)");
    // The next read notices the schema change, installs triggers, then sees later writes.
    assert!(n.db.read_pending().unwrap().is_none());
    n.exec("INSERT INTO later VALUES (1, 'x')");
    assert_eq!(rows_of(&n.pending().batch, "later"), vec![(Op::Upsert, vec![int(1), text("x")])]);
}

#[test]
fn every_storage_class_is_captured_exactly() {
    let mut n = node(1, "CREATE TABLE v(id INTEGER PRIMARY KEY, x);");
    n.exec(
        "INSERT INTO v VALUES (1, NULL), (2, -9223372036854775808), (3, -0.0), (4, 1.7976931348623157e308),
         (5, 'ü 日本 \"q\"'), (6, x''), (7, x'00ff'), (8, '');",
    );
    let got: Vec<Value> = rows_of(&n.pending().batch, "v").into_iter().map(|(_, v)| v[1].clone()).collect();
    assert_eq!(
        got,
        vec![
            NULL,
            int(i64::MIN),
            real(-0.0),
            real(f64::MAX),
            text("ü 日本 \"q\""),
            Value::Blob(vec![]),
            Value::Blob(vec![0, 0xff]),
            text(""),
        ]
    );
}

#[test]
fn a_local_row_set_aside_before_it_was_published_is_sent_as_written() {
    let schema = "CREATE TABLE u(id INTEGER PRIMARY KEY, email TEXT UNIQUE);";
    let mut a = node(1, schema);
    let mut b = node(2, schema);
    let mut c = node(3, schema);
    a.exec("INSERT INTO u VALUES (1, 'x@y')");
    // b's later write takes the same email (a tie on the clock goes to node 2): applied on a
    // before a published its row, it sets a's row aside.
    b.exec("INSERT INTO u VALUES (2, 'x@y')");
    let from_b = b.acknowledge_all();
    a.apply(&from_b.batch);
    assert_eq!(a.dump("u"), vec![vec![int(2), text("x@y")]]);
    let from_a = a.pending();
    assert_eq!(rows_of(&from_a.batch, "u"), vec![(Op::Upsert, vec![int(1), text("x@y")])]);
    c.apply(&from_b.batch);
    c.apply(&from_a.batch);
    b.apply(&from_a.batch);
    assert_eq!(c.dump("u"), a.dump("u"));
    assert_eq!(b.dump("u"), a.dump("u"));
    assert_eq!(c.db.aside_count().unwrap(), 1, "row 1 waits aside on every node");
}

#[test]
fn a_row_a_newer_remote_write_overwrote_before_publishing_travels_as_a_loss() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'mine', 1.0)");
    b.exec("INSERT INTO t VALUES (1, 'theirs', 2.0)");
    let from_b = b.acknowledge_all();
    a.apply(&from_b.batch);
    assert_eq!(a.dump("t"), b.dump("t"), "b's later write wins on a");
    // a's write never left a, yet it is sent, with the image it had, so that every node
    // journals its loss; it changes no table.
    let from_a = a.db.read_pending().unwrap().expect("the lost write travels");
    assert_eq!(rows_of(&from_a.batch, "t"), vec![(Op::Upsert, vec![int(1), text("mine"), real(1.0)])]);
    b.apply(&from_a.batch);
    assert_eq!(a.dump("t"), b.dump("t"));
    let journal = |n: &Node| n.db.conflicts(&Default::default()).unwrap();
    assert_eq!(journal(&a).len(), 1);
    assert_eq!(journal(&a)[0].loser_image.as_deref(), Some(r#"{"id":1,"name":"mine","score":1.0}"#));
    assert_eq!(journal(&a), journal(&b), "both nodes journal a's write as lost");
}

/// Records the log's last version now, as the node's sampler does after a commit.
fn commit_point(n: &Node, points: &crate::sqlite::CommitPoints) {
    points.sample(&n.app).unwrap();
}

#[test]
fn a_backlog_is_cut_at_commit_points_into_whole_transactions() {
    let mut n = node(1, T);
    let points = crate::sqlite::CommitPoints::default();
    for tx in 0..4 {
        n.exec(&format!(
            "BEGIN; INSERT INTO t VALUES ({0}, 'a', 1.0); INSERT INTO t VALUES ({0} + 100, 'b', 2.0); COMMIT;",
            tx
        ));
        commit_point(&n, &points);
    }
    let mut batches = Vec::new();
    while let Some(p) = n.db.read_pending_after(Hlc(0), &points.after(Hlc(0)), 3).unwrap() {
        n.db.acknowledge(p.through).unwrap();
        batches.push(rows_of(&p.batch, "t").into_iter().map(|(_, v)| v[0].clone()).collect::<Vec<_>>());
    }
    // At most three rows are asked for: whole transactions of two, one at a time.
    let tx = |k: i64| vec![int(k), int(k + 100)];
    assert_eq!(batches, vec![tx(0), tx(1), tx(2), tx(3)]);
}

#[test]
fn a_row_written_again_after_a_commit_point_moves_the_cut_past_it() {
    let mut n = node(1, T);
    let points = crate::sqlite::CommitPoints::default();
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO t VALUES (2, 'a', 1.0);");
    commit_point(&n, &points);
    n.exec("INSERT INTO t VALUES (3, 'a', 1.0)");
    commit_point(&n, &points);
    // Row 1 again: a cut before this would send its new value with its old version.
    n.exec("BEGIN; UPDATE t SET name = 'z' WHERE id = 1; INSERT INTO t VALUES (4, 'z', 1.0); COMMIT;");
    commit_point(&n, &points);
    n.exec("INSERT INTO t VALUES (5, 'a', 1.0)");
    let p = n.db.read_pending_after(Hlc(0), &points.after(Hlc(0)), 1).unwrap().unwrap();
    let ids: Vec<Value> = rows_of(&p.batch, "t").into_iter().map(|(_, v)| v[0].clone()).collect();
    assert_eq!(ids, vec![int(2), int(3), int(1), int(4)], "everything through the transaction that wrote row 1 again");
    n.db.acknowledge(p.through).unwrap();
    let rest = n.db.read_pending_after(Hlc(0), &points.after(p.through), 1).unwrap().unwrap();
    assert_eq!(rows_of(&rest.batch, "t").len(), 1);
}
