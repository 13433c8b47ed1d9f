//! The merge: last-writer-wins per row, tombstones, idempotence, atomicity, positions.

use super::*;
use crate::error::Error;
use crate::model::Version;

fn row(hlc: u64, id: i64, name: &str) -> RowChange {
    upsert(hlc, vec![int(id), text(name), NULL])
}

fn t_batch(origin: u64, rows: Vec<RowChange>) -> Batch {
    batch(origin, "t", &T_COLS, &[0], rows)
}

#[test]
fn batch_read_on_one_node_applies_on_another() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("BEGIN; INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO t VALUES (2, 'b', 2.0); UPDATE t SET id = 3 WHERE id = 2; COMMIT;");
    let p = a.pending();
    let out = b.apply(&p.batch);
    assert_eq!((out.applied, out.skipped), (3, 0), "rows 1 and 3, and the tombstone of 2");
    assert_eq!(b.dump("t"), a.dump("t"));
    let (v, deleted) = b.db.version_of("t", &[int(2)]).unwrap().expect("tombstone for the old key");
    assert!(deleted);
    assert_eq!(v.node, NodeId(1));
}

#[test]
fn older_remote_change_is_skipped_and_newer_one_applied() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'local', NULL)");
    let local = n.pending().through;
    let out = n.apply(&t_batch(2, vec![row(local.0 - 1, 1, "older")]));
    assert_eq!((out.applied, out.skipped), (0, 1));
    assert_eq!(n.dump("t"), vec![vec![int(1), text("local"), NULL]]);
    let out = n.apply(&t_batch(2, vec![row(local.0 + 1, 1, "newer")]));
    assert_eq!((out.applied, out.skipped), (1, 0));
    assert_eq!(n.dump("t"), vec![vec![int(1), text("newer"), NULL]]);
    assert_eq!(
        n.db.version_of("t", &[int(1)]).unwrap(),
        Some((Version { hlc: Hlc(local.0 + 1), node: NodeId(2) }, false))
    );
}

#[test]
fn local_write_after_an_applied_change_wins_over_an_older_remote_one() {
    let mut n = node(1, T);
    n.apply(&t_batch(2, vec![row(100, 1, "remote")]));
    n.exec("UPDATE t SET name = 'local' WHERE id = 1");
    let out = n.apply(&t_batch(3, vec![row(200, 1, "stale")]));
    assert_eq!(out.skipped, 1, "the local write has a newer version than any applied so far");
    assert_eq!(n.dump("t"), vec![vec![int(1), text("local"), NULL]]);
}

#[test]
fn equal_hlc_is_decided_by_node_id() {
    let mut n = node(5, T);
    n.apply(&t_batch(3, vec![row(100, 1, "node3")]));
    assert_eq!(n.apply(&t_batch(7, vec![row(100, 1, "node7")])).applied, 1);
    assert_eq!(n.apply(&t_batch(4, vec![row(100, 1, "node4")])).skipped, 1);
    assert_eq!(n.dump("t"), vec![vec![int(1), text("node7"), NULL]]);
}

#[test]
fn tombstone_beats_an_older_upsert_arriving_later() {
    let mut n = node(1, T);
    n.apply(&t_batch(2, vec![row(100, 1, "first")]));
    let del = t_batch(2, vec![delete(300, vec![int(1), NULL, NULL])]);
    assert_eq!(n.apply(&del).applied, 1);
    assert_eq!(n.count("t"), 0);
    let (v, deleted) = n.db.version_of("t", &[int(1)]).unwrap().unwrap();
    assert_eq!((v.hlc, deleted), (Hlc(300), true));
    assert_eq!(n.apply(&t_batch(3, vec![row(200, 1, "late")])).skipped, 1);
    assert_eq!(n.count("t"), 0, "an older upsert does not resurrect a deleted row");
    assert_eq!(n.apply(&t_batch(3, vec![row(400, 1, "newer")])).applied, 1);
    assert_eq!(n.dump("t"), vec![vec![int(1), text("newer"), NULL]]);
}

#[test]
fn delete_of_an_unknown_row_leaves_a_tombstone_for_later_upserts() {
    let mut n = node(1, T);
    n.apply(&t_batch(2, vec![delete(300, vec![int(9), NULL, NULL])]));
    assert_eq!(n.apply(&t_batch(3, vec![row(200, 9, "before the delete")])).skipped, 1);
    assert_eq!(n.count("t"), 0);
}

