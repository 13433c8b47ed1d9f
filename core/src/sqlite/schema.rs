//! Schema introspection: which tables replicate, their columns, keys and unique indexes.

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Result, SqlContext};
use crate::model::Value;

/// Prefix of every object Marmot creates in a database.
pub const PREFIX: &str = "__marmot__";

/// Quotes an SQL identifier (table, column, trigger, index name).
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A collating sequence SQLite ships: how an index or key compares text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collation {
    /// Byte for byte.
    Binary,
    /// ASCII letters without case (SQLite folds only `A`–`Z`).
    NoCase,
    /// Trailing spaces ignored.
    RTrim,
}

impl Collation {
    fn parse(name: &str) -> Option<Collation> {
        match name.to_ascii_uppercase().as_str() {
            "BINARY" => Some(Collation::Binary),
            "NOCASE" => Some(Collation::NoCase),
            "RTRIM" => Some(Collation::RTrim),
            _ => None,
        }
    }

    /// The SQL name of the collation.
    pub fn sql(self) -> &'static str {
        match self {
            Collation::Binary => "BINARY",
            Collation::NoCase => "NOCASE",
            Collation::RTrim => "RTRIM",
        }
    }

    /// `value` in the form every value SQLite takes as equal to it shares under this
    /// collation: integral reals as integers (`1.0 = 1`), text folded as the collation
    /// compares it. Row identity and unique values are compared in this form.
    pub fn canonical(self, value: &Value) -> Value {
        match value {
            Value::Real(f) if f.fract() == 0.0 && *f >= -9.223_372_036_854_776e18 && *f < 9.223_372_036_854_776e18 => {
                Value::Integer(*f as i64)
            }
            Value::Text(t) => match self {
                Collation::Binary => value.clone(),
                Collation::NoCase => Value::Text(t.to_ascii_lowercase()),
                Collation::RTrim => Value::Text(t.trim_end_matches(' ').to_owned()),
            },
            _ => value.clone(),
        }
    }
}

/// A secondary unique index: a set of columns whose non-NULL values no two rows share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniqueIndex {
    /// The index name.
    pub name: String,
    /// Indexes into [`TableInfo::columns`].
    pub columns: Vec<usize>,
    /// The collation of each indexed column, as the index compares it.
    pub collations: Vec<Collation>,
    /// The `WHERE` clause of a partial index: only rows for which it holds are indexed.
    pub predicate: Option<String>,
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
    /// The collation of each primary-key column, as the key's index compares it.
    pub pk_collations: Vec<Collation>,
    /// Whether the key is the rowid itself (`INTEGER PRIMARY KEY`): its values are always
    /// integers, so equal keys are equal bytes.
    pub key_is_rowid: bool,
    /// Whether the application has triggers on this table (whose writes the merge must keep
    /// out of replicated tables, see `guard.rs`).
    pub has_app_triggers: bool,
    /// Whether a primary-key column may hold NULL (a rowid table whose key is not the
    /// rowid): such rows are not replicated, as nodes cannot tell them apart.
    pub pk_nullable: bool,
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

    /// The canonical key of the row with primary-key values `pk`: two keys are equal
    /// exactly when SQLite takes them as the same row (the key's collations, `1 = 1.0`).
    pub fn key(&self, pk: &[Value]) -> Vec<u8> {
        let canonical: Vec<Value> = pk.iter().zip(&self.pk_collations).map(|(v, c)| c.canonical(v)).collect();
        pk_key(&canonical)
    }
}

/// Encodes primary-key values into the key bytes used by `versions` and `aside`. Callers
/// with a table at hand use [`TableInfo::key`], which canonicalizes first.
pub fn pk_key(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(&values, &mut out).expect("CBOR into a Vec");
    out
}

/// Which tables a node replicates (`[replication] include` / `exclude`): glob patterns
/// (`*` any run of characters, `?` one character) matched against the whole table name.
/// Empty `include` means every table; `exclude` wins over `include`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSelection {
    /// Patterns of tables to replicate (empty: all).
    pub include: Vec<String>,
    /// Patterns of tables not to replicate.
    pub exclude: Vec<String>,
}

