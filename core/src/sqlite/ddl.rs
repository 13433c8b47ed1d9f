//! Schema changes: noticed, queued, published on the schema log and applied in its order.
//!
//! SQLite has no triggers on DDL, and an application changes its schema with any client,
//! at any time, Marmot running or not. So Marmot compares: `__marmot__schema` records the
//! application's schema objects (tables, indexes, views, triggers, with their SQL as
//! `sqlite_master` holds it) as Marmot last saw them, and whenever the schema version moves,
//! [`notice`] compares `sqlite_master` with that record. What differs is queued in
//! `__marmot__ddl_out`, in the same transaction that updates the record, and published
//! from there on the schema log (shard 0), in order. Every node applies every entry of the
//! schema log in the log's order ([`apply`]), so concurrent changes of one object end the
//! same everywhere: the one later in the log wins.
//!
//! An entry says, per object, what it was and what it is now (its SQL). Applying brings
//! each named object to its new SQL: a missing table is created, an existing one is
//! changed with the `ALTER TABLE` statements that give exactly the new SQL (added, dropped
//! and renamed columns, checked on a scratch copy first), else rebuilt (created anew, rows
//! copied by column name, indexes and triggers put back). Objects the entry does not name
//! are left alone, so concurrent changes of different objects all survive.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};

use super::capture::{add_dropped, record as record_json, recorded, recorded_all};
use super::schema::{quote, PREFIX};
use crate::error::{Error, Result, SqlContext};
use crate::model::{Hlc, NodeId, ObjectChange, ObjectKind, SchemaChanges, Version};

/// One of the application's schema objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Object {
    pub(crate) kind: ObjectKind,
    pub(crate) table: String,
    pub(crate) sql: String,
}