#[test]
fn local_delete_beats_an_older_remote_upsert() {
    let mut n = node(1, T);
    n.apply(&t_batch(2, vec![row(100, 1, "remote")]));
    n.exec("DELETE FROM t WHERE id = 1");
    assert_eq!(n.apply(&t_batch(2, vec![row(200, 1, "stale")])).skipped, 1);
    assert_eq!(n.count("t"), 0);
}

#[test]
fn redelivered_batch_applies_nothing_twice() {
    let mut a = node(1, T);
    let mut b = node(2, T);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO t VALUES (2, 'b', 2.0); DELETE FROM t WHERE id = 1;");
    let p = a.pending();
    {
        let out = b.apply(&p.batch);
        assert_eq!((out.applied, out.skipped), (2, 0), "row 2, and the tombstone of 1");
    };
    let once = b.dump("t");
    {
        let out = b.apply(&p.batch);
        assert_eq!((out.applied, out.skipped), (0, 2));
    };
    assert_eq!(b.dump("t"), once);
}

#[test]
fn own_batch_coming_back_is_skipped_and_only_moves_the_position() {
    let mut a = node(1, T);
    a.exec("INSERT INTO t VALUES (1, 'a', 1.0)");
    let p = a.pending();
    a.exec("UPDATE t SET name = 'newer' WHERE id = 1");
    let out = a.db.apply_batch(Shard(2), Position(5), &p.batch, None).unwrap();
    assert_eq!(out, ApplyOutcome::default());
    assert_eq!(a.dump("t"), vec![vec![int(1), text("newer"), real(1.0)]]);
    assert_eq!(a.db.position(Shard(2)).unwrap(), Position(5));
}

#[test]
fn applied_changes_are_not_captured_again() {
    let mut n = node(1, T);
    n.apply(&t_batch(2, vec![row(100, 1, "a"), row(101, 2, "b"), delete(102, vec![int(1), NULL, NULL])]));
    assert!(n.db.read_pending().unwrap().is_none());
    assert_eq!(n.db.pending_count().unwrap(), 0);
}

#[test]
fn application_triggers_fire_on_applied_rows() {
    let schema = format!(
        "{T} CREATE TABLE audit(msg TEXT);
         CREATE TRIGGER app_ins AFTER INSERT ON t BEGIN INSERT INTO audit VALUES ('ins ' || NEW.id); END;
         CREATE TRIGGER app_upd AFTER UPDATE ON t BEGIN INSERT INTO audit VALUES ('upd ' || NEW.name); END;
         CREATE TRIGGER app_del AFTER DELETE ON t BEGIN INSERT INTO audit VALUES ('del ' || OLD.id); END;"
    );
    let mut n = node(1, &schema);
    n.apply(&t_batch(2, vec![row(100, 1, "a")]));
    n.apply(&t_batch(2, vec![row(101, 1, "b")]));
    n.apply(&t_batch(2, vec![delete(102, vec![int(1), NULL, NULL])]));
    assert_eq!(n.dump("audit"), vec![vec![text("del 1")], vec![text("ins 1")], vec![text("upd b")]]);
    assert!(n.db.read_pending().unwrap().is_none(), "neither the rows nor the app trigger's writes are captured");
}

#[test]
fn position_is_stored_in_the_same_transaction_as_the_batch() {
    let mut n = node(1, T);
    n.db.apply_batch(Shard(3), Position(7), &t_batch(2, vec![row(100, 1, "a")]), None).unwrap();
    assert_eq!(n.db.position(Shard(3)).unwrap(), Position(7));
    let next = t_batch(2, vec![row(200, 2, "b"), row(201, 3, "c")]);
    let err = n.db.apply_batch(Shard(3), Position(8), &next, Some(1)).unwrap_err();
    assert!(matches!(err, Error::InjectedCrash(_)), "{err}");
    assert_eq!(n.db.position(Shard(3)).unwrap(), Position(7), "a failed batch does not move the position");
    assert_eq!(n.dump("t"), vec![vec![int(1), text("a"), NULL]], "nor applies any of its rows");
    assert_eq!(n.db.version_of("t", &[int(2)]).unwrap(), None);
    n.db.apply_batch(Shard(3), Position(8), &next, None).unwrap();
    assert_eq!(n.db.position(Shard(3)).unwrap(), Position(8));
    assert_eq!(n.count("t"), 3);
    // Positions never move back.
    n.db.apply_batch(Shard(3), Position(4), &next, None).unwrap();
    assert_eq!(n.db.positions().unwrap().get(&Shard(3)), Some(&Position(8)));
}

