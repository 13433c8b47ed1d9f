//! What the snapshot end-to-end tests share: the schema and its writers, node
//! configurations with a short replication log and a local-directory snapshot store,
//! one-shot `marmot` runs (`-save-snapshot`), and the store's contents.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use marmot_tests::{create_db, log_tail, marmot_bin, open, poll, Node, NodeConfig, DEADLINE, LOG_TAIL_LINES};

/// A short replication log: the streams keep the last `MAX_ENTRIES` entries per shard.
pub const MAX_ENTRIES: u64 = 20;

/// Every writer transaction inserts a pair of rows with values `k` and `-k`, so any
/// whole-transaction view of `t` has an even row count and a zero sum of `v`.
pub const SCHEMA: &str = "
CREATE TABLE t(id INTEGER PRIMARY KEY, node INTEGER NOT NULL, v INTEGER NOT NULL, body TEXT NOT NULL);
";

/// Node `id` on `db` with a replication log of [`MAX_ENTRIES`] and snapshots in the
/// directory `store` (at most `keep` kept).
pub fn file_store_config(id: u64, db: &Path, nats_url: &str, store: &Path, keep: u32) -> NodeConfig {
    let mut config = NodeConfig::new(id, db).with_urls(vec![nats_url.to_owned()]);
    config.max_entries = MAX_ENTRIES;
    config.extra = format!(
        "\n[snapshot]\nenabled = true\nstore = \"file\"\nkeep = {keep}\n\n[snapshot.file]\npath = {:?}\n",
        store.to_string_lossy()
    );
    config
}

/// Creates `schema` in each of `dbs` and starts node `i + 1` on `dbs[i]` against the NATS
/// server at `nats_url`, snapshots off; returns once every node replicates.
pub fn start_nodes_without_snapshots(dir: &Path, nats_url: &str, dbs: &[PathBuf], schema: &str) -> Vec<Node> {
    let mut nodes: Vec<Node> = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| {
            create_db(db, schema);
            let mut c = NodeConfig::new(i as u64 + 1, db).with_urls(vec![nats_url.to_owned()]);
            c.extra = "\n[snapshot]\nenabled = false\n".into();
            Node::start(dir, &c, &[])
        })
        .collect();
    for node in &mut nodes {
        node.wait_replicating(DEADLINE);
    }
    nodes
}

/// Writes `n` transactions on `db`, each inserting the pair `(k, -k)` with ids from
/// `first_id` on (two per transaction) and a `body_bytes` text body per row.
pub fn write_pairs(db: &Path, node: i64, first_id: i64, n: i64, body_bytes: usize) {
    let conn = open(db);
    for i in 0..n {
        let id = first_id + 2 * i;
        let body = format!("{id:08}").repeat(body_bytes.div_ceil(8));
        let tx = conn.unchecked_transaction().expect("begin");
        tx.execute(
            "INSERT INTO t(id, node, v, body) VALUES (?1, ?2, ?3, ?4), (?5, ?2, ?6, ?4)",
            (id, node, id, &body, id + 1, -id),
        )
        .expect("insert a pair");
        tx.commit().expect("commit a pair");
    }
}

/// Writes `rounds` rounds of `per_round` pair transactions on `db`, waiting after each
/// round until the node published it, so that the stream gets at least one entry per
/// round (a node batches what is pending into one entry). Ids from `first_id` on.
pub fn write_published_rounds(db: &Path, node: i64, first_id: i64, rounds: i64, per_round: i64, body_bytes: usize) {
    for r in 0..rounds {
        write_pairs(db, node, first_id + 2 * per_round * r, per_round, body_bytes);
        marmot_tests::wait_until("the round is published", marmot_tests::DEADLINE, || {
            marmot_tests::query_i64(db, "SELECT pending_changes FROM __marmot__replication") == 0
        });
    }
}

/// The highest stream position `db` has processed (shard 0).
pub fn position(db: &Path) -> i64 {
    marmot_tests::query_i64(db, "SELECT max(position) FROM __marmot__positions")
}

/// Waits until `db` has processed more than [`MAX_ENTRIES`] + 2 stream entries past
/// `from`: the stream no longer holds what a node stopped at `from` missed.
pub fn wait_stream_beyond(db: &Path, from: i64) {
    marmot_tests::wait_until("the stream moved beyond what it keeps", marmot_tests::DEADLINE, || {
        position(db) - from > MAX_ENTRIES as i64 + 2
    });
}

/// The complete snapshots in the directory store (a `.json` manifest beside its
/// `.db.zst`), oldest first, as paths of the `.db.zst` files.
pub fn snapshots_in(store: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(store) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("marmot-snapshot-")
                && name.ends_with(".db.zst")
                && p.with_file_name(name.replace(".db.zst", ".json")).is_file()
        })
        .collect();
    out.sort();
    out
}

/// Runs `marmot -config <config> <args>` to completion (within `timeout`), its output
/// appended to `<dir>/<name>.log`; returns whether it succeeded and what it printed.
pub fn run_marmot(dir: &Path, name: &str, config: &Path, args: &[&str], timeout: Duration) -> (bool, String) {
    let log = dir.join(format!("{name}.log"));
    let start = std::fs::metadata(&log).map(|m| m.len() as usize).unwrap_or(0);
    let out = OpenOptions::new().create(true).append(true).open(&log).expect("open a log");
    let err = out.try_clone().expect("clone a log handle");
    let mut child = Command::new(marmot_bin())
        .arg("-config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start marmot");
    let mut status = None;
    let exited = poll(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!("marmot {args:?} did not exit within {timeout:?}; its output:\n{}", log_tail(&log, LOG_TAIL_LINES));
    }
    let bytes = std::fs::read(&log).unwrap_or_default();
    let output = String::from_utf8_lossy(&bytes[start.min(bytes.len())..]).into_owned();
    (status.expect("exited").success(), output)
}

/// Saves a snapshot with `marmot -save-snapshot` on `config`'s node, retrying while
/// another node holds the lease (a periodic save). Returns the new snapshot.
pub fn save_snapshot(dir: &Path, config: &Path, store: &Path) -> PathBuf {
    let before = snapshots_in(store);
    let mut last = String::new();
    let saved = poll(Duration::from_secs(60), || {
        let (ok, output) = run_marmot(dir, "save-snapshot", config, &["-save-snapshot"], Duration::from_secs(60));
        last = output;
        ok
    });
    assert!(saved, "marmot -save-snapshot kept failing; last output:\n{last}");
    assert!(last.contains("snapshot saved"), "no 'snapshot saved' in:\n{last}");
    snapshots_in(store)
        .into_iter()
        .filter(|p| !before.contains(p))
        .max()
        .expect("-save-snapshot added a snapshot to the store")
}

/// The number of rows of `t` on `db`.
pub fn rows(db: &Path) -> i64 {
    marmot_tests::query_i64(db, "SELECT count(*) FROM t")
}
