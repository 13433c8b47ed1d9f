//! Installing and removing capture: the `__marmot__` tables and the per-table triggers.
//!
//! Every replicated table gets three AFTER triggers that append the written row's *key*
//! and its version to one shared log, `__marmot__log`, inside the application's own
//! transaction; the reader takes the row's values from the table when it reads the log
//! (see [`super::reader`]). The version is computed by reads only: `max(now, clock + 1,
//! max(log) + 1)`, so a write costs one extra insert into a table keyed by that version.
//! The triggers name only key columns, so any other column can be added, dropped or
//! renamed while they are installed. Writes made while `__marmot__clock.applying` is set
//! (the side-car applying remote changes) are not captured.
//!
//! Log layout: `hlc`, `tbl`, `op` (0 written, 1 deleted), then the key values in key order
//! in `c0`, `c1`, … (layout 2; layout 1 held the whole image, each value at its column's
//! position, and is converted at install).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tracing::{info, warn};

use super::schema::{quote, Schema, TableInfo, TableSelection, PREFIX};
use crate::error::{Result, SqlContext};
use crate::model::{Hlc, NodeId, Value, Version};

/// The physical-time expression used in production triggers: milliseconds since the epoch.
/// Plain SQL that any SQLite since 3.0 runs (no `unixepoch('subsec')`).
pub const WALL_CLOCK_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// How capture is installed.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// An SQL expression giving the current time in milliseconds since the epoch. The
    /// simulation substitutes a deterministic clock.
    pub time_ms_sql: String,
    /// Queue the application's schema changes for the schema log (`replicate_ddl`).
    pub replicate_ddl: bool,
    /// Which tables replicate (`[replication]`).
    pub selection: TableSelection,
    /// Keep the conflict journal (`[conflicts] enabled`).
    pub conflicts: bool,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            time_ms_sql: WALL_CLOCK_MS.to_owned(),
            replicate_ddl: true,
            selection: TableSelection::default(),
            conflicts: true,
        }
    }
}

/// Who changed the schema an install follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Changed {
    /// The application (or nothing): new tables' rows are logged, changes are queued.
    Here,
    /// The application, while no Marmot watched (this is the first install of a process):
    /// as `Here`, but when the changes were made is unknown, so they are versioned right
    /// after the last change this node knew of each object — never above a change made
    /// elsewhere meanwhile, which this node had no way to see.
    Offline,
    /// The schema log's entry of this version, applied in the same transaction: nothing is
    /// logged or queued (the origin sends the rows); what changed takes its version.
    Remotely(Version),
}

/// The `__marmot__` tables, and the `__marmot__replication` view through which an
/// application sees, with plain SQL, whether its writes are durably published
/// (`published_hlc >= ` the version of its write; see docs/write-acknowledgement.md).
const META_SQL: &str = "
CREATE TABLE IF NOT EXISTS __marmot__clock(
  id INTEGER PRIMARY KEY CHECK (id = 0), hlc INTEGER NOT NULL, applying INTEGER NOT NULL);