#[test]
fn batch_naming_a_missing_table_is_a_schema_mismatch_and_applies_nothing() {
    let mut n = node(1, T);
    let clock = n.db.clock().unwrap();
    let mut b = t_batch(2, vec![row(clock.0 + 100, 1, "a")]);
    b.tables.push(changes("missing", &["id"], &[0], vec![upsert(clock.0 + 101, vec![int(1)])]));
    let err = n.db.apply_batch(Shard(0), Position(1), &b, None).unwrap_err();
    assert!(matches!(&err, Error::SchemaMismatch { table, .. } if table == "missing"), "{err}");
    assert_eq!(n.count("t"), 0, "the first table's rows are rolled back too");
    assert_eq!(n.db.version_of("t", &[int(1)]).unwrap(), None);
    assert_eq!(n.db.position(Shard(0)).unwrap(), Position(0));
    assert_eq!(n.db.clock().unwrap(), clock, "the clock is not raised by a refused batch");
}

#[test]
fn batch_naming_a_missing_column_is_a_schema_mismatch_and_applies_nothing() {
    let mut n = node(1, T);
    let b = batch(2, "t", &["id", "name", "colour"], &[0], vec![upsert(100, vec![int(1), text("a"), text("red")])]);
    let err = n.db.apply_batch(Shard(0), Position(1), &b, None).unwrap_err();
    assert!(
        matches!(&err, Error::SchemaMismatch { table, detail } if table == "t" && detail.contains("colour")),
        "{err}"
    );
    assert_eq!(n.count("t"), 0);
    assert_eq!(n.db.position(Shard(0)).unwrap(), Position(0));
}

#[test]
fn applying_raises_the_clock_above_the_applied_change() {
    let mut n = node(1, T);
    let future = Hlc::from_millis(now_ms() + 3_600_000).0 + 17;
    n.apply(&t_batch(2, vec![row(future, 1, "from the future")]));
    assert!(n.db.clock().unwrap() >= Hlc(future));
    n.exec("UPDATE t SET name = 'local' WHERE id = 1; INSERT INTO t VALUES (2, 'x', NULL);");
    let v = hlcs(&n.pending().batch);
    assert!(v.iter().all(|&h| h > Hlc(future)), "local writes after the apply get higher versions: {v:?}");
    // And the local write wins on the other node too.
    let mut other = node(3, T);
    other.apply(&t_batch(2, vec![row(future, 1, "from the future")]));
    other.apply(&n.pending().batch);
    assert_eq!(other.dump("t"), n.dump("t"));
}

#[test]
fn columns_a_remote_row_does_not_carry_take_their_default() {
    // The origin does not have `score` (yet): when it adds the column, its row gets the
    // default, so the winning image sets the default here too and the nodes agree.
    let mut n =
        node(1, "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score REAL, kept TEXT NOT NULL DEFAULT 'k');");
    n.exec("INSERT INTO t VALUES (1, 'a', 1.5, 'mine')");
    let b = batch(
        2,
        "t",
        &["id", "name"],
        &[0],
        vec![upsert(Hlc::from_millis(now_ms() + 60_000).0, vec![int(1), text("b")])],
    );
    n.apply(&b);
    assert_eq!(n.dump("t"), vec![vec![int(1), text("b"), NULL, text("k")]], "no default: NULL; a default: the default");
}

#[test]
fn tombstones_below_the_horizon_are_collected_in_steps_and_live_rows_are_kept() {
    let mut n = node(1, T);
    let ms = |m: u64| Hlc::from_millis(m).0;
    let rows: Vec<RowChange> = (0..1500).map(|i| row(ms(1000 + i as u64), i, "x")).collect();
    n.apply(&t_batch(2, rows));
    // 1,200 deletes at 3000 ms and later; 300 rows stay.
    let dels: Vec<RowChange> = (0..1200).map(|i| delete(ms(3000 + i as u64), vec![int(i), NULL, NULL])).collect();
    n.apply(&t_batch(2, dels));
    assert_eq!(n.db.tombstones_held().unwrap(), 1200);
    // Horizon 3100 ms: only the 100 tombstones versioned before it go.
    assert_eq!(n.db.collect_tombstones_step(Hlc::from_millis(3100)).unwrap(), (100, false));
    assert_eq!(n.db.tombstones_held().unwrap(), 1100);
    assert!(n.db.version_of("t", &[int(99)]).unwrap().is_none(), "collected");
    assert!(n.db.version_of("t", &[int(100)]).unwrap().unwrap().1, "younger than the horizon: kept");
    // A horizon past every delete: a step of 1,000, then the rest.
    assert_eq!(n.db.collect_tombstones_step(Hlc::from_millis(9000)).unwrap(), (1000, true));
    assert_eq!(n.db.collect_tombstones_step(Hlc::from_millis(9000)).unwrap(), (100, false));
    assert_eq!(n.db.tombstones_held().unwrap(), 0);
    assert_eq!(n.db.tombstones_collected().unwrap(), (1200, Hlc::from_millis(9000)));
    // Live rows keep their versions: an older write still loses against them.
    assert_eq!(n.count("t"), 300);
    assert_eq!(n.apply(&t_batch(3, vec![row(ms(10), 1400, "old")])).skipped, 1);
}