/// Why a table the selection leaves out is not replicated.
pub const EXCLUDED_REASON: &str = "excluded by [replication] include/exclude";

impl TableSelection {
    /// Whether table `name` is replicated.
    pub fn selects(&self, name: &str) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| glob(p, name)))
            && !self.exclude.iter().any(|p| glob(p, name))
    }
}

/// Whether `text` matches the glob `pattern` as a whole (`*`, `?`; no escapes).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
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
                Ok(t) => schema.tables.push(t),
                Err(reason) => schema.skipped.push(SkippedTable { name, reason }),
            }
        }
        Ok(schema)
    }

    /// Moves the tables `selection` leaves out to `skipped`.
    pub fn select(&mut self, selection: &TableSelection) {
        let (kept, out): (Vec<TableInfo>, Vec<TableInfo>) =
            std::mem::take(&mut self.tables).into_iter().partition(|t| selection.selects(&t.name));
        self.tables = kept;
        self.skipped.extend(out.into_iter().map(|t| SkippedTable { name: t.name, reason: EXCLUDED_REASON.into() }));
        self.skipped.sort_by(|a, b| a.name.cmp(&b.name));
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

fn read_table(conn: &Connection, name: &str) -> Result<std::result::Result<TableInfo, String>> {
    let sql = format!("PRAGMA table_info({})", quote(name));
    let mut stmt = conn.prepare(&sql).ctx(|| format!("reading columns of {name:?}"))?;
    // (name, pk position, value when absent, not null)
    let cols: Vec<(String, i64, Option<String>, bool)> = stmt
        .query_map([], |r| {
            let (not_null, default): (bool, Option<String>) = (r.get(3)?, r.get(4)?);
            let absent = default.map(|d| format!("({d})")).or_else(|| (!not_null).then(|| "NULL".to_owned()));
            Ok((r.get::<_, String>(1)?, r.get::<_, i64>(5)?, absent, not_null))
        })
        .and_then(|rows| rows.collect())
        .ctx(|| format!("reading columns of {name:?}"))?;
    let mut pk: Vec<(i64, usize)> = cols.iter().enumerate().filter(|(_, c)| c.1 > 0).map(|(i, c)| (c.1, i)).collect();
    if pk.is_empty() {
        return Ok(Err("no PRIMARY KEY (its rowids differ between nodes)".into()));
    }
    pk.sort();
    let pk: Vec<usize> = pk.into_iter().map(|(_, i)| i).collect();
    let absent: Vec<Option<String>> = cols.iter().map(|c| c.2.clone()).collect();
    let not_null: Vec<bool> = cols.iter().map(|c| c.3).collect();
    let columns: Vec<String> = cols.into_iter().map(|c| c.0).collect();
    let indexes = read_indexes(conn, name)?;
    // Index pragmas number columns as the table declares them, generated ones included;
    // `table_info` leaves generated columns out. Map declared numbers to positions here.
    let sql = format!("PRAGMA table_xinfo({})", quote(name));
    let hidden: Vec<bool> = conn
        .prepare(&sql)
        .and_then(|mut s| s.query_map([], |r| Ok(r.get::<_, i64>(6)? != 0))?.collect())
        .ctx(|| format!("reading columns of {name:?}"))?;
    let position = |cid: i64| -> Option<usize> {
        let cid = usize::try_from(cid).ok().filter(|&c| c < hidden.len() && !hidden[c])?;
        Some(hidden[..cid].iter().filter(|h| !**h).count())
    };
    // No key index: the key is the rowid itself (`INTEGER PRIMARY KEY`), never NULL.
    let (mut pk_collations, mut keyed_rowid_table) = (vec![Collation::Binary; pk.len()], false);
    let mut key_is_rowid = true;
    let mut unique = Vec::new();
    for ix in indexes {
        let keys: Vec<&(i64, String)> = ix.columns.iter().filter(|c| c.1).map(|c| &c.0).collect();
        let mut collations = Vec::new();
        for (_, coll) in &keys {
            match Collation::parse(coll) {
                Some(c) => collations.push(c),
                None => {
                    return Ok(Err(format!("index {:?} uses collation {coll:?}, which Marmot cannot compare", ix.name)))
                }
            }
        }
        if ix.origin == "pk" {
            key_is_rowid = false;
            keyed_rowid_table = ix.columns.iter().any(|c| c.0 .0 == -1);
            for ((cid, _), coll) in keys.iter().zip(collations) {
                if let Some(n) = position(*cid).and_then(|c| pk.iter().position(|&p| p == c)) {
                    pk_collations[n] = coll;
                }
            }
            continue;
        }
        if !ix.unique {
            continue;
        }
        if keys.iter().any(|(cid, _)| *cid < 0) {
            return Ok(Err(format!("unique index {:?} is on an expression, which Marmot cannot compare", ix.name)));
        }
        let predicate = match (ix.partial, ix.sql.as_deref().and_then(partial_predicate)) {
            (false, _) => None,
            (true, Some(p)) => Some(p),
            (true, None) => return Ok(Err(format!("cannot read the WHERE clause of partial index {:?}", ix.name))),
        };
        let Some(columns) = keys.iter().map(|(cid, _)| position(*cid)).collect::<Option<Vec<usize>>>() else {
            return Ok(Err(format!(
                "unique index {:?} covers a generated column, which Marmot cannot compare",
                ix.name
            )));
        };
        unique.push(UniqueIndex { name: ix.name, columns, collations, predicate });
    }
    unique.sort_by(|a, b| a.name.cmp(&b.name));
    let pk_nullable = keyed_rowid_table && pk.iter().any(|&i| !not_null[i]);
    let has_app_triggers: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?1 \
             AND substr(name, 1, 10) != ?2)",
            (name, PREFIX),
            |r| r.get(0),
        )
        .ctx(|| format!("reading the triggers of {name:?}"))?;
    Ok(Ok(TableInfo {
        name: name.to_owned(),
        columns,
        pk,
        pk_collations,
        key_is_rowid,
        has_app_triggers,
        pk_nullable,
        unique,
        absent,
    }))
}