INSERT OR IGNORE INTO __marmot__clock(id, hlc, applying) VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS __marmot__log(hlc INTEGER PRIMARY KEY, tbl INTEGER NOT NULL, op INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS __marmot__tables(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS __marmot__versions(
  tbl INTEGER NOT NULL, pk BLOB NOT NULL, hlc INTEGER NOT NULL, node INTEGER NOT NULL,
  deleted INTEGER NOT NULL, PRIMARY KEY (tbl, pk)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS __marmot__tombstones ON __marmot__versions(hlc) WHERE deleted = 1;
CREATE TABLE IF NOT EXISTS __marmot__aside(
  tbl INTEGER NOT NULL, pk BLOB NOT NULL, hlc INTEGER NOT NULL, node INTEGER NOT NULL,
  image BLOB NOT NULL, PRIMARY KEY (tbl, pk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __marmot__positions(shard INTEGER PRIMARY KEY, position INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS __marmot__parked(
  id INTEGER PRIMARY KEY, shard INTEGER NOT NULL, position INTEGER NOT NULL,
  error TEXT NOT NULL, bytes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS __marmot__displaced(tbl INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS __marmot__schema(
  name TEXT PRIMARY KEY, type TEXT NOT NULL, tbl_name TEXT NOT NULL, sql TEXT,
  hlc INTEGER NOT NULL, node INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __marmot__ddl_out(id INTEGER PRIMARY KEY, hlc INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS __marmot__state(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __marmot__conflicts(
  table_name TEXT NOT NULL, key TEXT NOT NULL, loser_hlc INTEGER NOT NULL, loser_node INTEGER NOT NULL,
  loser_image TEXT, winner_hlc INTEGER NOT NULL, winner_node INTEGER NOT NULL,
  tbl INTEGER NOT NULL, pk BLOB NOT NULL, image BLOB);
CREATE UNIQUE INDEX IF NOT EXISTS __marmot__conflicts_row
  ON __marmot__conflicts(tbl, pk, loser_hlc, loser_node);
CREATE INDEX IF NOT EXISTS __marmot__conflicts_at ON __marmot__conflicts(loser_hlc);
CREATE TABLE IF NOT EXISTS __marmot__based(
  tbl INTEGER NOT NULL, pk BLOB NOT NULL, hlc INTEGER NOT NULL, node INTEGER NOT NULL,
  PRIMARY KEY (tbl, pk, hlc, node)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS __marmot__bases(hlc INTEGER PRIMARY KEY, base_hlc INTEGER, base_node INTEGER);
INSERT OR IGNORE INTO __marmot__state(key, value) VALUES ('published_hlc', 0), ('folded_hlc', 0);
CREATE VIEW IF NOT EXISTS __marmot__replication AS SELECT
  max(coalesce((SELECT max(hlc) FROM __marmot__log), 0), s.value) AS last_local_hlc,
  s.value AS published_hlc,
  (SELECT count(*) FROM __marmot__log AS l WHERE l.hlc > s.value) AS pending_changes
  FROM __marmot__state AS s WHERE s.key = 'published_hlc';
";

/// Installs (or re-installs) capture: creates the `__marmot__` tables when missing and
/// (re)creates the triggers of every replicated table. Idempotent. Returns the schema.
///
/// Triggers that already exist with the wanted SQL are left alone, so a re-install that
/// changes nothing does not change the schema either: otherwise the side-car's two
/// connections would each see the other's re-install as a schema change and re-install
/// in turn, forever. The transaction is `IMMEDIATE` because the install writes: a
/// deferred one that read first gets `SQLITE_BUSY` at once (no busy wait) when the
/// application commits in between.
pub fn install(conn: &Connection, node: NodeId, opts: &CaptureOptions) -> Result<Schema> {
    install_as(conn, node, opts, Changed::Here)
}

/// [`install`] following a change made `changed`.
pub(crate) fn install_as(conn: &Connection, node: NodeId, opts: &CaptureOptions, changed: Changed) -> Result<Schema> {
    let tx =
        Transaction::new_unchecked(conn, TransactionBehavior::Immediate).ctx(|| "starting capture install".into())?;
    let schema = install_in(&tx, node, opts, changed)?;
    tx.commit().ctx(|| "committing capture install".into())?;
    Ok(schema)
}

/// [`install`] inside a write transaction the caller holds.
pub(crate) fn install_in(tx: &Connection, node: NodeId, opts: &CaptureOptions, changed: Changed) -> Result<Schema> {
    let first_install = !object_exists(tx, "__marmot__clock")?;
    tx.execute_batch(META_SQL).ctx(|| "creating __marmot__ tables".into())?;
    ensure_captured_columns(tx)?;
    // Right after a snapshot restore the tables have the saver's triggers, which captured
    // every change since the copy: none lost a change.
    let restored = tx
        .query_row("DELETE FROM __marmot__state WHERE key = 'capture_stripped' RETURNING value", [], |_| Ok(()))
        .optional()
        .ctx(|| "reading the restore marker".into())?
        .is_some();
    if restored {
        // The saver's notes about its own unpublished changes mean nothing here.
        tx.execute_batch("DELETE FROM __marmot__bases").ctx(|| "clearing the saver's change bases".into())?;
        super::conflicts::forget_set_aside(tx)?;
    }
    if first_install || restored {
        // This node's own changes up to here are not (all) in this database: the conflict
        // journal judges them like remote ones when the stream brings them back; the ones
        // after it were made on this database's rows.
        let now = clock_now(tx, &opts.time_ms_sql)?;
        tx.execute("INSERT OR REPLACE INTO __marmot__state(key, value) VALUES ('lineage_hlc', ?1)", [now.0 as i64])
            .ctx(|| "recording where this database's own changes start".into())?;
        // The next change is versioned above it, even within the same millisecond.
        tx.execute("UPDATE __marmot__clock SET hlc = max(hlc, ?1) WHERE id = 0", [now.0 as i64])
            .ctx(|| "raising the clock to where this database's own changes start".into())?;
    }
    let mut schema = Schema::read(tx)?;
    schema.select(&opts.selection);
    for skipped in &schema.skipped {
        warn!(table = %skipped.name, reason = %skipped.reason, "table not replicated");
    }
    let key_width = schema.tables.iter().map(|t| t.pk.len()).max().unwrap_or(0);
    ensure_log_width(tx, key_width)?;
    ensure_width(tx, "__marmot__displaced", "k", 1, key_width)?;
    let existing = existing_triggers(tx)?;
    follow_renames(tx, &existing)?;
    let here = matches!(changed, Changed::Here | Changed::Offline);
    let queue = opts.replicate_ddl && here;
    let version = match changed {
        Changed::Here | Changed::Offline => Version { hlc: clock_now(tx, &opts.time_ms_sql)?, node },
        Changed::Remotely(v) => v,
    };
    let mut ids = super::ddl::Identities::default();
    if here {
        for (trigger, (on, _)) in &existing {
            if let Some(old) = trigger.strip_prefix(PREFIX).and_then(|t| t.strip_suffix("__insert")) {
                ids.came_from.insert(on.clone(), old.to_owned());
            }
        }
        if !first_install && !restored {
            let captured: Vec<&String> = existing.values().map(|(on, _)| on).collect();
            ids.uncaptured = schema.tables.iter().map(|t| &t.name).filter(|n| !captured.contains(n)).cloned().collect();
        }
    }
    let noticed = super::ddl::notice(tx, &shadow_tables(&schema), queue, version, changed == Changed::Offline, &ids)?;
    for c in &noticed {
        let what = match (&c.before, &c.after) {
            (None, _) => "created",
            (_, None) => "dropped",
            _ if c.renamed_from.is_some() => "renamed",
            _ if c.replaced => "replaced",
            _ => "changed",
        };
        info!(object = %c.name, kind = c.kind.as_str(), what, queued = queue, "schema change noticed");
    }
    let layout_1 = !first_install && get_layout(tx)? < LOG_LAYOUT;
    let mut wanted = BTreeMap::new();
    for table in &schema.tables {
        let captured = recorded::<Vec<String>>(tx, &table.name, "columns")?;
        let id = table_id(tx, &table.name)?;
        let key: Vec<String> = table.pk.iter().map(|&i| table.columns[i].clone()).collect();
        let mut key_changed = recorded::<Vec<String>>(tx, &table.name, "key_columns")?.is_some_and(|k| k != key);
        if layout_1 {
            if let Some(old) = &captured {
                key_changed |= keys_to_layout_2(tx, table, id, old)?;
            }
        }
        if let Some(old) = captured.as_ref().filter(|old| *old != &table.columns) {
            record_dropped(tx, table, old)?;
        }
        if captured.as_ref() != Some(&table.columns) || key_changed || layout_1 {
            tx.execute(
                "UPDATE __marmot__tables SET columns = ?2, key_columns = ?3 WHERE id = ?1",
                (
                    id,
                    serde_json::to_string(&table.columns).expect("names serialize"),
                    serde_json::to_string(&key).expect("names serialize"),
                ),
            )
            .ctx(|| format!("recording the columns of {:?}", table.name))?;
        }
        let has_capture = existing.values().any(|(on, _)| on == &table.name);
        if key_changed {
            tx.execute("DELETE FROM __marmot__log WHERE tbl = ?1 AND hlc > ?2", (id, published(tx)?))
                .ctx(|| format!("dropping unpublished keys of {:?}", table.name))?;
        }
        // A table the schema log created or rebuilt here gets its rows from its origin,
        // which logs them when it notices the change.
        if here && (key_changed || (!has_capture && !first_install && !restored)) {
            if key_changed {
                warn!(table = %table.name, "primary key columns changed: every row is sent again, and \
                    unpublished deletes of the old keys are not sent");
            }
            backfill(tx, table, id, &opts.time_ms_sql)?;
            if !key_changed {
                log_vanished(tx, table, id, &opts.time_ms_sql)?;
            }
        }
        for (what, sql) in trigger_sql(table, id, &opts.time_ms_sql) {
            wanted.insert(format!("{PREFIX}{}__{what}", table.name), sql);
        }
    }
    for (name, (_, sql)) in &existing {
        if wanted.get(name).map(|w| w.trim_end_matches(';')) != Some(sql.as_str()) {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(name)))
                .ctx(|| format!("dropping trigger {name:?}"))?;
        }
    }
    for (name, sql) in &wanted {
        if existing.get(name).map(|(_, s)| s.as_str()) != Some(sql.trim_end_matches(';')) {
            tx.execute_batch(sql).ctx(|| format!("creating trigger {name:?}"))?;
        }
    }
    if restored {
        // The copy's triggers were its saver's, which may replicate tables this node does
        // not: what they captured of those stays local.
        let ids: Vec<String> =
            schema.tables.iter().map(|t| table_id(tx, &t.name).map(|id| id.to_string())).collect::<Result<_>>()?;
        tx.execute(&format!("DELETE FROM __marmot__log WHERE tbl NOT IN ({})", ids.join(", ")), [])
            .ctx(|| "dropping changes to tables this node does not replicate".into())?;
    }
    set_layout(tx)?;
    Ok(schema)
}

/// The shadow tables of virtual tables in `schema` (created by their virtual table).
pub(crate) fn shadow_tables(schema: &Schema) -> Vec<String> {
    schema.skipped.iter().filter(|s| s.reason.starts_with("shadow table")).map(|s| s.name.clone()).collect()
}

/// A version after every one this node produced or applied, at least the wall clock.
fn clock_now(conn: &Connection, time_ms_sql: &str) -> Result<Hlc> {
    let sql = format!(
        "SELECT max(({time_ms_sql}) * 65536, (SELECT hlc FROM __marmot__clock WHERE id = 0), \
         coalesce((SELECT max(hlc) FROM __marmot__log), 0))"
    );
    conn.query_row(&sql, [], |r| r.get::<_, i64>(0)).map(|v| Hlc(v as u64)).ctx(|| "reading the clock".into())
}

/// The log layout this code writes (see the module's documentation).
const LOG_LAYOUT: i64 = 2;

fn get_layout(conn: &Connection) -> Result<i64> {
    conn.query_row("SELECT value FROM __marmot__state WHERE key = 'log_layout'", [], |r| r.get(0))
        .optional()
        .map(|v| v.unwrap_or(1))
        .ctx(|| "reading the log layout".into())
}

fn set_layout(conn: &Connection) -> Result<()> {
    conn.execute("INSERT OR REPLACE INTO __marmot__state(key, value) VALUES ('log_layout', ?1)", [LOG_LAYOUT])
        .map(|_| ())
        .ctx(|| "recording the log layout".into())
}

fn published(conn: &Connection) -> Result<i64> {
    conn.query_row("SELECT value FROM __marmot__state WHERE key = 'published_hlc'", [], |r| r.get(0))
        .ctx(|| "reading the published point".into())
}

/// Moves the key values of the table's layout-1 log rows (whole images, each value at its
/// column's position in `old`) to `c0`, `c1`, …; returns whether the key changed instead.
fn keys_to_layout_2(conn: &Connection, t: &TableInfo, id: i64, old: &[String]) -> Result<bool> {
    let Some(from): Option<Vec<usize>> = t.pk.iter().map(|&i| old.iter().position(|c| c == &t.columns[i])).collect()
    else {
        return Ok(true);
    };
    let targets: Vec<String> = (0..from.len()).map(|n| format!("c{n}")).collect();
    let sources: Vec<String> = from.iter().map(|p| format!("c{p}")).collect();
    let sql = format!("UPDATE __marmot__log SET ({}) = ({}) WHERE tbl = {id}", targets.join(", "), sources.join(", "));
    conn.execute(&sql, []).ctx(|| format!("converting the log rows of {:?}", t.name))?;
    Ok(false)
}

fn object_exists(conn: &Connection, name: &str) -> Result<bool> {
    conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = ?1", [name], |r| r.get::<_, i64>(0))
        .map(|n| n > 0)
        .ctx(|| format!("looking for {name}"))
}

/// Adds `__marmot__tables.columns` (the table's column names when capture was last
/// installed, as JSON) and `key_columns` (its key's) to databases installed before they
/// existed.
fn ensure_captured_columns(conn: &Connection) -> Result<()> {
    for column in ["columns", "key_columns", "dropped_columns", "renamed_columns"] {
        let has: i64 = conn
            .query_row("SELECT count(*) FROM pragma_table_info('__marmot__tables') WHERE name = ?1", [column], |r| {
                r.get(0)
            })
            .ctx(|| "reading __marmot__tables".into())?;
        if has == 0 {
            conn.execute_batch(&format!("ALTER TABLE __marmot__tables ADD COLUMN {column} TEXT"))
                .ctx(|| format!("adding __marmot__tables.{column}"))?;
        }
    }
    Ok(())
}

/// Adds the columns of `old` that table `t` lacks now to its dropped columns, and takes
/// those it has again out.
fn record_dropped(conn: &Connection, t: &TableInfo, old: &[String]) -> Result<()> {
    add_dropped(conn, &t.name, old.iter().cloned(), &t.columns)
}

/// Adds the columns of `gone` that table `table` lacks (`now` are its columns) to its
/// dropped columns, and takes those it has out: rows from nodes that still have them are
/// applied without them.
pub(crate) fn add_dropped(
    conn: &Connection,
    table: &str,
    gone: impl IntoIterator<Item = String>,
    now: &[String],
) -> Result<()> {
    let mut dropped: Vec<String> = recorded(conn, table, "dropped_columns")?.unwrap_or_default();
    for c in gone {
        if !now.contains(&c) && !dropped.contains(&c) {
            dropped.push(c);
        }
    }
    dropped.retain(|c| !now.contains(c));
    record(conn, table, "dropped_columns", &dropped)
}

/// Per table id, the columns the table had and dropped.
pub(crate) fn dropped_columns(conn: &Connection) -> Result<BTreeMap<i64, Vec<String>>> {
    recorded_all(conn, "dropped_columns")
}

/// What `__marmot__tables.<column>` records for `table`, as JSON (`columns`: the table's
/// columns when capture was last installed; `key_columns`: the key its log rows hold;
/// `dropped_columns`; `renamed_columns`), when recorded.
pub(crate) fn recorded<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    table: &str,
    column: &str,
) -> Result<Option<T>> {
    let json: Option<String> = conn
        .query_row(&format!("SELECT {column} FROM __marmot__tables WHERE name = ?1"), [table], |r| r.get(0))
        .optional()
        .ctx(|| format!("reading the recorded {column} of {table:?}"))?
        .flatten();
    Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
}

/// Records `value` as JSON in `__marmot__tables.<column>` for `table`.
pub(crate) fn record<T: serde::Serialize>(conn: &Connection, table: &str, column: &str, value: &T) -> Result<()> {
    table_id(conn, table)?;
    let json = serde_json::to_string(value).expect("names serialize");
    conn.execute(&format!("UPDATE __marmot__tables SET {column} = ?2 WHERE name = ?1"), (table, json))
        .map(|_| ())
        .ctx(|| format!("recording the {column} of {table:?}"))
}

/// Per table id, what `__marmot__tables.<column>` records, where it records something.
pub(crate) fn recorded_all<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    column: &str,
) -> Result<BTreeMap<i64, T>> {
    let rows: Vec<(i64, String)> = conn
        .prepare(&format!("SELECT id, {column} FROM __marmot__tables WHERE {column} IS NOT NULL"))
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .ctx(|| format!("reading the recorded {column}"))?;
    Ok(rows.into_iter().filter_map(|(id, j)| Some((id, serde_json::from_str(&j).ok()?))).collect())
}

/// A renamed table keeps its triggers (SQLite moves them), which keep logging under the
/// table's old id: give that id the new name, so those log rows and the table's versions
/// stay the table's.
fn follow_renames(conn: &Connection, existing: &BTreeMap<String, (String, String)>) -> Result<()> {
    for (trigger, (on, _)) in existing {
        let Some(old) = trigger.strip_prefix(PREFIX).and_then(|t| t.strip_suffix("__insert")) else { continue };
        if old == on {
            continue;
        }
        let taken: i64 = conn
            .query_row("SELECT count(*) FROM __marmot__tables WHERE name = ?1", [on], |r| r.get(0))
            .ctx(|| "reading __marmot__tables".into())?;
        if taken == 0 {
            conn.execute("UPDATE __marmot__tables SET name = ?2 WHERE name = ?1", (old, on))
                .ctx(|| format!("following the rename of {old:?} to {on:?}"))?;
        }
    }
    Ok(())
}

/// Logs every row of a table that had no capture (created, or dropped and created again,
/// since the last install), so rows written before Marmot noticed are not missed.
fn backfill(conn: &Connection, t: &TableInfo, id: i64, time_ms_sql: &str) -> Result<()> {
    let cols: String = (0..t.pk.len()).map(|n| format!(", c{n}")).collect();
    let vals: String = t.pk.iter().map(|&i| format!(", r.{}", quote(&t.columns[i]))).collect();
    let base = next_hlc_sql(time_ms_sql);
    let keyed = key_not_null(t, "r").map(|c| format!(" WHERE {c}")).unwrap_or_default();
    let sql = format!(
        "INSERT INTO __marmot__log(hlc, tbl, op{cols}) \
         SELECT {base} + row_number() OVER () - 1, {id}, 0{vals} FROM {} AS r{keyed}",
        quote(&t.name)
    );
    let n = conn.execute(&sql, []).ctx(|| format!("logging the rows of new table {:?}", t.name))?;
    if n > 0 {
        tracing::info!(table = %t.name, rows = n, "logged rows written before capture was installed");
    }
    Ok(())
}

/// Logs the deletion of every row the table held here (a live version in
/// `__marmot__versions`, or a key in the log) that it does not hold now: a table dropped
/// and created again, or replaced by another (a rebuild that left rows out), lost them
/// without a trigger firing.
fn log_vanished(conn: &Connection, t: &TableInfo, id: i64, time_ms_sql: &str) -> Result<()> {
    let keys: Vec<Vec<u8>> = conn
        .prepare("SELECT pk FROM __marmot__versions WHERE tbl = ?1 AND deleted = 0")
        .and_then(|mut s| s.query_map([id], |r| r.get(0))?.collect())
        .ctx(|| format!("reading the versions of {:?}", t.name))?;
    let mut candidates: Vec<Vec<Value>> = keys
        .iter()
        .filter_map(|k| ciborium::from_reader::<Vec<Value>, _>(k.as_slice()).ok())
        .filter(|v| v.len() == t.pk.len())
        .collect();
    // Rows written here and not folded into the versions yet are in the log.
    let cols: Vec<String> = (0..t.pk.len()).map(|n| format!("c{n}")).collect();
    let logged: Vec<Vec<Value>> = conn
        .prepare(&format!("SELECT DISTINCT {} FROM __marmot__log WHERE tbl = ?1", cols.join(", ")))
        .and_then(|mut s| {
            s.query_map([id], |r| (0..cols.len()).map(|n| r.get_ref(n).map(Value::from)).collect())?.collect()
        })
        .ctx(|| format!("reading the log of {:?}", t.name))?;
    candidates.extend(logged);
    let cond: Vec<String> =
        t.pk.iter().enumerate().map(|(n, &i)| format!("{} = ?{}", quote(&t.columns[i]), n + 1)).collect();
    let exists = format!("SELECT EXISTS (SELECT 1 FROM {} WHERE {})", quote(&t.name), cond.join(" AND "));
    let mut gone: Vec<Vec<Value>> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for values in candidates {
        if values.iter().any(Value::is_null) || !seen.insert(t.key(&values)) {
            continue;
        }
        let here: bool = conn
            .query_row(&exists, rusqlite::params_from_iter(values.iter()), |r| r.get(0))
            .ctx(|| format!("looking for a row of {:?}", t.name))?;
        if !here {
            gone.push(values);
        }
    }
    if gone.is_empty() {
        return Ok(());
    }
    let base: i64 = conn
        .query_row(&format!("SELECT {}", next_hlc_sql(time_ms_sql)), [], |r| r.get(0))
        .ctx(|| "reading the clock".into())?;
    let cols: String = (0..t.pk.len()).map(|n| format!(", c{n}")).collect();
    let params: String = (0..t.pk.len()).map(|n| format!(", ?{}", n + 2)).collect();
    let sql = format!("INSERT INTO __marmot__log(hlc, tbl, op{cols}) VALUES (?1, {id}, 1{params})");
    for (i, values) in gone.iter().enumerate() {
        let hlc = base + i as i64;
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![&hlc];
        args.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
        conn.execute(&sql, args.as_slice()).ctx(|| format!("logging a vanished row of {:?}", t.name))?;
    }
    tracing::info!(table = %t.name, rows = gone.len(), "logged the deletion of rows the table lost without triggers");
    Ok(())
}

/// Marmot's triggers now in the database: name → (table it is on, SQL as SQLite stores it).
fn existing_triggers(conn: &Connection) -> Result<BTreeMap<String, (String, String)>> {
    let mut stmt = conn
        .prepare("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, 10) = ?1")
        .ctx(|| "listing __marmot__ triggers".into())?;
    let triggers = stmt
        .query_map([PREFIX], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .and_then(|rows| rows.collect())
        .ctx(|| "listing __marmot__ triggers".into())?;
    Ok(triggers)
}

/// Removes every trigger and table Marmot created. User tables and data are untouched.
pub fn cleanup(conn: &Connection) -> Result<()> {
    let tx = conn.unchecked_transaction().ctx(|| "starting cleanup".into())?;
    drop_triggers(&tx)?;
    for v in names(&tx, "view")? {
        tx.execute_batch(&format!("DROP VIEW IF EXISTS {}", quote(&v))).ctx(|| format!("dropping {v:?}"))?;
    }
    let tables = names(&tx, "table")?;
    for t in tables {
        tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&t))).ctx(|| format!("dropping {t:?}"))?;
    }
    tx.commit().ctx(|| "committing cleanup".into())
}

fn names(conn: &Connection, kind: &str) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = ?1 AND substr(name, 1, 10) = ?2")
        .ctx(|| "listing __marmot__ objects".into())?;
    let names = stmt
        .query_map((kind, PREFIX), |r| r.get(0))
        .and_then(|rows| rows.collect())
        .ctx(|| "listing __marmot__ objects".into())?;
    Ok(names)
}

fn drop_triggers(conn: &Connection) -> Result<()> {
    for t in names(conn, "trigger")? {
        conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&t)))
            .ctx(|| format!("dropping trigger {t:?}"))?;
    }
    Ok(())
}

/// The stable numeric id of a table in `__marmot__log` and `__marmot__versions`.
pub fn table_id(conn: &Connection, name: &str) -> Result<i64> {
    conn.execute("INSERT OR IGNORE INTO __marmot__tables(name) VALUES (?1)", [name])
        .ctx(|| format!("registering table {name:?}"))?;
    conn.query_row("SELECT id FROM __marmot__tables WHERE name = ?1", [name], |r| r.get(0))
        .ctx(|| format!("reading id of table {name:?}"))
}

fn ensure_log_width(conn: &Connection, width: usize) -> Result<()> {
    ensure_width(conn, "__marmot__log", "c", 3, width)
}

/// Gives `table` (which has `fixed` other columns) value columns `{prefix}0..{prefix}{width}`.
fn ensure_width(conn: &Connection, table: &str, prefix: &str, fixed: usize, width: usize) -> Result<()> {
    let have: usize = conn
        .query_row(&format!("SELECT count(*) FROM pragma_table_info('{table}')"), [], |r| r.get::<_, i64>(0))
        .ctx(|| format!("reading the width of {table}"))? as usize;
    for i in have.saturating_sub(fixed)..width {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {prefix}{i}"))
            .ctx(|| format!("widening {table}"))?;
    }
    Ok(())
}

/// The next local version, computed by reads only: `max(now, clock + 1, max(log) + 1)`.
pub(super) fn next_hlc_sql(time_ms_sql: &str) -> String {
    format!(
        "(SELECT max(({time_ms_sql}) * 65536, c.hlc + 1, \
         coalesce((SELECT max(hlc) FROM __marmot__log), 0) + 1) \
         FROM __marmot__clock AS c WHERE c.id = 0)"
    )
}

/// `AND`-joined `{row}.k IS NOT NULL` for the key columns of a table whose key may hold
/// NULL (such rows are not replicated), or `None`.
fn key_not_null(t: &TableInfo, row: &str) -> Option<String> {
    t.pk_nullable.then(|| {
        t.pk.iter().map(|&i| format!("{row}.{} IS NOT NULL", quote(&t.columns[i]))).collect::<Vec<_>>().join(" AND ")
    })
}

fn trigger_sql(t: &TableInfo, id: i64, time_ms_sql: &str) -> Vec<(&'static str, String)> {
    let name = |what: &str| quote(&format!("{PREFIX}{}__{what}", t.name));
    let table = quote(&t.name);
    let applying = "(SELECT applying FROM __marmot__clock WHERE id = 0) = 0";
    let when = format!("WHEN {applying}");
    let hlc = next_hlc_sql(time_ms_sql);
    let pk_cols: String = (0..t.pk.len()).map(|n| format!(", c{n}")).collect();
    let pk_vals = |row: &str| -> String { t.pk.iter().map(|&i| format!(", {row}.{}", quote(&t.columns[i]))).collect() };
    let pk_changed: Vec<String> =
        t.pk.iter().map(|&i| format!("OLD.{0} IS NOT NEW.{0}", quote(&t.columns[i]))).collect();
    let displaced = displaced_sql(t, id, &hlc);
    let (insert_when, new_key) = match key_not_null(t, "NEW") {
        None => (
            when.clone(),
            format!("INSERT INTO __marmot__log(hlc, tbl, op{pk_cols}) VALUES ({hlc}, {id}, 0{});", pk_vals("NEW")),
        ),
        Some(c) => (
            format!("{when} AND {c}"),
            format!(
                "INSERT INTO __marmot__log(hlc, tbl, op{pk_cols}) SELECT {hlc}, {id}, 0{} WHERE {c};",
                pk_vals("NEW")
            ),
        ),
    };
    let old_key = key_not_null(t, "OLD").map(|c| format!(" AND {c}")).unwrap_or_default();
    let changed = match (old_key.is_empty(), pk_changed.len()) {
        (false, n) if n > 1 => format!("({})", pk_changed.join(" OR ")),
        _ => pk_changed.join(" OR "),
    };
    let insert = format!(
        "CREATE TRIGGER {} AFTER INSERT ON {table} {insert_when} BEGIN \
         INSERT INTO __marmot__log(hlc, tbl, op{pk_cols}) VALUES ({hlc}, {id}, 0{}); END;",
        name("insert"),
        pk_vals("NEW"),
    );
    let update = format!(
        "CREATE TRIGGER {} AFTER UPDATE ON {table} {when} BEGIN \
         INSERT INTO __marmot__log(hlc, tbl, op{pk_cols}) SELECT {hlc}, {id}, 1{} WHERE {changed}{old_key}; {new_key} END;",
        name("update"),
        pk_vals("OLD"),
    );
    let delete = format!(
        "CREATE TRIGGER {} AFTER DELETE ON {table} {when}{} BEGIN \
         INSERT INTO __marmot__log(hlc, tbl, op{pk_cols}) VALUES ({hlc}, {id}, 1{}); END;",
        name("delete"),
        old_key,
        pk_vals("OLD"),
    );
    let mut out = vec![("insert", insert), ("update", update), ("delete", delete)];
    if let Some(d) = displaced {
        let unique_cols: Vec<String> =
            t.unique.iter().flat_map(|u| u.columns.iter().map(|&c| quote(&t.columns[c]))).collect();
        // Notes are per table: an application trigger writing another table with a unique
        // index in between must not take or clear this table's notes.
        let noted = format!("EXISTS (SELECT 1 FROM __marmot__displaced WHERE tbl = {id})");
        let conflict = &d.conflict;
        let on_update = format!("UPDATE OF {} ON {table}", unique_cols.join(", "));
        for (what, event, when_more, body) in [
            ("displace_insert", format!("BEFORE INSERT ON {table}"), conflict.as_str(), &d.note),
            ("displace_update", format!("BEFORE {on_update}"), conflict.as_str(), &d.note),
            ("displaced_insert", format!("AFTER INSERT ON {table}"), noted.as_str(), &d.log),
            ("displaced_update", format!("AFTER {on_update}"), noted.as_str(), &d.log),
        ] {
            let sql = format!("CREATE TRIGGER {} {event} {when} AND {when_more} BEGIN {body} END;", name(what));
            out.push((what, sql));
        }
    }
    out
}

/// For a table with secondary unique indexes, the SQL that captures rows SQLite deletes to
/// make room under `REPLACE` (`INSERT OR REPLACE`, `UPDATE OR REPLACE`, a constraint's
/// `ON CONFLICT REPLACE`), which fire no delete trigger unless the application's connection
/// set `recursive_triggers`: (before the write, after the write).
///
/// Before a write that shares a unique value with another row (`conflict`), those rows (a
/// superset of what SQLite will replace: partial indexes' conditions are not checked) are
/// noted in `__marmot__displaced` (`note`). After a write, when notes exist, the noted
/// rows that no longer exist were displaced and are logged as deletes, and the notes are
/// cleared (`log`). So a write without a conflict pays one index lookup and one check of
/// an empty table. An ignored or failed write leaves notes behind; a noted row that still
/// exists is no delete, and the merge clears notes before it writes, so a row it deletes
/// is never taken for a displaced one.
struct Displaced {
    conflict: String,
    note: String,
    log: String,
}

fn displaced_sql(t: &TableInfo, id: i64, hlc: &str) -> Option<Displaced> {
    if t.unique.is_empty() {
        return None;
    }
    let keys: String = (0..t.pk.len()).map(|n| format!(", k{n}")).collect();
    let key_vals =
        |row: &str| -> String { t.pk.iter().map(|&i| format!(", {row}.{}", quote(&t.columns[i]))).collect() };
    let matches: Vec<String> = t
        .unique
        .iter()
        .map(|u| {
            let eq: Vec<String> = u
                .columns
                .iter()
                .zip(&u.collations)
                .map(|(&c, coll)| format!("r.{0} = NEW.{0} COLLATE {1}", quote(&t.columns[c]), coll.sql()))
                .collect();
            format!("({})", eq.join(" AND "))
        })
        .collect();
    let conflict = format!("EXISTS (SELECT 1 FROM {} AS r WHERE {})", quote(&t.name), matches.join(" OR "));
    let note = format!(
        "DELETE FROM __marmot__displaced WHERE tbl = {id}; \
         INSERT INTO __marmot__displaced(tbl{keys}) SELECT {id}{} FROM {} AS r WHERE {};",
        key_vals("r"),
        quote(&t.name),
        matches.join(" OR ")
    );
    let gone: Vec<String> =
        t.pk.iter()
            .zip(&t.pk_collations)
            .enumerate()
            .map(|(n, (&i, c))| format!("r.{} IS d.k{n} COLLATE {}", quote(&t.columns[i]), c.sql()))
            .collect();
    let pk_cols: String = (0..t.pk.len()).map(|n| format!(", c{n}")).collect();
    let d_keys: String = (0..t.pk.len()).map(|n| format!(", d.k{n}")).collect();
    let log = format!(
        "INSERT INTO __marmot__log(hlc, tbl, op{pk_cols}) SELECT {hlc} + row_number() OVER () - 1, {id}, 1{d_keys} \
         FROM __marmot__displaced AS d WHERE d.tbl = {id} AND NOT EXISTS (SELECT 1 FROM {} AS r WHERE {}); \
         DELETE FROM __marmot__displaced WHERE tbl = {id};",
        quote(&t.name),
        gone.join(" AND ")
    );
    Some(Displaced { conflict, note, log })
}

#[cfg(test)]
mod install_tests {
    use super::*;

    fn schema_version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA schema_version", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn reinstall_that_changes_nothing_leaves_the_schema_alone() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v)").unwrap();
        let opts = CaptureOptions::default();
        install(&conn, NodeId(1), &opts).unwrap();
        let before = schema_version(&conn);
        install(&conn, NodeId(1), &opts).unwrap();
        assert_eq!(schema_version(&conn), before, "a no-op re-install must not look like a schema change");

        conn.execute_batch("ALTER TABLE t ADD COLUMN w").unwrap();
        install(&conn, NodeId(1), &opts).unwrap();
        let sql: String = conn
            .query_row("SELECT sql FROM sqlite_master WHERE name = '__marmot__t__insert'", [], |r| r.get(0))
            .unwrap();
        assert!(!sql.contains("NEW.\"w\""), "the trigger names key columns only: {sql}");
    }
}
