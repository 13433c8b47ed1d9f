//! The oracles: no node ever shows part of a remote transaction (checked after every step),
//! and after quiescence every node equals the last-writer-wins model of all writes
//! ([`crate::model`]) and every other node.

use marmot_core::sqlite::TableSelection;
use marmot_core::Value;
use rusqlite::{Connection, OptionalExtension};

use crate::model::{self, Dump, Write};
use crate::schema::TABLES;
use crate::world::Failure;

/// A group seen partially: (group, size, rows in `groups`, rows in `group_tags`).
type PartialGroup = (i64, i64, i64, i64);

/// No node ever shows part of a remote transaction: every group transaction
/// ([`crate::workload::group`]) is all there — `size` rows in `groups` and its row in
/// `group_tags` — or not there at all. `node` names the node in the failure.
pub fn check_atomicity(app: &Connection, node: usize) -> Result<(), Failure> {
    let bad: Option<PartialGroup> = app
        .query_row(
            "SELECT grp, size, \
                    (SELECT count(*) FROM groups g WHERE g.grp = s.grp), \
                    (SELECT count(*) FROM group_tags t WHERE t.grp = s.grp) \
             FROM (SELECT grp, size FROM groups UNION SELECT grp, size FROM group_tags) s \
             WHERE (SELECT count(*) FROM groups g WHERE g.grp = s.grp) != size \
                OR (SELECT count(*) FROM group_tags t WHERE t.grp = s.grp) != 1 \
             LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(|e| Failure(format!("atomicity check: {e}")))?;
    match bad {
        Some((grp, size, rows, tags)) => Err(Failure(format!(
            "node {node} shows {rows} of the {size} rows of group {grp} and {tags} of its 1 tag row: \
             a partial transaction"
        ))),
        None => Ok(()),
    }
}

/// Every node equals the last-writer-wins model of `writes` on the columns every node
/// always had, and every node equals node 0 on all columns (migrated ones too); each node
/// on the tables it replicates (node 0 replicates all: [`crate::scenario::Scenario::selections`]).
pub fn check_convergence<'a>(
    writes: &[Write],
    nodes: impl IntoIterator<Item = (&'a Connection, &'a TableSelection)>,
) -> Result<(), Failure> {
    let all = model::expected(writes, TABLES);
    let mut first: Option<Dump> = None;
    for (i, (app, selection)) in nodes.into_iter().enumerate() {
        let selected = |dump: &Dump| -> Dump {
            dump.iter().filter(|(t, _)| selection.selects(t)).map(|(t, rows)| (t.clone(), rows.clone())).collect()
        };
        let expected = selected(&all);
        // The full-text index is not replicated: triggers keep it on every node, replicas
        // included, so it must match the node's own `items`.
        app.execute_batch("INSERT INTO items_fts(items_fts) VALUES ('integrity-check')")
            .map_err(|e| Failure(format!("node {i}: the FTS5 index does not match items: {e}")))?;
        let got = selected(&dump(app).map_err(|e| Failure(format!("dump: {e}")))?);
        let mut original = got.clone();
        for (table, rows) in original.iter_mut() {
            let width = crate::schema::table(table).expect("dumped tables are in TABLES").width;
            for row in rows {
                row.truncate(width);
            }
        }
        if original != expected {
            let diff = describe_diff(&expected, &original);
            let table = expected.iter().find(|(t, rows)| original.get(*t) != Some(rows)).map(|(t, _)| t.clone());
            let history: Vec<String> = writes
                .iter()
                .filter(|w| Some(&w.table) == table.as_ref())
                .map(|w| format!("{}@{}: {:?} -> {:?}", w.version.node, w.version.hlc.0, w.pk, w.image))
                .collect();
            let recent = &history[history.len().saturating_sub(12)..];
            return Err(Failure(format!(
                "node {i} differs from the last-writer-wins model: {diff}\nlast writes to that table (node@hlc: key -> image):\n  {}",
                recent.join("\n  ")
            )));
        }
        match &first {
            None => first = Some(got),
            Some(node0) if selected(node0) != got => {
                let diff = describe_diff(&selected(node0), &got);
                return Err(Failure(format!("node {i} differs from node 0 in a migrated column: {diff}")));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// After quiescence every node has the same schema; when no migration ran twice (no
/// concurrent duplicates to resolve), it is the schema after every migration that ran.
pub fn check_schemas<'a>(runs: &[u32], apps: impl IntoIterator<Item = &'a Connection>) -> Result<(), Failure> {
    let ran = runs.iter().take_while(|&&n| n > 0).count();
    let linear = runs.iter().all(|&n| n <= 1) && runs[ran..].iter().all(|&n| n == 0);
    let mut first: Option<crate::schema::SchemaObjects> = None;
    for (i, app) in apps.into_iter().enumerate() {
        let got = crate::schema::objects(app).map_err(|e| Failure(format!("node {i}: reading the schema: {e}")))?;
        if linear && got != crate::schema::expected_objects(ran) {
            let want = crate::schema::expected_objects(ran);
            let missing: Vec<_> = want.difference(&got).collect();
            let extra: Vec<_> = got.difference(&want).collect();
            return Err(Failure(format!(
                "node {i}'s schema is not the one after migrations 0..{ran}: missing {missing:?}, unexpected {extra:?}"
            )));
        }
        match &first {
            None => first = Some(got),
            Some(node0) if *node0 != got => {
                let missing: Vec<_> = node0.difference(&got).collect();
                let extra: Vec<_> = got.difference(node0).collect();
                return Err(Failure(format!(
                    "node {i}'s schema differs from node 0's: missing {missing:?}, unexpected {extra:?}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The canonical dump of the user tables: rows sorted by primary key, values exact.
pub fn dump(conn: &Connection) -> rusqlite::Result<Dump> {
    let mut out = Dump::new();
    for table in TABLES {
        let sql = format!("SELECT * FROM \"{}\"", table.name);
        let mut stmt = conn.prepare(&sql)?;
        let n = stmt.column_count();
        let mut rows: Vec<Vec<Value>> = stmt
            .query_map([], |r| (0..n).map(|i| r.get_ref(i).map(Value::from)).collect())?
            .collect::<rusqlite::Result<_>>()?;
        // Rows whose key holds NULL are never replicated: they stay on their node.
        rows.retain(|r| table.pk.iter().all(|&i| !r[i].is_null()));
        rows.sort_by_key(|r| table.pk.iter().map(|&i| model::value_key(&r[i])).collect::<Vec<_>>());
        out.insert(table.name.to_owned(), rows);
    }
    Ok(out)
}

/// The first table where `got` differs from `expected`: its missing and unexpected rows.
pub fn describe_diff(expected: &Dump, got: &Dump) -> String {
    for (table, rows) in expected {
        let g = got.get(table).cloned().unwrap_or_default();
        if *rows != g {
            let missing: Vec<_> = rows.iter().filter(|r| !g.contains(r)).collect();
            let extra: Vec<_> = g.iter().filter(|r| !rows.contains(r)).collect();
            return format!("table {table}: missing {missing:?}, unexpected {extra:?}");
        }
    }
    "dumps differ".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::schema::SCHEMA).unwrap();
        crate::workload::group(&conn, 16, 3).unwrap();
        conn
    }

    #[test]
    fn whole_groups_pass_the_atomicity_check() {
        check_atomicity(&node(), 0).expect("a whole group");
    }

    #[test]
    fn a_group_missing_a_row_in_either_table_is_a_partial_transaction() {
        for missing in ["DELETE FROM groups WHERE gid = 17", "DELETE FROM group_tags"] {
            let conn = node();
            conn.execute_batch(missing).unwrap();
            let Failure(m) = check_atomicity(&conn, 2).expect_err(missing);
            assert!(m.contains("node 2") && m.contains("group 16") && m.contains("partial"), "{m}");
        }
        let conn = node();
        conn.execute_batch("DELETE FROM groups").unwrap();
        assert!(check_atomicity(&conn, 0).is_err(), "a tag row without its group rows");
    }
}