/// The application's schema objects by name: everything in `sqlite_master` with SQL
/// except Marmot's and SQLite's own objects and the shadow tables of virtual tables
/// (`shadow`), which their virtual table creates.
pub(crate) fn current_objects(conn: &Connection, shadow: &[String]) -> Result<BTreeMap<String, Object>> {
    let mut stmt = conn
        .prepare(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL \
             AND substr(name, 1, 10) != ?1 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
        )
        .ctx(|| "reading the schema".into())?;
    let rows: Vec<(String, String, String, String)> = stmt
        .query_map([PREFIX], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .and_then(|rows| rows.collect())
        .ctx(|| "reading the schema".into())?;
    Ok(rows
        .into_iter()
        .filter(|(_, name, _, _)| !shadow.contains(name))
        .filter_map(|(kind, name, table, sql)| Some((name, Object { kind: ObjectKind::parse(&kind)?, table, sql })))
        .collect())
}

fn recorded_objects(conn: &Connection) -> Result<BTreeMap<String, Object>> {
    let mut stmt = conn
        .prepare("SELECT type, name, tbl_name, sql FROM __marmot__schema WHERE sql IS NOT NULL")
        .ctx(|| "reading __marmot__schema".into())?;
    let rows: Vec<(String, String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .and_then(|rows| rows.collect())
        .ctx(|| "reading __marmot__schema".into())?;
    Ok(rows
        .into_iter()
        .filter_map(|(kind, name, table, sql)| Some((name, Object { kind: ObjectKind::parse(&kind)?, table, sql })))
        .collect())
}

/// The version of the change that last set each object (dropped ones included): a
/// change from the schema log applies to an object only when it is newer.
fn recorded_versions(conn: &Connection) -> Result<BTreeMap<String, Version>> {
    let mut stmt =
        conn.prepare("SELECT name, hlc, node FROM __marmot__schema").ctx(|| "reading __marmot__schema".into())?;
    let rows: Vec<(String, i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .and_then(|rows| rows.collect())
        .ctx(|| "reading __marmot__schema".into())?;
    Ok(rows
        .into_iter()
        .map(|(name, hlc, node)| (name, Version { hlc: Hlc(hlc as u64), node: NodeId(node as u64) }))
        .collect())
}

/// Records `name` as changed by `version`: its definition now (`None`: dropped).
fn record(
    conn: &Connection,
    name: &str,
    kind: ObjectKind,
    table: &str,
    sql: Option<&str>,
    version: Version,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO __marmot__schema(name, type, tbl_name, sql, hlc, node) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| s.execute((name, kind.as_str(), table, sql, version.hlc.0 as i64, version.node.0 as i64)))
    .map(|_| ())
    .ctx(|| "recording the schema".into())
}

/// Raises the clock to `hlc`: later local versions (rows and schema changes) follow it.
fn raise_clock(conn: &Connection, hlc: Hlc) -> Result<()> {
    conn.execute("UPDATE __marmot__clock SET hlc = max(hlc, ?1) WHERE id = 0", [hlc.0 as i64])
        .map(|_| ())
        .ctx(|| "raising the clock".into())
}

/// The fingerprint of a schema: equal on two nodes exactly when they hold the same
/// objects with the same SQL.
pub(crate) fn fingerprint(objects: &BTreeMap<String, Object>) -> u64 {
    let mut bytes = Vec::new();
    for (name, o) in objects {
        for part in [o.kind.as_str(), name.as_str(), o.sql.as_str()] {
            bytes.extend_from_slice(part.as_bytes());
            bytes.push(0);
        }
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Compares the schema with the recorded one and records what changed as changed by
/// `version`. When `queue` (a change made here), it is queued for publishing as one entry,
/// versioned after `version.hlc` and every earlier entry, and the clock is raised to it.
/// The first call on a database records its schema as the starting point (version 0,
/// nothing queued: every node starts from the schema it has). Returns the changes noticed.
pub(crate) fn notice(
    conn: &Connection,
    shadow: &[String],
    queue: bool,
    version: Version,
    offline: bool,
    ids: &Identities,
) -> Result<Vec<ObjectChange>> {
    let now = current_objects(conn, shadow)?;
    let recorded: bool = conn
        .query_row("SELECT count(*) FROM __marmot__state WHERE key = 'schema_recorded'", [], |r| r.get::<_, i64>(0))
        .map(|n| n > 0)
        .ctx(|| "reading the schema record".into())?;
    if !recorded {
        for (name, o) in &now {
            record(conn, name, o.kind, &o.table, Some(&o.sql), Version::default())?;
        }
        conn.execute("INSERT OR REPLACE INTO __marmot__state(key, value) VALUES ('schema_recorded', 1)", [])
            .ctx(|| "recording the schema".into())?;
        return Ok(Vec::new());
    }
    let before = recorded_objects(conn)?;
    if before == now {
        return Ok(Vec::new());
    }
    let changes = diff(&before, &now, ids)?;
    let version = if queue {
        // After this node's own last change; for a change made while no Marmot watched,
        // right after what this node last knew of these objects, not "now".
        let last: i64 = conn
            .query_row("SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'ddl_hlc'), 0)", [], |r| {
                r.get(0)
            })
            .ctx(|| "reading the schema clock".into())?;
        let base = if offline {
            // Never below where this database's own changes start: objects recorded at the
            // first install after `-cleanup` have version 0, but the cluster holds them
            // at the versions this node gave them before, and a change made since must
            // come after those.
            let known = recorded_versions(conn)?;
            let known = changes.iter().filter_map(|c| known.get(&c.name)).map(|v| v.hlc.0).max().unwrap_or(0);
            known.max(super::get_state(conn, "lineage_hlc")?)
        } else {
            version.hlc.0
        };
        Version { hlc: Hlc(base.max(last as u64) + 1), ..version }
    } else {
        version
    };
    for c in &changes {
        record(conn, &c.name, c.kind, &c.table, c.after.as_deref(), version)?;
    }
    for c in &changes {
        if let (ObjectKind::Table, Some(b), Some(a)) = (c.kind, &c.before, &c.after) {
            for (old, new) in plan_table(&c.name, b, a)?.map(|p| p.renames).unwrap_or_default() {
                record_rename(conn, &c.name, &old, &new)?;
            }
        }
    }
    if queue && !changes.is_empty() {
        let hlc = version.hlc;
        raise_clock(conn, hlc)?;
        let entry = SchemaChanges { hlc, objects: changes.clone() };
        let body = crate::wire::encode_schema(&entry);
        conn.execute("INSERT INTO __marmot__ddl_out(hlc, body) VALUES (?1, ?2)", (hlc.0 as i64, body))
            .ctx(|| "queueing a schema change".into())?;
        conn.execute("INSERT OR REPLACE INTO __marmot__state(key, value) VALUES ('ddl_hlc', ?1)", [hlc.0 as i64])
            .ctx(|| "queueing a schema change".into())?;
    }
    Ok(changes)
}

/// Whether the schema differs from the one recorded (a change not noticed yet).
pub(crate) fn unnoticed(conn: &Connection) -> Result<bool> {
    let recorded: i64 = conn
        .query_row("SELECT count(*) FROM __marmot__state WHERE key = 'schema_recorded'", [], |r| r.get(0))
        .ctx(|| "reading the schema record".into())?;
    if recorded == 0 {
        return Ok(false);
    }
    let shadow = super::capture::shadow_tables(&super::Schema::read(conn)?);
    Ok(current_objects(conn, &shadow)? != recorded_objects(conn)?)
}

/// The oldest queued schema change: its queue id and the change.
pub(crate) fn next_queued(conn: &Connection) -> Result<Option<(i64, SchemaChanges)>> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row("SELECT id, body FROM __marmot__ddl_out ORDER BY id LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .ctx(|| "reading queued schema changes".into())?;
    match row {
        None => Ok(None),
        Some((id, body)) => Ok(Some((id, crate::wire::decode_schema(&body)?))),
    }
}

/// Removes a published schema change from the queue.
pub(crate) fn dequeue(conn: &Connection, id: i64) -> Result<()> {
    conn.execute("DELETE FROM __marmot__ddl_out WHERE id = ?1", [id]).map(|_| ()).ctx(|| "dequeueing".into())
}

/// Number of schema changes waiting to be published.
pub(crate) fn queued(conn: &Connection) -> Result<u64> {
    conn.query_row("SELECT count(*) FROM __marmot__ddl_out", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .ctx(|| "counting queued schema changes".into())
}

fn rank(kind: ObjectKind) -> u8 {
    match kind {
        ObjectKind::Table => 0,
        ObjectKind::Index => 1,
        ObjectKind::View => 2,
        ObjectKind::Trigger => 3,
    }
}

/// What the install knows of each table's identity (from the capture triggers, which
/// move with a renamed table and go with a dropped one).
#[derive(Clone, Debug, Default)]
pub(crate) struct Identities {
    /// Table now → the table its capture triggers were installed for.
    pub(crate) came_from: BTreeMap<String, String>,
    /// Replicated tables without capture triggers that had them (dropped and created again
    /// since the last install, or replaced by a table that had none).
    pub(crate) uncaptured: Vec<String>,
}

/// What changed from `before` to `after`: tables first, then indexes, views, triggers.
/// A table whose capture triggers were installed for another name is that table renamed;
/// so is (for tables without capture) one whose SQL is exactly what renaming gives. A
/// table that lost its capture triggers but kept its name was replaced.
fn diff(
    before: &BTreeMap<String, Object>,
    after: &BTreeMap<String, Object>,
    ids: &Identities,
) -> Result<Vec<ObjectChange>> {
    let mut out = Vec::new();
    let mut renamed_away = Vec::new();
    let table = |m: &BTreeMap<String, Object>, n: &str| m.get(n).filter(|o| o.kind == ObjectKind::Table).cloned();
    fn rename(out: &mut Vec<ObjectChange>, away: &mut Vec<String>, name: &str, old: &str, b: &Object, a: &Object) {
        away.push(old.to_owned());
        out.push(ObjectChange {
            kind: ObjectKind::Table,
            name: name.to_owned(),
            table: name.to_owned(),
            renamed_from: Some(old.to_owned()),
            replaced: false,
            before: Some(b.sql.clone()),
            after: Some(a.sql.clone()),
        });
    }
    for (name, old) in &ids.came_from {
        if name != old {
            if let (Some(b), Some(a)) = (table(before, old), table(after, name)) {
                rename(&mut out, &mut renamed_away, name, old, &b, &a);
            }
        }
    }
    for (name, a) in after.iter().filter(|(n, o)| o.kind == ObjectKind::Table && !before.contains_key(*n)) {
        if out.iter().any(|c| &c.name == name) || ids.came_from.contains_key(name) {
            continue;
        }
        let gone: Vec<(&String, &Object)> = before
            .iter()
            .filter(|(n, o)| o.kind == ObjectKind::Table && !after.contains_key(*n) && !renamed_away.contains(n))
            .collect();
        for (old, b) in gone {
            if renamed_table_sql(&b.sql, old, name)?.as_deref() == Some(a.sql.as_str()) {
                rename(&mut out, &mut renamed_away, name, old, b, a);
                break;
            }
        }
    }
    let names: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        let (b, a) = (before.get(name), after.get(name));
        let replaced = ids.uncaptured.contains(name)
            && b.is_some_and(|o| o.kind == ObjectKind::Table)
            && a.is_some_and(|o| o.kind == ObjectKind::Table);
        if !replaced && b.map(|o| &o.sql) == a.map(|o| &o.sql) && b.map(|o| o.kind) == a.map(|o| o.kind) {
            continue;
        }
        if out.iter().any(|c| &c.name == name) {
            continue;
        }
        if renamed_away.contains(name) && a.is_none_or(|o| o.kind == ObjectKind::Table) {
            continue;
        }
        let o = a.or(b).expect("name from one of the maps");
        out.push(ObjectChange {
            kind: o.kind,
            name: name.clone(),
            table: o.table.clone(),
            renamed_from: None,
            replaced,
            before: b.map(|o| o.sql.clone()),
            after: a.map(|o| o.sql.clone()),
        });
    }
    // A replaced table's indexes and triggers go with it on the other nodes: they come
    // back from the entry, changed or not.
    let replaced: Vec<String> = out.iter().filter(|c| c.replaced).map(|c| c.name.clone()).collect();
    for (name, o) in after.iter().filter(|(_, o)| o.kind != ObjectKind::Table && replaced.contains(&o.table)) {
        if !out.iter().any(|c| &c.name == name) {
            out.push(ObjectChange {
                kind: o.kind,
                name: name.clone(),
                table: o.table.clone(),
                renamed_from: None,
                replaced: false,
                before: Some(o.sql.clone()),
                after: Some(o.sql.clone()),
            });
        }
    }
    // Renamed tables' old names, unless something else took them: gone.
    for old in renamed_away.iter().filter(|n| !after.contains_key(*n)) {
        let b = &before[old];
        out.push(ObjectChange {
            kind: ObjectKind::Table,
            name: old.clone(),
            table: old.clone(),
            renamed_from: None,
            replaced: false,
            before: Some(b.sql.clone()),
            after: None,
        });
    }
    out.sort_by_key(|c| (rank(c.kind), c.renamed_from.is_none() && c.after.is_none()));
    Ok(out)
}

/// The SQL a table created with `sql` has after `ALTER TABLE old RENAME TO new`.
fn renamed_table_sql(sql: &str, old: &str, new: &str) -> Result<Option<String>> {
    let scratch = scratch()?;
    if scratch.execute_batch(sql).is_err() {
        return Ok(None);
    }
    let alter = format!("ALTER TABLE {} RENAME TO {}", quote(old), quote(new));
    if scratch.execute_batch(&alter).is_err() {
        return Ok(None);
    }
    table_sql(&scratch, new)
}

fn scratch() -> Result<Connection> {
    Connection::open_in_memory().ctx(|| "opening a scratch database".into())
}

/// The definition of table `name` (SQLite compares names without ASCII case).
fn table_sql(conn: &Connection, name: &str) -> Result<Option<String>> {
    conn.query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1 COLLATE NOCASE", [name], |r| {
        r.get(0)
    })
    .optional()
    .ctx(|| format!("reading the definition of {name:?}"))
}

/// The object called `name`, whatever its kind.
fn object_named(conn: &Connection, name: &str) -> Result<Option<Object>> {
    conn.query_row(
        "SELECT type, tbl_name, sql FROM sqlite_master WHERE name = ?1 COLLATE NOCASE AND sql IS NOT NULL",
        [name],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)),
    )
    .optional()
    .map(|o| o.and_then(|(kind, table, sql)| Some(Object { kind: ObjectKind::parse(&kind)?, table, sql })))
    .ctx(|| format!("reading {name:?}"))
}

