//! `marmot status [--json]`: one node's replication state, from its database (read-only)
//! and, when reachable, its change streams.
//!
//! What it shows: the tables replicated and those skipped (with the reason), local changes
//! captured but not yet published, the stored position of every shard and how many
//! entries the stream holds beyond it, parked batches (with their errors) and set-aside
//! rows. An unreachable NATS is reported, not an error: the database part still prints.

use std::fmt::Write as _;
use std::time::Duration;

use marmot_core::sqlite::{null_key_rows, Schema};
use marmot_core::{LogTransport, Shard};
use rusqlite::Connection;
use serde::Serialize;

use super::{capture_installed, connect, open_readonly, published_and_local, NatsTarget};
use crate::config::Config;

/// Below this many free bytes the database's disk is reported as full.
const DISK_NEARLY_FULL_BYTES: u64 = 64 * 1024;

/// Parked batches listed in full (the count covers all of them).
const PARKED_LISTED_MAX: usize = 10;

/// The status of one node.
#[derive(Debug, Serialize)]
pub struct Status {
    /// `node_id`.
    pub node_id: u64,
    /// `db_path`.
    pub db_path: String,
    /// Whether Marmot's tables and triggers exist in the database.
    pub capture_installed: bool,
    /// Replicated tables.
    pub tables: Vec<String>,
    /// Tables not replicated, and why.
    pub skipped: Vec<Skipped>,
    /// The fingerprint of the application's schema: equal on nodes whose schemas are.
    pub schema_fingerprint: String,
    /// Schema changes of this node waiting to be published on the schema log.
    pub schema_changes_pending: u64,
    /// Remote row changes passed over because their table is not replicated here.
    pub excluded_rows: u64,
    /// Captured local changes not yet durably published.
    pub pending_changes: u64,
    /// The highest local version captured (published or not).
    pub last_local_hlc: u64,
    /// The highest local version durably published.
    pub published_hlc: u64,
    /// Entries parked because they could not be applied.
    pub parked_batches: u64,
    /// The oldest parked entries.
    pub parked: Vec<Parked>,
    /// Rows set aside after losing a UNIQUE value.
    pub aside_rows: u64,
    /// Bytes Marmot's own tables take in the database file, with their indexes, per table
    /// (largest first): the versions (tombstones of deleted rows included), the log, …
    pub shadow_tables: Vec<ShadowTable>,
    /// Rows in `__marmot__versions`: one per replicated row, deleted ones included.
    pub version_rows: u64,
    /// Of those, tombstones (versions of deleted rows) held now.
    pub tombstones: u64,
    /// Tombstones removed after `tombstone_retention` so far.
    pub tombstones_collected: u64,
    /// Entries in the conflict journal (`marmot conflicts` lists them).
    pub conflicts: u64,
    /// Tombstones versioned before this time (ms since the epoch) were removed (0: none).
    pub tombstone_horizon_ms: u64,
    /// The last `marmot verify` this node heard of: 0 identical, 1 the nodes differed,
    /// 2 inconclusive; `None` when none ran.
    pub verify_result: Option<u64>,
    /// When it ended (ms since the epoch; 0: none).
    pub verify_at_ms: u64,
    /// Per table, rows whose primary key holds NULL: not replicated.
    pub null_key_rows: Vec<NullKeyRows>,
    /// How far this node's clock (the highest version produced or applied) is ahead of
    /// its wall clock, in milliseconds.
    pub clock_ahead_ms: u64,
    /// How far ahead of this node's wall clock the last remote batch applied was, in ms.
    pub remote_ahead_ms: u64,
    /// `max_clock_skew`, in ms (0 = never warn).
    pub max_clock_skew_ms: u64,
    /// Bytes free on the file system that holds the database (for the node's user); when
    /// it is full, applying pauses until space is freed.
    pub db_free_bytes: Option<u64>,
    /// Since when (ms since the epoch) the node waits for a snapshot that covers what the
    /// streams dropped; 0 when it does not wait.
    pub waiting_for_snapshot_since_ms: u64,
    /// The NATS side.
    pub nats: NatsStatus,
    /// Per shard.
    pub shards: Vec<ShardStatus>,
}

