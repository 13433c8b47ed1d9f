//! `marmot conflicts`: the conflict journal — writes last-writer-wins overwrote without
//! their data having been seen by whoever overwrote them (docs/conflicts.md) — newest
//! first, read from the node's database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{capture_installed, open_readonly};
use crate::config::Config;

/// One journal entry as the command prints it.
#[derive(Debug, Serialize)]
struct Entry {
    table: String,
    /// The primary key, a JSON array.
    key: serde_json::Value,
    /// When the losing write was made (its version's clock), UTC.
    at: String,
    loser_version: String,
    loser_node: u64,
    /// The losing row image (a JSON object), `null` when the losing write was a delete.
    loser_image: serde_json::Value,
    winner_version: String,
    winner_node: u64,
}

fn version(hlc: i64, node: i64) -> String {
    format!("{}.{}@{}", (hlc as u64) >> 16, (hlc as u64) & 0xffff, node)
}

/// Prints the journal of the node `config` describes.
pub fn run(
    config: &Config,
    json: bool,
    table: Option<&str>,
    since: Option<Duration>,
    limit: u64,
) -> Result<(), String> {
    let conn = open_readonly(&config.db_path)?;
    if !capture_installed(&conn)? {
        return Err(format!("{}: Marmot has not run on this database yet", config.db_path.display()));
    }
    let journal =
        conn.query_row("SELECT 1 FROM sqlite_master WHERE name = '__marmot__conflicts'", [], |_| Ok(())).is_ok();
    if !journal {
        if !json {
            println!("no conflict journal yet: it is created when a Marmot that keeps one starts on this database");
        }
        return Ok(());
    }
    let since_hlc = match since {
        None => 0,
        Some(d) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            (now.saturating_sub(d).as_millis() as i64) << 16
        }
    };
    let mut stmt = conn
        .prepare(
            "SELECT table_name, key, loser_hlc, loser_node, loser_image, winner_hlc, winner_node, \
             strftime('%Y-%m-%dT%H:%M:%fZ', (loser_hlc >> 16) / 1000.0, 'unixepoch') \
             FROM __marmot__conflicts WHERE (?1 IS NULL OR table_name = ?1) AND loser_hlc >= ?2 \
             ORDER BY loser_hlc DESC, loser_node DESC LIMIT ?3",
        )
        .map_err(|e| format!("reading the conflict journal: {e}"))?;
    let rows = stmt
        .query_map((table, since_hlc, limit as i64), |r| {
            let parse =
                |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or(serde_json::Value::Null);
            Ok(Entry {
                table: r.get(0)?,
                key: parse(r.get(1)?),
                loser_version: version(r.get(2)?, r.get(3)?),
                loser_node: r.get::<_, i64>(3)? as u64,
                loser_image: parse(r.get(4)?),
                winner_version: version(r.get(5)?, r.get(6)?),
                winner_node: r.get::<_, i64>(6)? as u64,
                at: r.get(7)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| format!("reading the conflict journal: {e}"))?;
    if json {
        for e in &rows {
            println!("{}", serde_json::to_string(e).expect("entries serialize"));
        }
        return Ok(());
    }
    if rows.is_empty() {
        println!("no conflicts recorded");
        return Ok(());
    }
    for e in &rows {
        let image = match &e.loser_image {
            serde_json::Value::Null => "(deleted the row)".to_owned(),
            image => image.to_string(),
        };
        println!(
            "{}  {} {}  lost: {} from node {} {}  overwritten by {} from node {}",
            e.at, e.table, e.key, e.loser_version, e.loser_node, image, e.winner_version, e.winner_node
        );
    }
    Ok(())
}