/// `ALTER TABLE old RENAME TO new` the legacy way: views and triggers that name the table
/// are left as they are (the origin's own rename rewrote them or not; the entry carries
/// their new text when it did), and a view naming a table that is gone does not stop it.
fn rename_table(conn: &Connection, old: &str, new: &str) -> Result<()> {
    exec(conn, "PRAGMA legacy_alter_table = ON")?;
    let renamed = exec(conn, &format!("ALTER TABLE {} RENAME TO {}", quote(old), quote(new)));
    exec(conn, "PRAGMA legacy_alter_table = OFF")?;
    renamed
}

fn column_names(conn: &Connection, table: &str) -> Result<Vec<String>> {
    conn.prepare(&format!("SELECT name FROM pragma_table_xinfo({}) WHERE hidden = 0", quote_literal(table)))
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .ctx(|| format!("reading the columns of {table:?}"))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// How to change a table in place: the statements, and the columns they rename.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TablePlan {
    pub(crate) statements: Vec<String>,
    pub(crate) renames: Vec<(String, String)>,
}

/// `ALTER TABLE` statements that turn table `name`, defined by `from`, into exactly `to`
/// (added columns, dropped columns, one renamed column), checked on a scratch database;
/// `None` when there are none (the table is rebuilt).
pub(crate) fn plan_table(name: &str, from: &str, to: &str) -> Result<Option<TablePlan>> {
    let source = scratch()?;
    let target = scratch()?;
    if source.execute_batch(from).is_err() || target.execute_batch(to).is_err() {
        return Ok(None);
    }
    // Not two tables (a view that became a table), or not readable on their own.
    let (Ok(old), Ok(new)) = (column_names(&source, name), column_names(&target, name)) else { return Ok(None) };
    let alter = format!("ALTER TABLE {}", quote(name));
    let mut candidates: Vec<TablePlan> = Vec::new();
    if let Some(defs) = added_columns(from, to) {
        let statements = defs.iter().map(|d| format!("{alter} ADD COLUMN {d}")).collect();
        candidates.push(TablePlan { statements, renames: Vec::new() });
    }
    let gone: Vec<&String> = old.iter().filter(|c| !new.contains(c)).collect();
    if !gone.is_empty() && new.iter().all(|c| old.contains(c)) {
        let statements = gone.iter().map(|c| format!("{alter} DROP COLUMN {}", quote(c))).collect();
        candidates.push(TablePlan { statements, renames: Vec::new() });
    }
    if old.len() == new.len() {
        let differing: Vec<usize> = (0..old.len()).filter(|&i| old[i] != new[i]).collect();
        if let [i] = differing[..] {
            for spelled in [quote(&new[i]), new[i].clone()] {
                candidates.push(TablePlan {
                    statements: vec![format!("{alter} RENAME COLUMN {} TO {spelled}", quote(&old[i]))],
                    renames: vec![(old[i].clone(), new[i].clone())],
                });
            }
        }
    }
    for plan in candidates {
        let trial = scratch()?;
        trial.execute_batch(from).ctx(|| "creating a scratch table".into())?;
        let ran = plan.statements.iter().all(|s| trial.execute_batch(s).is_ok());
        if ran && table_sql(&trial, name)?.as_deref() == Some(to) {
            return Ok(Some(plan));
        }
    }
    Ok(None)
}