/// A table that is not replicated.
#[derive(Debug, Serialize)]
pub struct Skipped {
    /// The table.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// One of Marmot's tables and the bytes it takes.
#[derive(Debug, Serialize)]
pub struct ShadowTable {
    /// The table.
    pub name: String,
    /// Bytes of its pages and its indexes' pages.
    pub bytes: u64,
}

/// A table with rows whose key holds NULL.
#[derive(Debug, Serialize)]
pub struct NullKeyRows {
    /// The table.
    pub table: String,
    /// How many rows.
    pub rows: u64,
}

/// One row of `__marmot__parked`.
#[derive(Debug, Serialize)]
pub struct Parked {
    /// Its id in `__marmot__parked`.
    pub id: i64,
    /// The shard it came from.
    pub shard: u32,
    /// Its position there.
    pub position: u64,
    /// Why it could not be applied.
    pub error: String,
}

/// Whether NATS was reached.
#[derive(Debug, Serialize)]
pub struct NatsStatus {
    /// The URLs tried.
    pub urls: Vec<String>,
    /// Whether the node runs the embedded server.
    pub embedded: bool,
    /// Whether the streams could be read.
    pub reachable: bool,
    /// Why not, when not.
    pub note: Option<String>,
}

/// One shard.
#[derive(Debug, Serialize)]
pub struct ShardStatus {
    /// Shard number.
    pub shard: u32,
    /// Its stream.
    pub stream: String,
    /// The position stored in the database: everything up to it is processed.
    pub position: u64,
    /// The stream's first entry still held (when NATS was reached).
    pub first: Option<u64>,
    /// The stream's last entry (when NATS was reached).
    pub last: Option<u64>,
    /// Entries beyond the stored position (when NATS was reached).
    pub lag_entries: Option<u64>,
}

/// Prints the status of the node `config` describes.
pub async fn run(config: &Config, json: bool, timeout: Duration) -> Result<(), String> {
    let mut status = read_database(config)?;
    read_streams(config, &mut status, timeout).await;
    if json {
        let text = serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

/// Everything the database says, without touching NATS.
pub fn read_database(config: &Config) -> Result<Status, String> {
    let conn = open_readonly(&config.db_path)?;
    let mut schema = Schema::read(&conn).map_err(|e| format!("reading the schema: {e}"))?;
    schema.select(&config.replication.selection());
    let installed = capture_installed(&conn)?;
    let mut status = Status {
        node_id: config.node_id,
        db_path: config.db_path.display().to_string(),
        capture_installed: installed,
        tables: schema.tables.iter().map(|t| t.name.clone()).collect(),
        skipped: schema.skipped.iter().map(|s| Skipped { name: s.name.clone(), reason: s.reason.clone() }).collect(),
        schema_fingerprint: format!(
            "{:016x}",
            marmot_core::sqlite::schema_fingerprint(&conn).map_err(|e| format!("reading the schema: {e}"))?
        ),
        schema_changes_pending: 0,
        excluded_rows: 0,
        pending_changes: 0,
        last_local_hlc: 0,
        published_hlc: 0,
        parked_batches: 0,
        parked: Vec::new(),
        aside_rows: 0,
        shadow_tables: Vec::new(),
        version_rows: 0,
        tombstones: 0,
        tombstones_collected: 0,
        conflicts: 0,
        tombstone_horizon_ms: 0,
        verify_result: None,
        verify_at_ms: 0,
        null_key_rows: Vec::new(),
        clock_ahead_ms: 0,
        remote_ahead_ms: 0,
        max_clock_skew_ms: config.max_clock_skew_ms,
        waiting_for_snapshot_since_ms: 0,
        db_free_bytes: free_bytes(&config.db_path),
        nats: NatsStatus { urls: Vec::new(), embedded: config.embedded_nats(), reachable: false, note: None },
        shards: Vec::new(),
    };
    let positions = if installed { read_bookkeeping(&conn, &mut status)? } else { Default::default() };
    if installed {
        let null_keys = null_key_rows(&conn, &schema).map_err(|e| e.to_string())?;
        status.null_key_rows = null_keys.into_iter().map(|(table, rows)| NullKeyRows { table, rows }).collect();
    }
    status.shards = (0..config.replication_log.shards)
        .map(|shard| ShardStatus {
            shard,
            stream: format!("{}-{shard}", config.nats.stream_prefix),
            position: positions.get(&shard).copied().unwrap_or(0),
            first: None,
            last: None,
            lag_entries: None,
        })
        .collect();
    Ok(status)
}

/// Marmot's tables with the bytes their pages and their indexes' pages take (SQLite's
/// `dbstat`; reads every page of them, so it costs about a scan of the shadow tables).
fn shadow_tables(conn: &Connection) -> rusqlite::Result<Vec<ShadowTable>> {
    let mut stmt = conn.prepare(
        "SELECT m.tbl_name, sum(d.pgsize) AS bytes FROM dbstat d JOIN sqlite_master m ON m.name = d.name \
         WHERE substr(m.tbl_name, 1, 10) = '__marmot__' GROUP BY m.tbl_name ORDER BY bytes DESC, m.tbl_name",
    )?;
    let rows = stmt.query_map([], |r| Ok(ShadowTable { name: r.get(0)?, bytes: r.get::<_, i64>(1)? as u64 }))?;
    rows.collect()
}

/// Bytes available to unprivileged users on the file system holding `path`.
fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn read_bookkeeping(conn: &Connection, status: &mut Status) -> Result<std::collections::BTreeMap<u32, u64>, String> {
    let sql_err = |what: &str, e: rusqlite::Error| format!("reading {what}: {e}");
    let (published, local) = published_and_local(conn)?;
    status.published_hlc = published;
    status.last_local_hlc = local;
    let count = |sql: &str, what: &str| {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(|e| sql_err(what, e))
    };
    status.pending_changes = conn
        .query_row("SELECT count(*) FROM __marmot__log WHERE hlc > ?1", [published as i64], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .map_err(|e| sql_err("__marmot__log", e))?;
    status.parked_batches = count("SELECT count(*) FROM __marmot__parked", "__marmot__parked")?;
    status.excluded_rows = count(
        "SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'rows_excluded'), 0)",
        "__marmot__state",
    )?;
    // Databases installed by an earlier version have no schema queue until marmot runs.
    if count("SELECT count(*) FROM sqlite_master WHERE name = '__marmot__ddl_out'", "sqlite_master")? > 0 {
        status.schema_changes_pending = count("SELECT count(*) FROM __marmot__ddl_out", "__marmot__ddl_out")?;
    }
    let clock = count(
        "SELECT max(hlc, coalesce((SELECT max(hlc) FROM __marmot__log), 0)) FROM __marmot__clock WHERE id = 0",
        "__marmot__clock",
    )?;
    status.clock_ahead_ms = marmot_core::Hlc(clock).millis().saturating_sub(now_ms());
    status.remote_ahead_ms = count(
        "SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'remote_ahead_ms'), 0)",
        "__marmot__state",
    )?;
    status.waiting_for_snapshot_since_ms = count(
        "SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'waiting_for_snapshot_since_ms'), 0)",
        "__marmot__state",
    )?;
    status.aside_rows = count("SELECT count(*) FROM __marmot__aside", "__marmot__aside")?;
    status.version_rows = count("SELECT count(*) FROM __marmot__versions", "__marmot__versions")?;
    status.tombstones = count("SELECT count(*) FROM __marmot__versions WHERE deleted = 1", "__marmot__versions")?;
    status.tombstones_collected = count(
        "SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'tombstones_collected'), 0)",
        "__marmot__state",
    )?;
    // Absent until a Marmot that keeps the journal has started on this database.
    status.conflicts = count("SELECT count(*) FROM __marmot__conflicts", "__marmot__conflicts").unwrap_or(0);
    status.tombstone_horizon_ms = marmot_core::Hlc(count(
        "SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'tombstone_horizon'), 0)",
        "__marmot__state",
    )?)
    .millis();
    status.verify_at_ms =
        count("SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'verify_at_ms'), 0)", "__marmot__state")?;
    if status.verify_at_ms > 0 {
        status.verify_result = Some(count(
            "SELECT coalesce((SELECT value FROM __marmot__state WHERE key = 'verify_result'), 0)",
            "__marmot__state",
        )?);
    }
    status.shadow_tables = shadow_tables(conn).map_err(|e| sql_err("dbstat", e))?;
    let mut stmt = conn
        .prepare("SELECT id, shard, position, error FROM __marmot__parked ORDER BY id LIMIT ?1")
        .map_err(|e| sql_err("__marmot__parked", e))?;
    status.parked = stmt
        .query_map([PARKED_LISTED_MAX as i64], |r| {
            Ok(Parked { id: r.get(0)?, shard: r.get(1)?, position: r.get::<_, i64>(2)? as u64, error: r.get(3)? })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| sql_err("__marmot__parked", e))?;
    let mut stmt = conn
        .prepare("SELECT shard, position FROM __marmot__positions")
        .map_err(|e| sql_err("__marmot__positions", e))?;
    let positions = stmt
        .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64)))
        .and_then(|rows| rows.collect())
        .map_err(|e| sql_err("__marmot__positions", e))?;
    Ok(positions)
}

/// Fills in the stream bounds, or a note saying why they are missing.
async fn read_streams(config: &Config, status: &mut Status, timeout: Duration) {
    let target = NatsTarget::of(config);
    status.nats.urls = target.urls();
    if let NatsTarget::EmbeddedUnknown(conf) = &target {
        status.nats.note = Some(format!(
            "this node runs the embedded nats-server, which has not been started here ({} missing)",
            conf.display()
        ));
        return;
    }
    if let NatsTarget::Embedded(url) = &target {
        if !listening(url, timeout).await {
            status.nats.note =
                Some(format!("the embedded nats-server at {url} is not running (it runs while marmot does)"));
            return;
        }
    }
    let transport = match connect(config, target.urls(), "status", Some(timeout)).await {
        Ok(t) => t,
        Err(e) => {
            let hint = match target {
                NatsTarget::Embedded(_) => " (is marmot running? its embedded server stops with it)",
                _ => "",
            };
            status.nats.note = Some(format!("{e}{hint}"));
            return;
        }
    };
    status.nats.reachable = true;
    for s in &mut status.shards {
        match transport.bounds(Shard(s.shard)).await {
            Ok(b) => {
                s.first = Some(b.first.0);
                s.last = Some(b.last.0);
                s.lag_entries = Some(b.last.0.saturating_sub(s.position));
            }
            Err(e) => {
                status.nats.note = Some(format!("stream {}: {e}", s.stream));
            }
        }
    }
}

/// Whether something accepts TCP connections at `nats://host:port`.
async fn listening(url: &str, timeout: Duration) -> bool {
    let addr = url.trim_start_matches("nats://").to_owned();
    let probe = tokio::net::TcpStream::connect(addr);
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(_)))
}

