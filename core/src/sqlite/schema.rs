//! Schema introspection: which tables replicate, their columns, keys and unique indexes.

use rusqlite::Connection;

use crate::error::{Result, SqlContext};

/// Prefix of every object Marmot creates in a database.
pub const PREFIX: &str = "__marmot__";

/// Quotes an SQL identifier (table, column, trigger, index name).
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A secondary unique index: a set of columns whose non-NULL values no two rows share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniqueIndex {
    /// The index name.
    pub name: String,
    /// Indexes into [`TableInfo::columns`].
    pub columns: Vec<usize>,
}

/// A table Marmot replicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// The table's name (unquoted).
    pub name: String,
    /// Column names in declaration order.
    pub columns: Vec<String>,
    /// Indexes into `columns` of the primary key, in key order.
    pub pk: Vec<usize>,
    /// Secondary unique indexes (not the primary key), on plain columns.
    pub unique: Vec<UniqueIndex>,
    /// Per column, the SQL value it takes when a remote row does not carry it (the origin
    /// does not have that column yet): its `DEFAULT`, else `NULL`; `None` for a `NOT NULL`
    /// column without a default, which then keeps its value.
    pub absent: Vec<Option<String>>,
}

impl TableInfo {
    /// Position of `column` in `columns`.
    pub fn column_index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }
}

/// A table that is not replicated, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedTable {
    /// The table's name.
    pub name: String,
    /// Why it is skipped.
    pub reason: String,
}

/// What the database holds, from Marmot's point of view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    /// Replicated tables, sorted by name.
    pub tables: Vec<TableInfo>,
    /// User tables that are not replicated, with the reason.
    pub skipped: Vec<SkippedTable>,
}

impl Schema {
    /// Reads the schema of the `main` database.
    pub fn read(conn: &Connection) -> Result<Schema> {
        let mut stmt = conn
            .prepare(
                "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
            )
            .ctx(|| "listing tables".into())?;
        let all: Vec<(String, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .ctx(|| "listing tables".into())?;
        let virtual_names: Vec<(String, Option<&[&str]>)> = all
            .iter()
            .filter(|(_, sql)| is_virtual(sql.as_deref()))
            .map(|(n, sql)| (n.clone(), shadow_suffixes(sql.as_deref().unwrap_or_default())))
            .collect();
        let mut schema = Schema::default();
        for (name, sql) in all {
            if name.starts_with(PREFIX) {
                continue;
            }
            if is_virtual(sql.as_deref()) {
                schema.skipped.push(SkippedTable { name, reason: "virtual table".into() });
                continue;
            }
            if virtual_names.iter().any(|(v, suffixes)| is_shadow_of(&name, v, *suffixes)) {
                schema.skipped.push(SkippedTable { name, reason: "shadow table of a virtual table".into() });
                continue;
            }
            match read_table(conn, &name)? {
                Some(t) => schema.tables.push(t),
                None => schema
                    .skipped
                    .push(SkippedTable { name, reason: "no PRIMARY KEY (its rowids differ between nodes)".into() }),
            }
        }
        Ok(schema)
    }

    /// The replicated table called `name`.
    pub fn table(&self, name: &str) -> Option<&TableInfo> {
        self.tables.iter().find(|t| t.name == name)
    }
}

fn is_virtual(sql: Option<&str>) -> bool {
    sql.map(|s| s.trim_start().to_ascii_uppercase().starts_with("CREATE VIRTUAL TABLE")).unwrap_or(false)
}

/// Shadow-table suffixes of the virtual-table modules SQLite ships, by module name.
const SHADOW_SUFFIXES: &[(&str, &[&str])] = &[
    ("fts3", &["content", "segments", "segdir", "docsize", "stat"]),
    ("fts4", &["content", "segments", "segdir", "docsize", "stat"]),
    ("fts5", &["data", "idx", "content", "docsize", "config"]),
    ("rtree", &["node", "parent", "rowid"]),
    ("rtree_i32", &["node", "parent", "rowid"]),
    ("geopoly", &["node", "parent", "rowid"]),
];

/// The shadow suffixes of the module named in `CREATE VIRTUAL TABLE ... USING m(...)`, or
/// `None` for a module we do not know (any `<name>_*` table is then taken as a shadow).
fn shadow_suffixes(sql: &str) -> Option<&'static [&'static str]> {
    let mut words = sql.split_whitespace().skip_while(|w| !w.eq_ignore_ascii_case("USING"));
    let module: String = words
        .nth(1)?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<String>()
        .to_ascii_lowercase();
    SHADOW_SUFFIXES.iter().find(|(m, _)| *m == module).map(|(_, s)| *s)
}