/// The column definitions `ALTER TABLE ... ADD COLUMN` appended to `from` to give `to`:
/// SQLite inserts `, <definition>` before the closing parenthesis of the column list.
fn added_columns(from: &str, to: &str) -> Option<Vec<String>> {
    // `to` is `from` with one piece of text inserted: `, <definition>` after the last
    // column definition (before table constraints, if any). Find it, then slide it left
    // until it starts with the comma.
    let grown = to.len().checked_sub(from.len()).filter(|&n| n > 0)?;
    let prefix = from.bytes().zip(to.bytes()).take_while(|(a, b)| a == b).count();
    let mut at = prefix.min(from.len());
    if to.get(..at)? != from.get(..at)? || to.get(at + grown..)? != from.get(at..)? {
        return None;
    }
    loop {
        let inserted = to.get(at..at + grown)?;
        if let Some(rest) = inserted.strip_prefix(',') {
            let defs: Vec<String> = split_top_level(rest).into_iter().map(|d| d.trim().to_owned()).collect();
            return (!defs.is_empty() && defs.iter().all(|d| !d.is_empty())).then_some(defs);
        }
        // Sliding left keeps `to` = `from[..at] + inserted + from[at..]` while the byte
        // leaving `from`'s head equals the one leaving the inserted text's tail.
        if at == 0 || from.as_bytes()[at - 1] != to.as_bytes()[at - 1 + grown] {
            return None;
        }
        at -= 1;
    }
}

