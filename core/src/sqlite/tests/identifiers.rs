//! Which tables replicate, and awkward identifiers and keys.

use super::*;

const ODD_SCHEMA: &str = r#"
CREATE TABLE "order" ("select" INTEGER PRIMARY KEY, "a ""b""" TEXT, "ü" REAL, "group by" BLOB);
CREATE TABLE "a ""b"" table" ("key one" TEXT, "ü" INTEGER, "value's" TEXT, PRIMARY KEY ("key one", "ü")) WITHOUT ROWID;
CREATE TABLE "ü" ("from" TEXT PRIMARY KEY, "to" TEXT) WITHOUT ROWID;
"#;

#[test]
fn odd_identifiers_are_captured_and_merged() {
    let mut a = node(1, ODD_SCHEMA);
    let mut b = node(2, ODD_SCHEMA);
    let names: Vec<&str> = a.db.schema().tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, vec!["a \"b\" table", "order", "ü"]);
    a.exec(
        r#"INSERT INTO "order" VALUES (1, 'x "y"', 1.5, x'01'), (2, 'two', NULL, NULL);
           INSERT INTO "a ""b"" table" VALUES ('k 1', 7, 'it''s'), ('k 2', 8, NULL);
           INSERT INTO "ü" VALUES ('ä', 'ö');
           UPDATE "order" SET "a ""b""" = 'changed' WHERE "select" = 1;
           UPDATE "a ""b"" table" SET "ü" = 9 WHERE "key one" = 'k 2';
           DELETE FROM "order" WHERE "select" = 2;"#,
    );
    let p = a.pending();
    assert_eq!(
        rows_of(&p.batch, "a \"b\" table"),
        vec![
            (Op::Upsert, vec![text("k 1"), int(7), text("it's")]),
            (Op::Delete, vec![text("k 2"), int(8), NULL]),
            (Op::Upsert, vec![text("k 2"), int(9), NULL]),
        ],
        "changing one column of a composite key is a delete of the old key and a write"
    );
    let out = b.apply(&p.batch);
    assert_eq!(out.applied, p.batch.len() as u64);
    for t in ["order", "a \"b\" table", "ü"] {
        assert_eq!(b.dump(t), a.dump(t), "table {t:?} converged");
    }
    assert_eq!(b.dump("order"), vec![vec![int(1), text("changed"), real(1.5), Value::Blob(vec![1])]]);
    assert!(b.db.read_pending().unwrap().is_none(), "applied changes are not captured");
}

#[test]
fn composite_primary_key_rows_are_versioned_per_key() {
    let schema = "CREATE TABLE m(a INTEGER, b TEXT, v TEXT, PRIMARY KEY (b, a));";
    let mut n = node(1, schema);
    let info = n.db.schema().table("m").unwrap().clone();
    assert_eq!(info.pk, vec![1, 0], "primary key columns in key order, not column order");
    let rows =
        vec![upsert(100, vec![int(1), text("x"), text("first")]), upsert(100, vec![int(2), text("x"), text("second")])];
    assert_eq!(n.apply(&batch(2, "m", &["a", "b", "v"], &[1, 0], rows)).applied, 2);
    let older = vec![upsert(50, vec![int(1), text("x"), text("old")])];
    assert_eq!(n.apply(&batch(3, "m", &["a", "b", "v"], &[1, 0], older)).skipped, 1);
    assert_eq!(n.dump("m"), vec![vec![int(1), text("x"), text("first")], vec![int(2), text("x"), text("second")]]);
    assert!(n.db.version_of("m", &[text("x"), int(1)]).unwrap().is_some());
}

#[test]
fn remote_batch_with_columns_in_another_order_is_mapped_by_name() {
    let mut n = node(1, T);
    let b = batch(2, "t", &["score", "id", "name"], &[1], vec![upsert(100, vec![real(2.5), int(1), text("x")])]);
    n.apply(&b);
    assert_eq!(n.dump("t"), vec![vec![int(1), text("x"), real(2.5)]]);
}

const MIXED_SCHEMA: &str = "
CREATE VIRTUAL TABLE docs USING fts5(title, body);
CREATE VIRTUAL TABLE boxes USING rtree(id, minx, maxx, miny, maxy);
CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
CREATE TABLE loose(a TEXT, b INTEGER);
";

#[test]
fn virtual_tables_and_their_shadow_tables_are_left_alone() {
    let mut n = node(1, MIXED_SCHEMA);
    let schema = n.db.schema().clone();
    assert_eq!(schema.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["notes"]);
    let skipped = |name: &str| schema.skipped.iter().find(|s| s.name == name).map(|s| s.reason.clone());
    assert_eq!(skipped("docs").as_deref(), Some("virtual table"));
    assert_eq!(skipped("boxes").as_deref(), Some("virtual table"));
    for shadow in [
        "docs_data",
        "docs_idx",
        "docs_content",
        "docs_docsize",
        "docs_config",
        "boxes_node",
        "boxes_parent",
        "boxes_rowid",
    ] {
        assert_eq!(skipped(shadow).as_deref(), Some("shadow table of a virtual table"), "{shadow}");
    }
    let on: Vec<String> = n.marmot_triggers().into_iter().map(|(_, tbl, _)| tbl).collect();
    assert!(on.iter().all(|t| t == "notes"), "triggers only on replicated tables: {on:?}");
    assert_eq!(on.len(), 3);

    n.exec(
        "INSERT INTO docs(title, body) VALUES ('hello', 'full text');
         INSERT INTO boxes VALUES (1, 0, 1, 0, 1);
         INSERT INTO loose VALUES ('x', 1);
         INSERT INTO notes VALUES (1, 'replicated');",
    );
    let p = n.pending();
    assert_eq!(p.batch.tables.len(), 1);
    assert_eq!(rows_of(&p.batch, "notes"), vec![(Op::Upsert, vec![int(1), text("replicated")])]);
    let hits: i64 = n.app.query_row("SELECT count(*) FROM docs WHERE docs MATCH 'full'", [], |r| r.get(0)).unwrap();
    assert_eq!(hits, 1, "the FTS index still works with capture installed");

    let mut other = node(2, MIXED_SCHEMA);
    other.apply(&p.batch);
    assert_eq!(other.dump("notes"), n.dump("notes"));
    assert_eq!(other.count("docs"), 0);
}

#[test]
fn table_without_primary_key_is_skipped_with_its_reason() {
    let mut n = node(1, MIXED_SCHEMA);
    let s = n.db.schema().skipped.iter().find(|s| s.name == "loose").expect("loose is skipped").clone();
    assert!(s.reason.contains("PRIMARY KEY") && s.reason.contains("rowid"), "reason names the cause: {}", s.reason);
    n.exec("INSERT INTO loose VALUES ('x', 1)");
    assert!(n.db.read_pending().unwrap().is_none());
}

#[test]
fn user_table_named_like_a_virtual_table_prefix_is_replicated() {
    let mut n = node(
        1,
        "CREATE VIRTUAL TABLE docs USING fts5(body); CREATE TABLE docs_archive(id INTEGER PRIMARY KEY, body TEXT);",
    );
    assert!(n.db.schema().table("docs_archive").is_some(), "skipped: {:?}", n.db.schema().skipped);
    n.exec("INSERT INTO docs_archive VALUES (1, 'kept')");
    assert_eq!(rows_of(&n.pending().batch, "docs_archive").len(), 1);
}
