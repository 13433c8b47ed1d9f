//! The schema: what every node starts with, how the oracle sees each table, and the
//! migration nodes run mid-run. A new table is one entry in [`SCHEMA`] and one in
//! [`TABLES`]; the workload that writes it lives in [`crate::workload`].

/// The schema every node starts with, as applications write schemas: a table of every value
/// type (with an FTS5 external-content index kept by triggers), a composite-key
/// `WITHOUT ROWID` table with awkward identifiers whose inserts fire an application trigger
/// (an audit row, a stock counter, a row in a local table), a table with a secondary
/// `UNIQUE` and an `updated_at`-style stamp trigger that reads node-local state, a
/// `NOCASE` key, an untyped key (`1` and `1.0` are one row), a `NOCASE` unique index on a
/// `BINARY` column, a key that accepts NULL, and the two tables a group transaction writes
/// together (for the atomicity oracle). `local_seen` has no key and is not replicated.
pub const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, data BLOB, val);
CREATE TABLE "order" ("key" TEXT NOT NULL, "a ""b""" INTEGER NOT NULL, "ü", PRIMARY KEY ("key", "a ""b""")) WITHOUT ROWID;
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE, name);
CREATE TABLE groups (gid INTEGER PRIMARY KEY, grp INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE TABLE group_tags (grp INTEGER PRIMARY KEY, size INTEGER NOT NULL, tag TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE names (k TEXT COLLATE NOCASE PRIMARY KEY, v);
CREATE TABLE nums (k PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE handles (id INTEGER PRIMARY KEY, handle TEXT);
CREATE UNIQUE INDEX handles_handle ON handles (handle COLLATE NOCASE);
CREATE TABLE nk (k TEXT PRIMARY KEY, v);
CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT);
CREATE TABLE stock (item TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE local_seen (x);
CREATE VIRTUAL TABLE items_fts USING fts5 (name, content = 'items', content_rowid = 'id');
CREATE TRIGGER items_fts_ai AFTER INSERT ON items BEGIN
  INSERT INTO items_fts (rowid, name) VALUES (NEW.id, NEW.name);
END;
CREATE TRIGGER items_fts_ad AFTER DELETE ON items BEGIN
  INSERT INTO items_fts (items_fts, rowid, name) VALUES ('delete', OLD.id, OLD.name);
END;
CREATE TRIGGER items_fts_au AFTER UPDATE ON items BEGIN
  INSERT INTO items_fts (items_fts, rowid, name) VALUES ('delete', OLD.id, OLD.name);
  INSERT INTO items_fts (rowid, name) VALUES (NEW.id, NEW.name);
END;
CREATE TRIGGER order_effects AFTER INSERT ON "order" BEGIN
  INSERT INTO audit (what) VALUES ('order ' || NEW."key" || ' ' || NEW."a ""b""");
  INSERT INTO stock (item, n) VALUES (NEW."key", 1) ON CONFLICT (item) DO UPDATE SET n = n + 1;
  INSERT INTO local_seen VALUES (NEW."key");
END;
CREATE TRIGGER users_stamp AFTER UPDATE OF email ON users BEGIN
  UPDATE users SET name = 'stamped ' || (SELECT count(*) FROM local_seen) WHERE id = NEW.id;
END;
CREATE TABLE __marmot__simtime (ms INTEGER NOT NULL);
INSERT INTO __marmot__simtime VALUES (1700000000000);
"#;

/// The application's migrations, in order, each run in one transaction on one node while
/// writes go on everywhere; the schema log carries them to the other nodes. A node runs
/// the next migration its own schema lacks (see [`schema_step`]), so two nodes may run the
/// same one concurrently. What they cover: a column added with a default and a table
/// created; an index and a table created; a column added and another renamed; a column
/// and a table dropped; a table rebuilt the way migration tools change a column's
/// definition (create, copy, drop, rename); a table dropped and created again in one
/// transaction (its old rows gone everywhere, its new ones sent). The oracle's [`Table::width`] excludes the
/// columns migrations add; `late` is written only by nodes that have it.
pub const MIGRATIONS: &[&str] = &[
    "ALTER TABLE items ADD COLUMN extra TEXT DEFAULT 'd'; CREATE TABLE late (id INTEGER PRIMARY KEY, v TEXT);",
    "CREATE INDEX items_qty ON items (qty); CREATE TABLE scratch (id INTEGER PRIMARY KEY, note TEXT);",
    "ALTER TABLE nk ADD COLUMN extra2 BLOB; ALTER TABLE names RENAME COLUMN v TO value;",
    "ALTER TABLE nk DROP COLUMN extra2; DROP TABLE scratch;",
    "CREATE TABLE late_new (id INTEGER PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0); \
     INSERT INTO late_new (id, v) SELECT id, v FROM late; DROP TABLE late; ALTER TABLE late_new RENAME TO late;",
    "DROP TABLE nums; CREATE TABLE nums (k PRIMARY KEY, v) WITHOUT ROWID; CREATE INDEX nums_v ON nums (v); \
     INSERT INTO nums VALUES ('fresh', 1);",
];

/// A schema as the oracle compares it: every object in `sqlite_master` except Marmot's
/// and the simulated clock, as (type, name, SQL).
pub type SchemaObjects = std::collections::BTreeSet<(String, String, Option<String>)>;

/// The schema objects of `conn`.
pub fn objects(conn: &rusqlite::Connection) -> rusqlite::Result<SchemaObjects> {
    let mut stmt = conn.prepare(
        "SELECT type, name, sql FROM sqlite_master \
         WHERE substr(name, 1, 10) != '__marmot__' AND substr(tbl_name, 1, 10) != '__marmot__'",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect();
    rows
}

/// The schema after the first `k` migrations, built on a scratch database.
pub fn expected_objects(k: usize) -> SchemaObjects {
    static EXPECTED: std::sync::OnceLock<Vec<SchemaObjects>> = std::sync::OnceLock::new();
    let all = EXPECTED.get_or_init(|| {
        let conn = rusqlite::Connection::open_in_memory().expect("scratch database");
        conn.execute_batch(SCHEMA).expect("the schema runs");
        let mut out = vec![objects(&conn).expect("schema objects")];
        for m in MIGRATIONS {
            conn.execute_batch(m).expect("the migrations run in order");
            out.push(objects(&conn).expect("schema objects"));
        }
        out
    });
    all[k].clone()
}

/// How many migrations the schema of `conn` reflects; `None` when it is none of the
/// expected schemas (a schema change half propagated, or concurrent ones resolved).
pub fn schema_step(conn: &rusqlite::Connection) -> rusqlite::Result<Option<usize>> {
    let now = objects(conn)?;
    Ok((0..=MIGRATIONS.len()).rev().find(|&k| expected_objects(k) == now))
}

/// How a table compares the text of its key and unique columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    /// Byte for byte.
    Binary,
    /// ASCII case folded (SQLite's `NOCASE`).
    NoCase,
}

/// The expression the capture triggers read the time from (set by the world each tick).
pub const TIME_SQL: &str = "(SELECT ms FROM __marmot__simtime)";

/// One user table as the oracle sees it.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    /// Name, unquoted.
    pub name: &'static str,
    /// Primary-key columns (indexes in table order).
    pub pk: &'static [usize],
    /// Columns with a single-column `UNIQUE` constraint.
    pub unique: &'static [usize],
    /// Columns every node has from the start: the model's columns (migrations add more).
    pub width: usize,
    /// How the key and the unique columns compare text.
    pub fold: Fold,
    /// Whether the table exists only after the first of [`MIGRATIONS`].
    pub late: bool,
}

/// Every user table of [`SCHEMA`].
pub const TABLES: &[Table] = &[
    Table { name: "audit", pk: &[0], unique: &[], width: 2, fold: Fold::Binary, late: false },
    Table { name: "group_tags", pk: &[0], unique: &[], width: 3, fold: Fold::Binary, late: false },
    Table { name: "groups", pk: &[0], unique: &[], width: 3, fold: Fold::Binary, late: false },
    Table { name: "handles", pk: &[0], unique: &[1], width: 2, fold: Fold::NoCase, late: false },
    Table { name: "items", pk: &[0], unique: &[], width: 6, fold: Fold::Binary, late: false },
    Table { name: "late", pk: &[0], unique: &[], width: 2, fold: Fold::Binary, late: true },
    Table { name: "names", pk: &[0], unique: &[], width: 2, fold: Fold::NoCase, late: false },
    Table { name: "nk", pk: &[0], unique: &[], width: 2, fold: Fold::Binary, late: false },
    Table { name: "nums", pk: &[0], unique: &[], width: 2, fold: Fold::Binary, late: false },
    Table { name: "order", pk: &[0, 1], unique: &[], width: 3, fold: Fold::Binary, late: false },
    Table { name: "stock", pk: &[0], unique: &[], width: 2, fold: Fold::Binary, late: false },
    Table { name: "users", pk: &[0], unique: &[1], width: 3, fold: Fold::Binary, late: false },
];

/// The table called `name`.
pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}