/// Splits at commas outside parentheses and quotes.
fn split_top_level(s: &str) -> Vec<&str> {
    let bytes = s.as_bytes();
    let (mut out, mut start, mut depth, mut i) = (Vec::new(), 0, 0i32, 0);
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == q {
                        if bytes.get(i + 1) == Some(&q) {
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    i += 1;
                }
            }
            b'[' => {
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
            }
            b'(' => depth += 1,
            b')' => depth -= 1,
            b',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(&s[start..]);
    out
}

/// Records that `table`'s column `old` is now called `new`: rows from nodes that have not
/// renamed it yet carry their value under the old name.
pub(crate) fn record_rename(conn: &Connection, table: &str, old: &str, new: &str) -> Result<()> {
    let mut map: BTreeMap<String, String> = recorded(conn, table, "renamed_columns")?.unwrap_or_default();
    for target in map.values_mut().filter(|v| v.as_str() == old) {
        *target = new.to_owned();
    }
    map.insert(old.to_owned(), new.to_owned());
    map.remove(new);
    record_json(conn, table, "renamed_columns", &map)
}

/// Per table id, its columns' former names → current names.
pub(crate) fn renamed_columns(conn: &Connection) -> Result<BTreeMap<i64, BTreeMap<String, String>>> {
    recorded_all(conn, "renamed_columns")
}

