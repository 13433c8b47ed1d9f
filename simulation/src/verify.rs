//! `marmot verify`'s digests in the simulation: after quiescence every node that
//! replicates every table has the same digests, and a row changed behind capture's back on
//! one node (the divergence `verify` exists to find) shows in exactly one bucket, whose
//! rows name exactly that key.

use marmot_core::sqlite::{BucketRow, Digests};

use crate::world::{Failure, World};

impl World {
    pub(crate) fn check_digests(&mut self) -> Result<(), Failure> {
        let full: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.replicates_all(i)).collect();
        let digests = |w: &World, i: usize| -> Result<Digests, Failure> {
            w.nodes[i].engine.as_ref().expect("engine").db().digests().map_err(|e| Failure(format!("node {i}: {e}")))
        };
        let first = digests(self, full[0])?;
        for &i in &full[1..] {
            let d = digests(self, i)?;
            if d.tables != first.tables {
                return Err(Failure(format!("node {i}'s digests differ from node {}'s after convergence", full[0])));
            }
        }
        // Diverge node full[0] on purpose: one column of the first row of the first table
        // with rows and no application triggers (their writes would change other tables
        // too) gets a value no write made, with capture off.
        let i = full[0];
        let app = &self.nodes[i].app;
        let fail = |e: rusqlite::Error| Failure(format!("diverging node {i}: {e}"));
        let mut chosen = None;
        for t in first.tables.iter().filter(|t| t.rows > 0) {
            let triggers: i64 = app
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?1 \
                     AND substr(name, 1, 10) != '__marmot__'",
                    [&t.table],
                    |r| r.get(0),
                )
                .map_err(fail)?;
            if triggers > 0 {
                continue;
            }
            // A row whose key holds no NULL (others are not replicated, nor in digests).
            let keys: Vec<String> = app
                .prepare(&format!("SELECT name FROM pragma_table_info('{}') WHERE pk > 0", t.table))
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(fail)?;
            let not_null: Vec<String> = keys.iter().map(|k| format!("\"{k}\" IS NOT NULL")).collect();
            let sql = format!(
                "SELECT rowid FROM \"{}\" WHERE {} ORDER BY rowid LIMIT 1",
                t.table,
                if not_null.is_empty() { "1".to_owned() } else { not_null.join(" AND ") }
            );
            // WITHOUT ROWID tables have no rowid to point at: the next table.
            let Ok(rowid) = app.query_row(&sql, [], |r| r.get::<_, i64>(0)) else {
                continue;
            };
            let columns: Vec<String> = app
                .prepare(&format!("SELECT name FROM pragma_table_info('{}') WHERE pk = 0 ORDER BY cid", t.table))
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(fail)?;
            for column in columns {
                let changed = app.execute_batch(&format!(
                    "SAVEPOINT diverge; UPDATE __marmot__clock SET applying = 1; \
                     UPDATE \"{}\" SET \"{column}\" = x'0d1ff3' WHERE rowid = {rowid}; \
                     UPDATE __marmot__clock SET applying = 0; RELEASE diverge;",
                    t.table
                ));
                if changed.is_ok() {
                    chosen = Some(t.clone());
                    break;
                }
                app.execute_batch("ROLLBACK TO diverge; RELEASE diverge;").map_err(fail)?;
            }
            if chosen.is_some() {
                break;
            }
        }
        let Some(t) = chosen else { return Ok(()) };
        let diverged = digests(self, i)?;
        let (a, b) = (
            first.tables.iter().find(|d| d.table == t.table).expect("table"),
            diverged.tables.iter().find(|d| d.table == t.table).expect("table"),
        );
        let buckets: Vec<usize> = (0..a.buckets.len()).filter(|&k| a.buckets[k] != b.buckets[k]).collect();
        if buckets.len() != 1
            || diverged
                .tables
                .iter()
                .filter(|d| d.table != t.table)
                .ne(first.tables.iter().filter(|d| d.table != t.table))
        {
            return Err(Failure(format!(
                "one row changed on node {i}, yet {} buckets of {} differ",
                buckets.len(),
                t.table
            )));
        }
        let other = full.get(1).copied();
        let rows = |w: &World, n: usize| -> Result<Vec<BucketRow>, Failure> {
            w.nodes[n]
                .engine
                .as_ref()
                .expect("engine")
                .db()
                .bucket_rows(&t.table, buckets[0], &[])
                .map_err(|e| Failure(e.to_string()))
        };
        if let Some(o) = other {
            let (mine, theirs) = (rows(self, i)?, rows(self, o)?);
            let differing: Vec<_> = mine
                .iter()
                .filter(|r| {
                    !theirs.iter().any(|x| format!("{:?}", x.key) == format!("{:?}", r.key) && x.hash == r.hash)
                })
                .collect();
            if differing.len() != 1 {
                return Err(Failure(format!(
                    "the differing bucket of {} names {} keys, not 1",
                    t.table,
                    differing.len()
                )));
            }
        }
        self.counters.divergences_found += 1;
        self.trace.push(format!("node {i}: diverged one row of {}; its digest found it", t.table));
        Ok(())
    }
}
