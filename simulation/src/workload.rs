//! The workload: the SQL an application runs for each [`WriteOp`] and each group
//! transaction, and the reading of what capture logged for it into the model's writes.

use marmot_core::{Hlc, NodeId, Value, Version};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use crate::counters::Counters;
use crate::model::Write;
use crate::scenario::WriteOp;
use crate::schema;
use crate::world::Failure;

/// What the application sees of its schema, which migrations change: whether `items` has
/// `extra`, whether `late` exists, what `names`' value column is called.
#[derive(Clone, Copy, Debug)]
pub struct SchemaView {
    /// `items.extra` exists.
    pub extra: bool,
    /// `late` exists.
    pub late: bool,
    /// The name of `names`' second column (`v`, or `value` once renamed).
    pub names_value: &'static str,
}

impl SchemaView {
    /// Reads the view from the application's connection.
    pub fn read(app: &Connection) -> rusqlite::Result<SchemaView> {
        let has = |sql: &str| app.query_row(sql, [], |r| r.get::<_, i64>(0)).map(|n| n > 0);
        Ok(SchemaView {
            extra: has("SELECT count(*) FROM pragma_table_info('items') WHERE name = 'extra'")?,
            late: has("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'late'")?,
            names_value: if has("SELECT count(*) FROM pragma_table_info('names') WHERE name = 'value'")? {
                "value"
            } else {
                "v"
            },
        })
    }
}