/// Records the columns renamed and dropped from `before` to `after` of table `table`.
fn note_columns(conn: &Connection, table: &str, before: Option<&str>, after: Option<&str>) -> Result<()> {
    let Some(here) = table_sql(conn, table)?.map(|_| column_names(conn, table)).transpose()? else {
        return Ok(());
    };
    let renames = match (before, after) {
        (Some(b), Some(a)) => plan_table(table, b, a)?.map(|p| p.renames).unwrap_or_default(),
        _ => Vec::new(),
    };
    for (old, new) in &renames {
        record_rename(conn, table, old, new)?;
    }
    let mut known = Vec::new();
    for sql in [before, after].into_iter().flatten() {
        let scratch = scratch()?;
        if scratch.execute_batch(sql).is_ok() {
            known.extend(column_names(&scratch, table).unwrap_or_default());
        }
    }
    let gone = known.into_iter().filter(|c| !renames.iter().any(|(o, _)| o == c));
    add_dropped(conn, table, gone, &here)
}

fn conflict(what: String, e: rusqlite::Error) -> Error {
    Error::SchemaConflict(format!("{what}: {e}"))
}

fn exec(conn: &Connection, sql: &str) -> Result<()> {
    conn.execute_batch(sql).map_err(|e| conflict(format!("running {sql:?}"), e))
}

