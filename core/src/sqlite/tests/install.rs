//! Installing capture twice, and removing it.

use super::super::cleanup;
use super::*;

const SCHEMA: &str = "
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score REAL);
CREATE TABLE u(k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID;
CREATE TABLE audit(msg TEXT);
CREATE TRIGGER app_audit AFTER INSERT ON t BEGIN INSERT INTO audit VALUES ('ins ' || NEW.id); END;
";

fn marmot_objects(conn: &Connection) -> Vec<String> {
    let mut stmt = conn
        .prepare("SELECT type || ' ' || name FROM sqlite_master WHERE substr(name, 1, 10) = '__marmot__' ORDER BY 1")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

#[test]
fn reinstalling_capture_is_idempotent() {
    let mut n = node(1, SCHEMA);
    n.exec("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO u VALUES ('k', x'01');");
    n.apply(&batch(2, "t", &T_COLS, &[0], vec![upsert(100, vec![int(2), text("remote"), NULL])]));
    let triggers = n.marmot_triggers();
    let objects = marmot_objects(&n.app);
    let pending = n.pending();
    let versions = n.db.version_of("t", &[int(2)]).unwrap();

    let mut again = Db::open(&n.path, NodeId(1), CaptureOptions::default()).unwrap();
    again.reinstall().unwrap();
    assert_eq!(n.marmot_triggers(), triggers, "same triggers");
    assert_eq!(marmot_objects(&n.app), objects, "same shadow tables");
    assert_eq!(again.read_pending().unwrap(), Some(pending), "the log is intact");
    assert_eq!(again.version_of("t", &[int(2)]).unwrap(), versions, "versions are intact");
    assert_eq!(n.dump("t").len(), 2);
    assert_eq!(n.dump("audit"), vec![vec![text("ins 1")], vec![text("ins 2")]]);
    assert_eq!(again.schema(), n.db.schema());

    n.exec("INSERT INTO t VALUES (3, 'c', 3.0)");
    assert_eq!(again.read_pending().unwrap().unwrap().batch.len(), 3, "capture fires once per write");
}

#[test]
fn cleanup_removes_every_marmot_object_and_leaves_user_data() {
    let Node { db, app, path: _, _dir } = node(1, SCHEMA);
    app.execute_batch("INSERT INTO t VALUES (1, 'a', 1.0); INSERT INTO u VALUES ('k', x'01');").unwrap();
    let before_t = dump(&app, "t");
    assert!(!marmot_objects(&app).is_empty());
    cleanup(db.conn()).unwrap();
    assert_eq!(marmot_objects(&app), Vec::<String>::new());
    assert_eq!(dump(&app, "t"), before_t);
    assert_eq!(dump(&app, "u"), vec![vec![text("k"), Value::Blob(vec![1])]]);
    let app_trigger: i64 = app
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = 'app_audit'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(app_trigger, 1, "the application's own trigger stays");
    app.execute_batch("INSERT INTO t VALUES (2, 'b', 2.0)").unwrap();
    assert_eq!(dump(&app, "audit").len(), 2, "writes still work and the app trigger still fires");
}

#[test]
fn a_selection_leaves_tables_out_of_capture_and_the_merge_passes_their_rows_over() {
    let selection =
        crate::sqlite::TableSelection { include: vec!["a*".into(), "b?".into()], exclude: vec!["*_local".into()] };
    for (name, selected) in [("a", true), ("abc", true), ("a_local", false), ("b1", true), ("b12", false), ("c", false)]
    {
        assert_eq!(selection.selects(name), selected, "{name}");
    }
    let opts = CaptureOptions { selection, ..CaptureOptions::default() };
    let mut n =
        node_with(2, "CREATE TABLE abc (id INTEGER PRIMARY KEY, v); CREATE TABLE c (id INTEGER PRIMARY KEY, v);", opts);
    let names: Vec<&str> = n.db.schema().tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["abc"]);
    assert_eq!(n.db.schema().skipped[0].reason, crate::sqlite::EXCLUDED_REASON);
    n.exec("INSERT INTO c VALUES (1, 'local')");
    assert!(n.db.read_pending().unwrap().is_none(), "an excluded table's writes are not captured");
    let mut both = batch(1, "abc", &["id", "v"], &[0], vec![upsert(5, vec![int(1), text("x")])]);
    both.tables.push(changes("c", &["id", "v"], &[0], vec![upsert(5, vec![int(2), text("remote")])]));
    let out = n.apply(&both);
    assert_eq!((out.applied, out.excluded), (1, 1));
    assert_eq!(n.dump("c"), vec![vec![int(1), text("local")]], "the merge never writes an excluded table");
    assert_eq!(n.db.excluded_rows().unwrap(), 1);
    assert_eq!(n.db.parked_count().unwrap(), 0);
}