/// Whether `name` is a shadow table of virtual table `vtab`. Known modules are matched by
/// their exact suffixes, so a user table `docs_archive` next to an FTS table `docs` still
/// replicates.
fn is_shadow_of(name: &str, vtab: &str, suffixes: Option<&[&str]>) -> bool {
    let Some(rest) = name.strip_prefix(vtab).and_then(|r| r.strip_prefix('_')) else { return false };
    match suffixes {
        Some(known) => known.contains(&rest),
        None => true,
    }
}

fn read_table(conn: &Connection, name: &str) -> Result<Option<TableInfo>> {
    let sql = format!("PRAGMA table_info({})", quote(name));
    let mut stmt = conn.prepare(&sql).ctx(|| format!("reading columns of {name:?}"))?;
    // (name, pk position, value when absent)
    let cols: Vec<(String, i64, Option<String>)> = stmt
        .query_map([], |r| {
            let (not_null, default): (bool, Option<String>) = (r.get(3)?, r.get(4)?);
            let absent = default.map(|d| format!("({d})")).or_else(|| (!not_null).then(|| "NULL".to_owned()));
            Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)?, absent))
        })
        .and_then(|rows| rows.collect())
        .ctx(|| format!("reading columns of {name:?}"))?;
    let mut pk: Vec<(i64, usize)> = cols.iter().enumerate().filter(|(_, c)| c.1 > 0).map(|(i, c)| (c.1, i)).collect();
    if pk.is_empty() {
        return Ok(None);
    }
    pk.sort();
    let absent: Vec<Option<String>> = cols.iter().map(|c| c.2.clone()).collect();
    let columns: Vec<String> = cols.into_iter().map(|c| c.0).collect();
    let unique = read_unique(conn, name, &columns)?;
    let pk = pk.into_iter().map(|(_, i)| i).collect();
    Ok(Some(TableInfo { name: name.to_owned(), columns, pk, unique, absent }))
}

fn read_unique(conn: &Connection, table: &str, columns: &[String]) -> Result<Vec<UniqueIndex>> {
    let sql = format!("PRAGMA index_list({})", quote(table));
    let mut stmt = conn.prepare(&sql).ctx(|| format!("reading indexes of {table:?}"))?;
    // (name, unique, origin, partial)
    let list: Vec<(String, bool, String, bool)> = stmt
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .and_then(|rows| rows.collect())
        .ctx(|| format!("reading indexes of {table:?}"))?;
    let mut out = Vec::new();
    for (name, unique, origin, partial) in list {
        if !unique || origin == "pk" || partial {
            continue;
        }
        let sql = format!("PRAGMA index_info({})", quote(&name));
        let mut stmt = conn.prepare(&sql).ctx(|| format!("reading index {name:?}"))?;
        let names: Vec<Option<String>> = stmt
            .query_map([], |r| r.get(2))
            .and_then(|rows| rows.collect())
            .ctx(|| format!("reading index {name:?}"))?;
        let idx: Option<Vec<usize>> =
            names.iter().map(|n| n.as_ref().and_then(|n| columns.iter().position(|c| c == n))).collect();
        if let Some(columns) = idx {
            out.push(UniqueIndex { name, columns });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