/// Brings the objects `changes` (of `version`) names to their new definitions, in a
/// transaction the caller holds — each object only when `version` is newer than the
/// change that last set it here, so concurrent changes of one object end as the newest
/// says, in any order. Returns notes on concurrent changes it resolved.
pub(crate) fn apply(
    conn: &Connection,
    shadow: &[String],
    changes: &SchemaChanges,
    version: Version,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let versions = recorded_versions(conn)?;
    raise_clock(conn, changes.hlc)?;
    let here = |c: &ObjectChange| versions.get(&c.name).copied().unwrap_or_default();
    let newer: Vec<ObjectChange> = changes.objects.iter().filter(|c| here(c) < version).cloned().collect();
    // An equal version is this very change, applied already (an own entry coming back).
    for c in changes.objects.iter().filter(|c| here(c) > version) {
        notes.push(format!(
            "{} {:?}: this node holds a newer change of it; this one is passed over",
            c.kind.as_str(),
            c.name
        ));
    }
    let all = changes;
    let changes = SchemaChanges { hlc: changes.hlc, objects: newer };
    let now = current_objects(conn, shadow)?;
    for c in &changes.objects {
        let here = now.get(&c.name).map(|o| &o.sql);
        if here != c.before.as_ref() && here != c.after.as_ref() && c.renamed_from.is_none() {
            notes.push(format!(
                "{} {:?} was changed here too (concurrently); the change later in the schema log wins",
                c.kind.as_str(),
                c.name
            ));
        }
    }
    // Tables moved away under another name (renamed, swapped) keep their rows.
    let sources: Vec<String> =
        changes.objects.iter().filter_map(|c| c.renamed_from.as_ref().map(|s| s.to_lowercase())).collect();
    let is_source = |name: &str| sources.contains(&name.to_lowercase());
    // 1. Indexes, views and triggers that change or go: dropped first (a column they use
    //    may be dropped next). So is an object of another kind holding a table's name, and
    //    a table another kind of object takes the name of, unless it moves away.
    for c in &changes.objects {
        if let Some(o) = object_named(conn, &c.name)? {
            let other_kind = (c.kind == ObjectKind::Table) != (o.kind == ObjectKind::Table);
            let changed = c.kind != ObjectKind::Table && Some(&o.sql) != c.after.as_ref();
            if (changed || other_kind) && !(o.kind == ObjectKind::Table && is_source(&c.name)) {
                exec(conn, &format!("DROP {} IF EXISTS {}", o.kind.as_str().to_uppercase(), quote(&c.name)))?;
            }
        }
    }
    // 2. Tables: those that go or are replaced first (so a name can be taken again, in any
    //    letter case), except those that move away; then the renames, all at once through
    //    temporary names (a swap); then created and changed ones.
    for c in changes.objects.iter().filter(|c| c.kind == ObjectKind::Table && c.after.is_none()) {
        if !is_source(&c.name) && table_sql(conn, &c.name)?.is_some() {
            exec(conn, &format!("DROP TABLE {}", quote(&c.name)))?;
        }
    }
    let mut moves = Vec::new();
    for c in changes.objects.iter().filter(|c| c.kind == ObjectKind::Table) {
        let Some(old) = &c.renamed_from else { continue };
        let target_free = table_sql(conn, &c.name)?.is_none() || is_source(&c.name);
        if table_sql(conn, old)?.is_some() && target_free {
            let temp = format!("{PREFIX}move_{}", moves.len());
            rename_table(conn, old, &temp)?;
            moves.push((temp, c.name.clone()));
        }
    }
    for (temp, name) in &moves {
        // As the origin may have: views and triggers keep their text; the entry carries
        // those the origin's rename rewrote.
        rename_table(conn, temp, name)?;
    }
    for c in changes.objects.iter().filter(|c| c.kind == ObjectKind::Table) {
        let Some(after) = &c.after else {
            if !is_source(&c.name) && table_sql(conn, &c.name)?.is_some() {
                exec(conn, &format!("DROP TABLE {}", quote(&c.name)))?;
            }
            continue;
        };
        match table_sql(conn, &c.name)? {
            None => exec(conn, after)?,
            Some(sql) if &sql == after => {}
            Some(sql) => match plan_table(&c.name, &sql, after)? {
                Some(plan) => {
                    for s in &plan.statements {
                        exec(conn, s)?;
                    }
                    for (old, new) in &plan.renames {
                        record_rename(conn, &c.name, old, new)?;
                    }
                }
                None => rebuild(conn, &c.name, after, &changes.objects, &mut notes)?,
            },
        }
    }
    // 3. Indexes, views and triggers that are new or changed.
    let now = current_objects(conn, shadow)?;
    for c in changes.objects.iter().filter(|c| c.kind != ObjectKind::Table) {
        if let Some(after) = &c.after {
            if now.get(&c.name).map(|o| &o.sql) != Some(after) {
                if now.contains_key(&c.name) {
                    exec(conn, &format!("DROP {} IF EXISTS {}", c.kind.as_str().to_uppercase(), quote(&c.name)))?;
                }
                exec(conn, after)?;
            }
        }
    }
    for c in &changes.objects {
        record(conn, &c.name, c.kind, &c.table, c.after.as_deref(), version)?;
    }
    // Every column the entry names and the table here lacks is one rows in flight may
    // still carry (from nodes that have not applied this or a later change): their values
    // are left out instead of parking those rows for ever. This holds for entries passed
    // over as older, and for a node after `-cleanup` re-reading entries it reflects.
    for c in all.objects.iter().filter(|c| c.kind == ObjectKind::Table) {
        note_columns(conn, &c.name, c.before.as_deref(), c.after.as_deref())?;
    }
    Ok(notes)
}