#[test]
fn changes_set_aside_are_not_published_and_kept_ones_are_logged_again_with_new_versions() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'published', NULL)");
    n.acknowledge_all();
    n.exec(
        "INSERT INTO t VALUES (2, 'old', NULL); UPDATE t SET name = 'old too' WHERE id = 1; DELETE FROM t WHERE id = 1",
    );
    let old = n.pending();
    assert_eq!(n.db.set_aside_pending().unwrap(), 3);
    assert!(n.db.restore_required().unwrap());
    assert!(n.db.read_pending().unwrap().is_none(), "set aside: nothing to publish");
    // Saving a snapshot now would spread rows no other node has.
    let out = n.path.with_extension("snap");
    assert!(matches!(n.db.save_snapshot(n.path.parent().unwrap(), &out), Err(Error::RestoreRequired)));
    // Written after the set-aside: published as usual.
    n.exec("INSERT INTO t VALUES (3, 'new', NULL)");
    let p = n.acknowledge_all();
    assert_eq!(p.batch.len(), 1);
    // The operator keeps this node's data: the rows whose versions were set aside (2 and
    // the tombstone of 1) are logged again, versioned after everything before.
    assert_eq!(n.db.keep_set_aside().unwrap(), Some(2));
    assert!(!n.db.restore_required().unwrap());
    assert_eq!(n.db.keep_set_aside().unwrap(), None, "nothing left to keep");
    let again = n.pending();
    assert!(again.batch.min_hlc().unwrap() > p.through, "new versions");
    assert!(again.batch.min_hlc().unwrap() > old.through);
    let rows: Vec<_> = again.batch.tables[0].rows.iter().map(|r| (r.values[0].clone(), r.op)).collect();
    assert_eq!(rows, vec![(int(2), Op::Upsert), (int(1), Op::Delete)]);
}

#[test]
fn this_nodes_deletes_keep_their_tombstones_until_published_or_kept() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', NULL), (2, 'b', NULL), (3, 'c', NULL)");
    n.exec("DELETE FROM t WHERE id = 3");
    n.acknowledge_all();
    n.exec("DELETE FROM t WHERE id = 1");
    n.db.fold_in_slices().unwrap();
    let far = Hlc::from_millis(n.db.clock().unwrap().millis() + 86_400_000);
    // Published and cleaned from the log: collected. Not yet published: kept.
    assert_eq!(n.db.collect_tombstones_step(far).unwrap(), (0, false), "published, still in the log");
    n.db.clean_published().unwrap();
    assert_eq!(n.db.collect_tombstones_step(far).unwrap(), (1, false));
    assert_eq!(n.db.tombstones_held().unwrap(), 1);
    // Set aside: kept, so the operator can still keep the delete.
    n.db.set_aside_pending().unwrap();
    n.exec("DELETE FROM t WHERE id = 2");
    n.acknowledge_all();
    n.db.fold_in_slices().unwrap();
    n.db.clean_published().unwrap();
    assert_eq!(n.db.collect_tombstones_step(far).unwrap(), (0, false));
    assert_eq!(n.db.keep_set_aside().unwrap(), Some(1));
    let rows: Vec<_> = n.pending().batch.tables[0].rows.iter().map(|r| (r.values[0].clone(), r.op)).collect();
    assert_eq!(rows, vec![(int(1), Op::Delete)]);
}

#[test]
fn a_snapshot_holding_unpublished_changes_says_through_which() {
    let mut n = node(1, T);
    n.exec("INSERT INTO t VALUES (1, 'a', NULL)");
    let p = n.pending();
    let dir = n.path.parent().unwrap().to_owned();
    let saved = n.db.save_snapshot(&dir, &dir.join("s.zst")).unwrap();
    assert_eq!(saved.unpublished, Some(p.through));
    assert!(matches!(saved.check_published(&n.db), Err(Error::SnapshotUnpublished(h)) if h == p.through));
    n.db.acknowledge(p.through).unwrap();
    saved.check_published(&n.db).unwrap();
    let again = n.db.save_snapshot(&dir, &dir.join("t.zst")).unwrap();
    assert_eq!(again.unpublished, None);
}