/// Runs one statement against the schema the application sees (`view`). Returns the
/// number of rows changed.
pub fn run_op(app: &Connection, op: &WriteOp, view: SchemaView) -> rusqlite::Result<usize> {
    match op {
        WriteOp::UpsertItem { id, name, qty, price, data, val } if view.extra => app.execute(
            "INSERT INTO items(id, name, qty, price, data, val, extra) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?2 || '+') \
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, qty = excluded.qty, price = excluded.price, data = excluded.data, val = excluded.val, extra = excluded.extra",
            params![id, name, qty, price, data, val],
        ),
        WriteOp::UpsertItem { id, name, qty, price, data, val } => app.execute(
            "INSERT INTO items(id, name, qty, price, data, val) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT(id) DO UPDATE SET name = excluded.name, qty = excluded.qty, price = excluded.price, data = excluded.data, val = excluded.val",
            params![id, name, qty, price, data, val],
        ),
        WriteOp::UpdateItemVal { id, val } => app.execute("UPDATE items SET val = ?2 WHERE id = ?1", params![id, val]),
        WriteOp::MoveItem { from, to } => app.execute("UPDATE items SET id = ?2 WHERE id = ?1", params![from, to]),
        WriteOp::DeleteItem { id } => app.execute("DELETE FROM items WHERE id = ?1", [id]),
        WriteOp::UpsertOrder { key, ab, u } => app.execute(
            r#"INSERT INTO "order"("key", "a ""b""", "ü") VALUES (?1, ?2, ?3) ON CONFLICT("key", "a ""b""") DO UPDATE SET "ü" = excluded."ü""#,
            params![key, ab, u],
        ),
        WriteOp::DeleteOrder { key, ab } => app.execute(r#"DELETE FROM "order" WHERE "key" = ?1 AND "a ""b""" = ?2"#, params![key, ab]),
        WriteOp::UpsertUser { id, email, name } => app.execute(
            "INSERT INTO users(id, email, name) VALUES (?1, ?2, ?3) ON CONFLICT(id) DO UPDATE SET email = excluded.email, name = excluded.name",
            params![id, email, name],
        ),
        WriteOp::SetEmail { id, email } => app.execute("UPDATE users SET email = ?2 WHERE id = ?1", params![id, email]),
        WriteOp::DeleteUser { id } => app.execute("DELETE FROM users WHERE id = ?1", [id]),
        WriteOp::ReplaceUser { id, email, name } => {
            app.execute("INSERT OR REPLACE INTO users(id, email, name) VALUES (?1, ?2, ?3)", params![id, email, name])
        }
        WriteOp::ReplaceEmail { id, email } => {
            app.execute("UPDATE OR REPLACE users SET email = ?2 WHERE id = ?1", params![id, email])
        }
        WriteOp::IgnoreUser { id, email } => {
            app.execute("INSERT OR IGNORE INTO users(id, email) VALUES (?1, ?2)", params![id, email])
        }
        WriteOp::UpsertName { k, v } => app.execute(
            &format!(
                "INSERT INTO names(k, {c}) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET {c} = excluded.{c}",
                c = view.names_value
            ),
            params![k, v],
        ),
        WriteOp::RenameName { from, to } => app.execute("UPDATE names SET k = ?2 WHERE k = ?1", params![from, to]),
        WriteOp::DeleteName { k } => app.execute("DELETE FROM names WHERE k = ?1", [k]),
        WriteOp::ReplaceNum { k, v } => app.execute("REPLACE INTO nums(k, v) VALUES (?1, ?2)", params![k, v]),
        WriteOp::DeleteNum { k } => app.execute("DELETE FROM nums WHERE k = ?1", [k]),
        WriteOp::SetHandle { id, handle } => app.execute(
            "INSERT INTO handles(id, handle) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET handle = excluded.handle",
            params![id, handle],
        ),
        WriteOp::UpsertNk { k, v } => app.execute(
            "INSERT INTO nk(k, v) VALUES (?1, ?2) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            params![k, v],
        ),
        WriteOp::UpdateNk { v } => app.execute("UPDATE nk SET v = ?1", [v]),
        WriteOp::NullNk { k } => app.execute("UPDATE nk SET k = NULL WHERE k = ?1", [k]),
        WriteOp::UpsertLate { .. } if !view.late => Ok(0),
        WriteOp::UpsertLate { id, v } => app.execute(
            "INSERT INTO late(id, v) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET v = excluded.v",
            params![id, v],
        ),
    }
}

/// Counts one statement of kind `op` that changed `rows` rows.
fn count_op(counters: &mut Counters, op: &WriteOp, rows: usize) {
    let kind = match op {
        WriteOp::UpsertItem { .. } => &mut counters.op_upsert_item,
        WriteOp::UpdateItemVal { .. } => &mut counters.op_update_item_val,
        WriteOp::MoveItem { .. } => {
            counters.pk_moves += rows as u64;
            &mut counters.op_move_item
        }
        WriteOp::DeleteItem { .. } => &mut counters.op_delete_item,
        WriteOp::UpsertOrder { .. } => &mut counters.op_upsert_order,
        WriteOp::DeleteOrder { .. } => &mut counters.op_delete_order,
        WriteOp::UpsertUser { .. } => &mut counters.op_upsert_user,
        WriteOp::SetEmail { .. } => &mut counters.op_set_email,
        WriteOp::DeleteUser { .. } => &mut counters.op_delete_user,
        WriteOp::ReplaceUser { .. } => &mut counters.op_replace_user,
        WriteOp::ReplaceEmail { .. } => &mut counters.op_replace_email,
        WriteOp::IgnoreUser { .. } => &mut counters.op_ignore_user,
        WriteOp::UpsertName { .. } => &mut counters.op_upsert_name,
        WriteOp::RenameName { .. } => &mut counters.op_rename_name,
        WriteOp::DeleteName { .. } => &mut counters.op_delete_name,
        WriteOp::ReplaceNum { .. } => &mut counters.op_replace_num,
        WriteOp::DeleteNum { .. } => &mut counters.op_delete_num,
        WriteOp::SetHandle { .. } => &mut counters.op_set_handle,
        WriteOp::UpsertNk { k: None, .. } => &mut counters.null_key_inserts,
        WriteOp::UpsertNk { .. } => &mut counters.op_upsert_nk,
        WriteOp::UpdateNk { .. } => &mut counters.op_update_nk,
        WriteOp::NullNk { .. } => &mut counters.op_null_nk,
        WriteOp::UpsertLate { .. } => &mut counters.op_upsert_late,
    };
    *kind += 1;
}

/// For a REPLACE statement on `users`, how many rows the table would hold afterwards if
/// SQLite displaced none (the difference to the real count is what REPLACE deleted).
fn users_expected_after(app: &Connection, op: &WriteOp) -> rusqlite::Result<Option<i64>> {
    let (WriteOp::ReplaceUser { id, .. } | WriteOp::ReplaceEmail { id, .. }) = op else { return Ok(None) };
    let n: i64 = app.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
    let exists: bool = app.query_row("SELECT EXISTS (SELECT 1 FROM users WHERE id = ?1)", [id], |r| r.get(0))?;
    Ok(Some(match op {
        WriteOp::ReplaceUser { .. } if !exists => n + 1,
        _ => n,
    }))
}

/// Commits `ops` as one transaction, as an application would: a statement that violates a
/// local constraint is rolled back to its savepoint and the rest commits. Returns how many
/// statements took effect.
pub fn transaction(app: &Connection, ops: &[WriteOp], counters: &mut Counters) -> Result<usize, Failure> {
    let sql = |what: &'static str| move |e: rusqlite::Error| Failure(format!("{what}: {e}"));
    app.execute_batch("BEGIN IMMEDIATE").map_err(sql("begin"))?;
    let view = SchemaView::read(app).map_err(sql("reading the schema"))?;
    let mut done = 0;
    for op in ops {
        app.execute_batch("SAVEPOINT op").map_err(sql("savepoint"))?;
        let users_before = users_expected_after(app, op).map_err(sql("counting users"))?;
        match run_op(app, op, view) {
            Ok(rows) => {
                done += 1;
                count_op(counters, op, rows);
                if let Some(expected) = users_before {
                    let after: i64 =
                        app.query_row("SELECT count(*) FROM users", [], |r| r.get(0)).map_err(sql("counting users"))?;
                    counters.replace_displacements += expected.saturating_sub(after) as u64;
                }
            }
            Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == ErrorCode::ConstraintViolation => {
                app.execute_batch("ROLLBACK TO op").map_err(sql("rollback"))?;
                count_op(counters, op, 0);
                counters.constraint_rollbacks += 1;
            }
            Err(e) => return Err(Failure(format!("{op:?}: {e}"))),
        }
        app.execute_batch("RELEASE op").map_err(sql("release"))?;
    }
    app.execute_batch("COMMIT").map_err(sql("commit"))?;
    Ok(done)
}

/// Commits group `grp`: `size` rows in `groups` and its row in `group_tags`, in one
/// transaction spanning both tables. The atomicity oracle
/// ([`crate::oracle::check_atomicity`]) requires every node to show all of them or none.
pub fn group(app: &Connection, grp: i64, size: u8) -> Result<(), Failure> {
    let sql = |what: &'static str| move |e: rusqlite::Error| Failure(format!("{what}: {e}"));
    app.execute_batch("BEGIN").map_err(sql("begin"))?;
    for k in 0..size as i64 {
        app.execute("INSERT INTO groups(gid, grp, size) VALUES (?1, ?2, ?3)", params![grp + k, grp, size])
            .map_err(sql("group insert"))?;
    }
    app.execute("INSERT INTO group_tags(grp, size, tag) VALUES (?1, ?2, ?3)", params![grp, size, format!("g{grp}")])
        .map_err(sql("group tag insert"))?;
    app.execute_batch("COMMIT").map_err(sql("commit"))
}

/// Appends to `writes` what capture logged on `app` after `log_seen` (the node's last
/// transactions), and moves `log_seen` past it. `node` is the origin's id. The log holds
/// the written rows' keys; the model takes each row's values as they are now, right after
/// the transaction (a row written twice in it ends with its last image at both versions,
/// which the model resolves to the same outcome).
pub fn record_writes(
    app: &Connection,
    node: NodeId,
    log_seen: &mut u64,
    writes: &mut Vec<Write>,
) -> Result<(), Failure> {
    let err = |e: rusqlite::Error| Failure(format!("reading the log: {e}"));
    // The name first: the log may gain columns between preparing and stepping (a schema
    // change re-prepares the statement), so its width is read per row.
    let mut stmt = app
        .prepare("SELECT t.name, l.* FROM __marmot__log l JOIN __marmot__tables t ON t.id = l.tbl WHERE l.hlc > ?1 ORDER BY l.hlc")
        .map_err(err)?;
    let rows: Vec<(u64, Vec<Value>, String)> = stmt
        .query_map([*log_seen as i64], |r| {
            let ncols = r.as_ref().column_count();
            let values = (4..ncols).map(|c| r.get_ref(c).map(Value::from)).collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((r.get::<_, i64>(1)? as u64, values, r.get(0)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(err)?;
    for (hlc, values, table) in rows {
        *log_seen = (*log_seen).max(hlc);
        let t = schema::table(&table).ok_or_else(|| Failure(format!("captured unknown table {table}")))?;
        let pk: Vec<Value> = values.into_iter().take(t.pk.len()).collect();
        let image = current_image(app, t, &pk).map_err(err)?.map(|mut image| {
            image.truncate(t.width);
            image
        });
        let version = Version { hlc: Hlc(hlc), node };
        writes.push(Write { table, pk, version, image });
    }
    Ok(())
}

/// The row of `t` whose key is `pk`, all its columns, if it exists.
fn current_image(app: &Connection, t: &schema::Table, pk: &[Value]) -> rusqlite::Result<Option<Vec<Value>>> {
    let names: Vec<String> = app
        .prepare(&format!("SELECT name FROM pragma_table_info('{}') ORDER BY cid", t.name))?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let matches: Vec<String> =
        t.pk.iter().enumerate().map(|(n, &c)| format!("{} = ?{}", quote(&names[c]), n + 1)).collect();
    let sql = format!("SELECT * FROM {} WHERE {}", quote(t.name), matches.join(" AND "));
    app.query_row(&sql, rusqlite::params_from_iter(pk), |r| {
        (0..names.len()).map(|i| r.get_ref(i).map(Value::from)).collect::<rusqlite::Result<Vec<_>>>()
    })
    .optional()
}