/// Rebuilds table `name` as `after`: the old table is renamed away, the new one created
/// with exactly the origin's SQL, the columns both have copied by name, the old one
/// dropped, and its indexes and triggers created again (unless the entry changes them).
fn rebuild(conn: &Connection, name: &str, after: &str, entry: &[ObjectChange], notes: &mut Vec<String>) -> Result<()> {
    let parked = format!("{PREFIX}rebuild");
    let saved: Vec<(String, String)> = conn
        .prepare(
            "SELECT name, sql FROM sqlite_master WHERE tbl_name = ?1 AND type IN ('index', 'trigger') \
             AND sql IS NOT NULL AND substr(name, 1, 10) != ?2",
        )
        .and_then(|mut s| s.query_map((name, PREFIX), |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .ctx(|| format!("reading the indexes and triggers of {name:?}"))?;
    let old_columns = column_names(conn, name)?;
    // Legacy renaming leaves views and triggers that name the table as they are: they name
    // the new table once it exists.
    rename_table(conn, name, &parked)?;
    exec(conn, after)?;
    let new_columns = column_names(conn, name)?;
    let common: Vec<String> = new_columns.iter().filter(|c| old_columns.contains(c)).map(|c| quote(c)).collect();
    if !common.is_empty() {
        // Rows that break the new definition here (a constraint the origin's migration
        // satisfied by changing rows in the same transaction, whose changes may not have
        // arrived yet) are left out: the origin sends every row of the rebuilt table.
        let list = common.join(", ");
        let copied = conn
            .execute(
                &format!("INSERT OR IGNORE INTO {} ({list}) SELECT {list} FROM {}", quote(name), quote(&parked)),
                [],
            )
            .map_err(|e| conflict(format!("copying the rows of {name:?}"), e))?;
        let had: i64 = conn
            .query_row(&format!("SELECT count(*) FROM {}", quote(&parked)), [], |r| r.get(0))
            .ctx(|| format!("counting the rows of {name:?}"))?;
        if (copied as i64) < had {
            notes.push(format!(
                "{} row(s) of {name:?} do not fit its new definition here and were left out; its origin sends its rows",
                had - copied as i64
            ));
        }
    }
    exec(conn, &format!("DROP TABLE {}", quote(&parked)))?;
    for (object, sql) in saved {
        if entry.iter().any(|c| c.name == object) {
            continue;
        }
        if let Err(e) = conn.execute_batch(&sql) {
            notes.push(format!("{object:?} of rebuilt table {name:?} could not be created again: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_columns_are_read_back_from_the_definition() {
        let from = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)";
        let to = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b INT DEFAULT (1, 2), c CHECK (c > 0))";
        assert_eq!(added_columns(from, to), Some(vec!["b INT DEFAULT (1, 2)".into(), "c CHECK (c > 0)".into()]));
        assert_eq!(added_columns(from, from), None);
        // After the last column, before table constraints.
        let from = "CREATE TABLE t (a, b, PRIMARY KEY (a, b))";
        let to = "CREATE TABLE t (a, b, c TEXT, PRIMARY KEY (a, b))";
        assert_eq!(added_columns(from, to), Some(vec!["c TEXT".into()]));
    }

    #[test]
    fn plans_reproduce_the_exact_definition_or_there_is_none() {
        let plan = |from: &str, to: &str| plan_table("t", from, to).unwrap().map(|p| p.statements);
        let base = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b BLOB)";
        let added = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b BLOB, c INTEGER DEFAULT 5)";
        assert_eq!(plan(base, added), Some(vec!["ALTER TABLE \"t\" ADD COLUMN c INTEGER DEFAULT 5".into()]));
        let dropped = "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)";
        assert_eq!(plan(base, dropped), Some(vec!["ALTER TABLE \"t\" DROP COLUMN \"b\"".into()]));
        let renamed = "CREATE TABLE t (id INTEGER PRIMARY KEY, \"x\" TEXT, b BLOB)";
        let p = plan_table("t", base, renamed).unwrap().expect("a rename");
        assert_eq!(p.renames, vec![("a".into(), "x".into())]);
        let retyped = "CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b BLOB)";
        assert_eq!(plan(base, retyped), None);
    }

    #[test]
    fn a_renamed_table_is_one_change_not_a_drop_and_a_create() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE a (id INTEGER PRIMARY KEY, v); CREATE INDEX a_v ON a (v);").unwrap();
        let before = current_objects(&conn, &[]).unwrap();
        conn.execute_batch("ALTER TABLE a RENAME TO b").unwrap();
        let after = current_objects(&conn, &[]).unwrap();
        let changes = diff(&before, &after, &Identities::default()).unwrap();
        let kinds: Vec<(&str, Option<&str>, bool)> =
            changes.iter().map(|c| (c.name.as_str(), c.renamed_from.as_deref(), c.after.is_some())).collect();
        assert_eq!(kinds, vec![("b", Some("a"), true), ("a", None, false), ("a_v", None, true)]);
    }
}