struct IndexInfo {
    name: String,
    unique: bool,
    origin: String,
    partial: bool,
    sql: Option<String>,
    /// ((column id, or -1 for the rowid, -2 for an expression; collation), is key column)
    columns: Vec<((i64, String), bool)>,
}

fn read_indexes(conn: &Connection, table: &str) -> Result<Vec<IndexInfo>> {
    let sql = format!("PRAGMA index_list({})", quote(table));
    let mut stmt = conn.prepare(&sql).ctx(|| format!("reading indexes of {table:?}"))?;
    let list: Vec<(String, bool, String, bool)> = stmt
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .and_then(|rows| rows.collect())
        .ctx(|| format!("reading indexes of {table:?}"))?;
    let mut out = Vec::new();
    for (name, unique, origin, partial) in list {
        let sql = format!("PRAGMA index_xinfo({})", quote(&name));
        let mut stmt = conn.prepare(&sql).ctx(|| format!("reading index {name:?}"))?;
        let columns = stmt
            .query_map([], |r| Ok(((r.get::<_, i64>(1)?, r.get::<_, String>(4)?), r.get::<_, bool>(5)?)))
            .and_then(|rows| rows.collect())
            .ctx(|| format!("reading index {name:?}"))?;
        let sql: Option<String> = conn
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1", [&name], |r| r.get(0))
            .optional()
            .ctx(|| format!("reading index {name:?}"))?
            .flatten();
        out.push(IndexInfo { name, unique, origin, partial, sql, columns });
    }
    Ok(out)
}

/// The `WHERE` clause of a `CREATE INDEX` statement: what follows the column list.
fn partial_predicate(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    let (mut i, mut depth, mut closed_at) = (0, 0i32, None);
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < bytes.len() && !(bytes[i] == q && bytes.get(i + 1) != Some(&q)) {
                    i += if bytes[i] == q { 2 } else { 1 };
                }
            }
            b'[' => {
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
            }
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    closed_at = Some(i);
                    break;
                }
            }
            _ => {}
        }
        i += 1;
    }
    let rest = sql[closed_at? + 1..].trim();
    let head = rest.get(..5)?;
    head.eq_ignore_ascii_case("WHERE").then(|| rest[5..].trim().to_owned()).filter(|p| !p.is_empty())
}