/// `bytes` in MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The human-readable form.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "node {}  ({})", s.node_id, s.db_path);
    if !s.capture_installed {
        let _ = writeln!(o, "capture: not installed (marmot has not run on this database yet)");
    }
    let _ = writeln!(o, "tables replicated: {}", list(&s.tables));
    for t in &s.skipped {
        let _ = writeln!(o, "table skipped: {} ({})", t.name, t.reason);
    }
    if s.excluded_rows > 0 {
        let _ = writeln!(o, "rows from other nodes in tables not replicated here, passed over: {}", s.excluded_rows);
    }
    let _ = writeln!(
        o,
        "schema: fingerprint {} (equal on nodes with equal schemas), {} change(s) waiting to be published",
        s.schema_fingerprint, s.schema_changes_pending
    );
    let _ = writeln!(
        o,
        "local changes pending publication: {}  (last local version {}, published through {})",
        s.pending_changes,
        hlc(s.last_local_hlc),
        hlc(s.published_hlc)
    );
    if let Some(free) = s.db_free_bytes {
        let full = if free < DISK_NEARLY_FULL_BYTES {
            "  DISK FULL: applying remote changes pauses until space is freed (nothing is lost)"
        } else {
            ""
        };
        let _ = writeln!(o, "database disk: {} MiB free{full}", free / (1024 * 1024));
    }
    if s.waiting_for_snapshot_since_ms > 0 {
        let waited = now_ms().saturating_sub(s.waiting_for_snapshot_since_ms) / 1000;
        let _ = writeln!(
            o,
            "WAITING FOR A SNAPSHOT for {waited} s: the streams no longer hold what this node missed and no stored \
             snapshot covers it; the cluster was asked for one (see docs/snapshots.md)"
        );
    }
    let _ = writeln!(o, "parked batches: {}", s.parked_batches);
    for p in &s.parked {
        let _ = writeln!(o, "  #{} shard {} position {}: {}", p.id, p.shard, p.position, p.error);
    }
    let _ = writeln!(o, "set-aside rows: {}", s.aside_rows);
    if !s.shadow_tables.is_empty() {
        let total: u64 = s.shadow_tables.iter().map(|t| t.bytes).sum();
        let parts: Vec<String> = s
            .shadow_tables
            .iter()
            .take(4)
            .map(|t| format!("{} {}", t.name.trim_start_matches("__marmot__"), mib(t.bytes)))
            .collect();
        let per_row =
            total.checked_div(s.version_rows).map(|b| format!(", {b} B per versioned row")).unwrap_or_default();
        let _ = writeln!(
            o,
            "shadow tables: {} ({}; {} versioned rows{per_row})",
            mib(total),
            parts.join(", "),
            s.version_rows
        );
    }
    if s.version_rows > 0 || s.tombstones_collected > 0 {
        let horizon = match s.tombstone_horizon_ms {
            0 => String::new(),
            h => format!("; older than {} s ago removed", now_ms().saturating_sub(h) / 1000),
        };
        let _ = writeln!(o, "tombstones: {} held, {} collected{horizon}", s.tombstones, s.tombstones_collected);
    }
    if s.conflicts > 0 {
        let _ = writeln!(o, "conflicts: {} writes lost to concurrent ones (marmot conflicts lists them)", s.conflicts);
    }
    if let Some(code) = s.verify_result {
        let what = match code {
            0 => "identical",
            1 => "the nodes DIFFER (run marmot verify for the keys)",
            _ => "inconclusive",
        };
        let _ = writeln!(o, "last verify: {what}, {} s ago", now_ms().saturating_sub(s.verify_at_ms) / 1000);
    }
    for n in &s.null_key_rows {
        let _ = writeln!(o, "rows not replicated (NULL in the primary key): {} in {}", n.rows, n.table);
    }
    let skewed = s.max_clock_skew_ms > 0 && s.clock_ahead_ms.max(s.remote_ahead_ms) > s.max_clock_skew_ms;
    let _ = writeln!(
        o,
        "clock: {} ms ahead of the wall clock; last remote batch {} ms ahead{}",
        s.clock_ahead_ms,
        s.remote_ahead_ms,
        if skewed { "  (more than max_clock_skew: check NTP on every node; see docs/operations.md)" } else { "" }
    );
    let how = if s.nats.embedded { "embedded server" } else { "nats.urls" };
    let state = if s.nats.reachable { "reachable" } else { "not reached" };
    let _ = writeln!(o, "NATS ({how}): {} {state}", list(&s.nats.urls));
    if let Some(note) = &s.nats.note {
        let _ = writeln!(o, "  note: {note}");
    }
    let _ = writeln!(o, "{:<6} {:<24} {:>10} {:>10} {:>10}", "shard", "stream", "position", "last", "behind");
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for sh in &s.shards {
        let _ = writeln!(
            o,
            "{:<6} {:<24} {:>10} {:>10} {:>10}",
            sh.shard,
            sh.stream,
            sh.position,
            opt(sh.last),
            opt(sh.lag_entries)
        );
    }
    o
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

/// A version as `ms.counter` (0 as `-`).
fn hlc(v: u64) -> String {
    if v == 0 {
        "-".to_owned()
    } else {
        marmot_core::Hlc(v).to_string()
    }
}
