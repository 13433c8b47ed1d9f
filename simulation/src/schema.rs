//! The schema: what every node starts with, how the oracle sees each table, and the
//! migration nodes run mid-run. A new table is one entry in [`SCHEMA`] and one in
//! [`TABLES`]; the workload that writes it lives in [`crate::workload`].

/// The schema every node starts with: a table of every value type, a composite-key
/// `WITHOUT ROWID` table with awkward identifiers, a table with a secondary `UNIQUE`, and
/// the two tables a group transaction writes together (for the atomicity oracle).
pub const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, data BLOB, val);
CREATE TABLE "order" ("key" TEXT NOT NULL, "a ""b""" INTEGER NOT NULL, "ü", PRIMARY KEY ("key", "a ""b""")) WITHOUT ROWID;
CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE, name);
CREATE TABLE groups (gid INTEGER PRIMARY KEY, grp INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE TABLE group_tags (grp INTEGER PRIMARY KEY, size INTEGER NOT NULL, tag TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE __marmot__simtime (ms INTEGER NOT NULL);
INSERT INTO __marmot__simtime VALUES (1700000000000);
"#;

/// The migration nodes run at different times: a column added while writes go on. The
/// oracle's [`Table::width`] excludes it.
pub const MIGRATION: &str = "ALTER TABLE items ADD COLUMN extra TEXT DEFAULT 'd'";

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
}

/// Every user table of [`SCHEMA`].
pub const TABLES: &[Table] = &[
    Table { name: "group_tags", pk: &[0], unique: &[], width: 3 },
    Table { name: "groups", pk: &[0], unique: &[], width: 3 },
    Table { name: "items", pk: &[0], unique: &[], width: 6 },
    Table { name: "order", pk: &[0, 1], unique: &[], width: 3 },
    Table { name: "users", pk: &[0], unique: &[1], width: 3 },
];

/// The table called `name`.
pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}
