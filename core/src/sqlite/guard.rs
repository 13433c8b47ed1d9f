//! The apply guard: on a replica, application triggers must not write replicated tables.
//!
//! A replicated table's content depends only on the writes made on the origins. What an
//! application trigger writes into a replicated table on the origin is captured there and
//! travels in the same batch; when the merge applies that batch on a replica, the same
//! trigger fires again and would write a second time (an audit row doubled, an
//! `updated_at` stamped with the replica's clock, a counter incremented twice).
//!
//! So every connection of Marmot carries TEMP triggers — invisible to the application's
//! connections, no cost on its write path — on every replicated table. Before each write
//! to a table that has application triggers, the merge *arms* the guard with the table and
//! key it is about to write (`temp.__marmot__arm`); a write to any other row, or a second
//! write after the armed one happened, is skipped with `RAISE(IGNORE)`. SQLite fires TEMP
//! triggers before the schema's own, so the merge's write is let through and disarms the
//! guard (`tbl = -1`: everything blocked) before any application trigger runs. After the
//! statement the guard is idle again (`tbl` NULL: nothing blocked), which is also how the
//! merge writes tables without application triggers, at almost no cost. What application triggers write into tables that are not
//! replicated (an FTS5 index, a local cache) is untouched and still happens on every node.

use rusqlite::Connection;

use super::schema::{quote, Schema, PREFIX};
use crate::error::{Result, SqlContext};

/// (Re)creates the guard on `conn` for the replicated tables of `schema`, whose ids are
/// given by `id_of`.
pub(super) fn install(conn: &Connection, schema: &Schema, id_of: impl Fn(&str) -> Option<i64>) -> Result<()> {
    let mut sql = String::from("DROP TABLE IF EXISTS temp.__marmot__arm;\n");
    let old: Vec<String> = conn
        .prepare("SELECT name FROM temp.sqlite_master WHERE type = 'trigger' AND substr(name, 1, 10) = ?1")
        .and_then(|mut s| s.query_map([PREFIX], |r| r.get(0))?.collect())
        .ctx(|| "listing guard triggers".into())?;
    for name in old {
        sql.push_str(&format!("DROP TRIGGER IF EXISTS temp.{};\n", quote(&name)));
    }
    conn.execute_batch(&sql).ctx(|| "removing the apply guard".into())?;
    remove_orphans(conn)?;
    let mut sql = String::new();
    let width = schema.tables.iter().map(|t| t.pk.len()).max().unwrap_or(0);
    let keys: String = (0..width).map(|n| format!(", k{n}")).collect();
    sql.push_str(&format!(
        "CREATE TEMP TABLE __marmot__arm(tbl{keys});\nINSERT INTO temp.__marmot__arm(tbl) VALUES (NULL);\n"
    ));
    for t in &schema.tables {
        let Some(id) = id_of(&t.name) else { continue };
        let armed = |row: &str| {
            let keys: String =
                t.pk.iter()
                    .zip(&t.pk_collations)
                    .enumerate()
                    .map(|(n, (&i, c))| format!(" AND {row}.{} IS k{n} COLLATE {}", quote(&t.columns[i]), c.sql()))
                    .collect();
            format!("EXISTS (SELECT 1 FROM temp.__marmot__arm WHERE tbl = {id}{keys})")
        };
        let table = format!("main.{}", quote(&t.name));
        let name = |what: &str| quote(&format!("{PREFIX}guard__{id}__{what}"));
        let disarm = "UPDATE __marmot__arm SET tbl = -1;";
        // Idle (`tbl` NULL): nothing to check.
        let active = "WHEN (SELECT tbl FROM temp.__marmot__arm) IS NOT NULL";
        sql.push_str(&format!(
            "CREATE TEMP TRIGGER {} BEFORE INSERT ON {table} {active} AND NOT {} BEGIN SELECT RAISE(IGNORE); END;\n\
             CREATE TEMP TRIGGER {} AFTER INSERT ON {table} {active} BEGIN {disarm} END;\n\
             CREATE TEMP TRIGGER {} BEFORE UPDATE ON {table} {active} BEGIN SELECT RAISE(IGNORE) WHERE NOT {}; {disarm} END;\n\
             CREATE TEMP TRIGGER {} BEFORE DELETE ON {table} {active} BEGIN SELECT RAISE(IGNORE) WHERE NOT {}; {disarm} END;\n",
            name("bi"),
            armed("NEW"),
            name("ai"),
            name("bu"),
            armed("NEW"),
            name("bd"),
            armed("OLD"),
        ));
    }
    conn.execute_batch(&sql).ctx(|| "installing the apply guard".into())
}

/// Removes guard triggers `DROP TRIGGER` left behind: a TEMP trigger whose table another
/// connection dropped (the application rebuilding a table) stays in `temp.sqlite_master`
/// though SQLite no longer finds it to drop, and would come back on the next schema load.
fn remove_orphans(conn: &Connection) -> Result<()> {
    let left: i64 = conn
        .query_row(
            "SELECT count(*) FROM temp.sqlite_master WHERE type = 'trigger' AND substr(name, 1, 10) = ?1",
            [PREFIX],
            |r| r.get(0),
        )
        .ctx(|| "listing guard triggers".into())?;
    if left == 0 {
        return Ok(());
    }
    conn.execute_batch(&format!(
        "PRAGMA writable_schema = ON; \
         DELETE FROM temp.sqlite_master WHERE type = 'trigger' AND substr(name, 1, 10) = '{PREFIX}'; \
         PRAGMA writable_schema = OFF;"
    ))
    .ctx(|| "removing orphaned guard triggers".into())
}
