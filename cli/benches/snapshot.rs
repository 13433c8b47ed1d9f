//! Snapshot save and restore of a large database, beside a plain file copy measured in
//! the same run, with the peak memory of each. A benchmark, not a test: it prints numbers.
//!
//! `cargo bench -p marmot --bench snapshot` (about 3 minutes; needs ~8 GiB free under the
//! temporary directory, or set `MARMOT_BENCH_DIR`). `MARMOT_BENCH_SIZES_MIB=1024,256`
//! picks the database sizes.
//!
//! For each size: a WAL database of random-ish rows (half incompressible bytes, half
//! text) is generated (not timed), then
//! - `cp`: `std::fs::copy` of the database file (warm page cache, no fsync, like `cp`),
//!   and again followed by an fsync of the copy;
//! - floor: SQLite's online backup of the plain database file into a live WAL database
//!   (what any restore that keeps the application's connections safe must do), and the
//!   checkpoint after it, timed apart;
//! - save: `Snapshots::save` to a local-directory store (`VACUUM INTO`, strip, zstd,
//!   checksum, put into the store);
//! - restore: `Snapshots::restore_newest` into a live database (download from the store,
//!   verify, online backup in one step reading the compressed file through the
//!   decompressing VFS, re-install capture), with a second connection holding that
//!   database open; then the time until its background WAL checkpoint is done.
//!
//! Save and restore each run in a child process (this binary, re-executed) that reports
//! its own peak resident memory (`VmHWM` from `/proc/self/status`), so the numbers are not
//! polluted by the generation or by each other. The restore is then broken into its
//! phases, each timed on its own, to show where the time goes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use marmot_core::snapshots::Snapshots;
use marmot_core::sqlite::{checksum_file, stream_vfs, CaptureOptions, Db};
use marmot_core::NodeId;
use marmot_storage::StoreOptions;
use rusqlite::{Connection, OpenFlags};

const MIB: u64 = 1024 * 1024;
/// Bytes of payload per row: half random, half text.
const ROW_BYTES: usize = 4000;
const ROWS_PER_TX: usize = 5_000;
const CHILD_ARG: &str = "--snapshot-bench-child";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_ARG) {
        child(&args[2..]);
        return;
    }
    let sizes: Vec<u64> = std::env::var("MARMOT_BENCH_SIZES_MIB")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MARMOT_BENCH_SIZES_MIB: sizes in MiB"))
        .collect();
    let base = std::env::var_os("MARMOT_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let started = Instant::now();
    let mut results = Vec::new();
    for &mib in &sizes {
        let dir = tempfile::Builder::new().prefix("marmot-snapshot-bench-").tempdir_in(&base).expect("temp dir");
        results.push(run_size(dir.path(), mib));
    }
    println!();
    println!(
        "summary (warm page cache; ratio = cp time / restore time, target >= 0.50; floor = SQLite's online backup of \
         the uncompressed file into a live WAL database, the copy a restore cannot avoid)"
    );
    println!(
        "{:>7} {:>6} {:>9} {:>7} {:>7} {:>9} {:>9} {:>7} {:>8} {:>11} {:>6} {:>12} {:>11}",
        "db MiB",
        "cp s",
        "cp+sync s",
        "floor s",
        "save s",
        "restore s",
        "+ckpt s",
        "zst MiB",
        "save HWM",
        "restore HWM",
        "ratio",
        "ratio (sync)",
        "floor ratio"
    );
    for r in &results {
        println!(
            "{:>7.0} {:>6.2} {:>9.2} {:>7.2} {:>7.2} {:>9.2} {:>9.2} {:>7.0} {:>4} MiB {:>7} MiB {:>6.2} {:>12.2} {:>11.2}",
            r.db_bytes as f64 / MIB as f64,
            r.cp.as_secs_f64(),
            r.cp_sync.as_secs_f64(),
            r.floor.as_secs_f64(),
            r.save.as_secs_f64(),
            r.restore.as_secs_f64(),
            r.checkpointed.as_secs_f64(),
            r.compressed_bytes as f64 / MIB as f64,
            r.save_hwm_kib / 1024,
            r.restore_hwm_kib / 1024,
            r.cp.as_secs_f64() / r.restore.as_secs_f64(),
            r.cp_sync.as_secs_f64() / r.restore.as_secs_f64(),
            r.floor.as_secs_f64() / r.restore.as_secs_f64(),
        );
    }
    if let [small, .., large] = results.as_slice() {
        let growth = |a: u64, b: u64| b as f64 / a as f64;
        println!(
            "peak memory, {:.0} MiB vs {:.0} MiB database ({:.1}x the data): save {:.2}x, restore {:.2}x",
            large.db_bytes as f64 / MIB as f64,
            small.db_bytes as f64 / MIB as f64,
            large.db_bytes as f64 / small.db_bytes as f64,
            growth(small.save_hwm_kib, large.save_hwm_kib),
            growth(small.restore_hwm_kib, large.restore_hwm_kib),
        );
    }
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());
}

struct SizeResult {
    db_bytes: u64,
    compressed_bytes: u64,
    cp: Duration,
    cp_sync: Duration,
    floor: Duration,
    save: Duration,
    restore: Duration,
    checkpointed: Duration,
    save_hwm_kib: u64,
    restore_hwm_kib: u64,
}

fn run_size(dir: &Path, mib: u64) -> SizeResult {
    println!("== {mib} MiB database in {}", dir.display());
    let db = dir.join("source.db");
    let t = Instant::now();
    generate(&db, mib * MIB);
    let db_bytes = std::fs::metadata(&db).expect("size").len();
    println!("generated {:.0} MiB in {:.1} s (not timed)", db_bytes as f64 / MIB as f64, t.elapsed().as_secs_f64());

    let copy = dir.join("copy.db");
    let t = Instant::now();
    std::fs::copy(&db, &copy).expect("copy");
    let cp = t.elapsed();
    println!("cp:      {:6.2} s  {:7.0} MiB/s", cp.as_secs_f64(), rate(db_bytes, cp));
    std::fs::remove_file(&copy).expect("remove the copy");
    // The same with the copy made durable, as a restore's writes are.
    let t = Instant::now();
    std::fs::copy(&db, &copy).expect("copy");
    std::fs::File::open(&copy).and_then(|f| f.sync_all()).expect("fsync the copy");
    let cp_sync = t.elapsed();
    println!("cp+fsync:{:6.2} s  {:7.0} MiB/s", cp_sync.as_secs_f64(), rate(db_bytes, cp_sync));
    std::fs::remove_file(&copy).expect("remove the copy");
    let floor = run_child(&["floor", path(&db), path(dir)]);
    println!(
        "floor:   {:6.2} s  {:7.0} MiB/s  (SQLite online backup of the plain file into a live WAL database; its \
         checkpoint {:.2} s more)",
        floor.get("backup"),
        rate(db_bytes, Duration::from_secs_f64(floor.get("backup"))),
        floor.get("checkpoint"),
    );

    let store = dir.join("store");
    let save = run_child(&["save", path(&db), path(&store), path(dir)]);
    let save_time = Duration::from_secs_f64(save.get("seconds"));
    println!(
        "save:    {:6.2} s  {:7.0} MiB/s  peak RSS {} MiB  ({:.0} MiB compressed)",
        save_time.as_secs_f64(),
        rate(db_bytes, save_time),
        save.get("hwm_kib") as u64 / 1024,
        save.get("compressed_bytes") / MIB as f64
    );

    // The live database a restore replaces: a node with the schema and a few rows.
    let target = dir.join("target.db");
    create_schema(&target);
    let restore = run_child(&["restore", path(&target), path(&store), path(dir)]);
    let restore_time = Duration::from_secs_f64(restore.get("seconds"));
    println!(
        "restore: {:6.2} s  {:7.0} MiB/s  peak RSS {} MiB  ({:.2}x cp speed, {:.2}x cp+fsync speed, {:.2}x the \
         floor); its background WAL checkpoint done {:.2} s later",
        restore_time.as_secs_f64(),
        rate(db_bytes, restore_time),
        restore.get("hwm_kib") as u64 / 1024,
        cp.as_secs_f64() / restore_time.as_secs_f64(),
        cp_sync.as_secs_f64() / restore_time.as_secs_f64(),
        floor.get("backup") / restore_time.as_secs_f64(),
        restore.get("checkpointed") - restore.get("seconds"),
    );
    let rows = Connection::open(&target)
        .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)))
        .expect("count restored rows");
    let expected = Connection::open(&db)
        .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)))
        .expect("count rows");
    assert_eq!(rows, expected, "the restored database holds every row");
    std::fs::remove_file(&target).ok();
    let _ = std::fs::remove_file(dir.join("target.db-wal"));

    let phases = run_child(&["phases", path(&store), path(dir)]);
    println!(
        "restore phases, each alone: get from store {:.2} s, checksum {:.2} s, decompress alone (to nowhere) {:.2} s, \
         backup streamed from the compressed file into a live WAL database {:.2} s, then its checkpoint {:.2} s",
        phases.get("get"),
        phases.get("checksum"),
        phases.get("decompress"),
        phases.get("backup"),
        phases.get("checkpoint"),
    );
    SizeResult {
        db_bytes,
        compressed_bytes: save.get("compressed_bytes") as u64,
        cp,
        cp_sync,
        floor: Duration::from_secs_f64(floor.get("backup")),
        save: save_time,
        restore: restore_time,
        checkpointed: Duration::from_secs_f64(restore.get("checkpointed")),
        save_hwm_kib: save.get("hwm_kib") as u64,
        restore_hwm_kib: restore.get("hwm_kib") as u64,
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB NOT NULL);";

fn create_schema(db: &Path) {
    let conn = Connection::open(db).expect("open");
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)).expect("WAL");
    conn.execute_batch(SCHEMA).expect("schema");
    conn.execute_batch("INSERT INTO t(id, name, payload) VALUES (1, 'old', x'00')").expect("a row");
    drop(conn);
    Db::open(db, NodeId(2), CaptureOptions::default()).expect("install capture on the target");
}

/// xorshift64*: fast, deterministic, random-looking bytes.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const WORDS: &[&str] = &[
    "marmot", "sqlite", "replica", "stream", "snapshot", "leader", "writer", "shard", "clock", "version", "apply",
    "merge", "table", "trigger", "journal", "page", "commit", "batch", "entry", "node",
];

/// A WAL database of about `bytes`, with capture installed (as on a node), checkpointed.
fn generate(db: &Path, bytes: u64) {
    let conn = Connection::open(db).expect("create");
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)).expect("WAL");
    conn.execute_batch("PRAGMA synchronous = OFF;").expect("pragmas");
    conn.execute_batch(SCHEMA).expect("schema");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let rows = (bytes / (ROW_BYTES as u64 + 150)).max(1) as usize;
    let mut payload = vec![0u8; ROW_BYTES / 2];
    let mut id = 0usize;
    while id < rows {
        let tx = conn.unchecked_transaction().expect("begin");
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO t(id, name, payload) VALUES (?1, ?2, ?3)").expect("prepare");
            for _ in 0..ROWS_PER_TX.min(rows - id) {
                id += 1;
                for chunk in payload.chunks_mut(8) {
                    let r = rng.next().to_le_bytes();
                    chunk.copy_from_slice(&r[..chunk.len()]);
                }
                let mut text = String::with_capacity(ROW_BYTES / 2 + 16);
                while text.len() < ROW_BYTES / 2 {
                    text.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
                    text.push(' ');
                }
                let mut blob = payload.clone();
                blob.extend_from_slice(text.as_bytes());
                insert.execute((id as i64, format!("row {id} {}", &text[..40]), blob)).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").expect("checkpoint");
    drop(conn);
    Db::open(db, NodeId(1), CaptureOptions::default()).expect("install capture");
    let conn = Connection::open(db).expect("reopen");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").expect("checkpoint");
}

/// What a child reported: `key=value` lines.
struct Report(Vec<(String, f64)>);
impl Report {
    fn get(&self, key: &str) -> f64 {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v).unwrap_or_else(|| panic!("child reported no {key}"))
    }
}

fn run_child(args: &[&str]) -> Report {
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .arg(CHILD_ARG)
        .args(args)
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Report(
        stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
            .collect(),
    )
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

fn child(args: &[String]) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let open_store = |dir: &str| {
        runtime.block_on(marmot_storage::open(StoreOptions::File { location: dir.to_owned() })).expect("open the store")
    };
    match args[0].as_str() {
        "save" => {
            let (db, store, work) = (Path::new(&args[1]), open_store(&args[2]), Path::new(&args[3]));
            let db = Db::open(db, NodeId(1), CaptureOptions::default()).expect("open");
            let snapshots = Snapshots::new(store, 3);
            let t = Instant::now();
            let manifest = runtime.block_on(snapshots.save(&db, work, 1)).expect("save");
            println!("seconds={}", t.elapsed().as_secs_f64());
            println!("compressed_bytes={}", manifest.compressed_bytes);
        }
        "restore" => {
            let (target, store, work) = (Path::new(&args[1]), open_store(&args[2]), Path::new(&args[3]));
            // The application holds the database open meanwhile.
            let app = Connection::open(target).expect("the application's connection");
            app.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).expect("read");
            let mut db = Db::open(target, NodeId(2), CaptureOptions::default()).expect("open");
            let snapshots = Snapshots::new(store, 3);
            let t = Instant::now();
            runtime.block_on(snapshots.restore_newest(&mut db, work, &mut |_, _| {})).expect("restore");
            println!("seconds={}", t.elapsed().as_secs_f64());
            db.finish_checkpoint().expect("checkpoint");
            println!("checkpointed={}", t.elapsed().as_secs_f64());
            drop(app);
        }
        "phases" => phases(&runtime, open_store(&args[1]), Path::new(&args[2])),
        "floor" => floor(Path::new(&args[1]), Path::new(&args[2])),
        other => panic!("unknown child mode {other}"),
    }
    println!("hwm_kib={}", peak_rss_kib());
}

/// The restore's phases one by one, from public pieces, to show where its time goes.
fn phases(runtime: &tokio::runtime::Runtime, store: Arc<dyn marmot_core::SnapshotStore>, work: &Path) {
    let objects = runtime.block_on(store.list()).expect("list");
    let object = objects.iter().map(|o| o.name.clone()).find(|n| n.ends_with(".db.zst")).expect("a snapshot");
    let compressed = work.join("phase.db.zst");
    let t = Instant::now();
    runtime.block_on(store.get(&object, &compressed)).expect("get");
    println!("get={}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    checksum_file(&compressed).expect("checksum");
    println!("checksum={}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut decoder = zstd::stream::read::Decoder::new(std::fs::File::open(&compressed).expect("open")).expect("zstd");
    std::io::copy(&mut decoder, &mut std::io::sink()).expect("decompress");
    println!("decompress={}", t.elapsed().as_secs_f64());
    let source = stream_vfs::open(&compressed, None).expect("open the compressed snapshot");
    let (backup, checkpoint) = backup_into_live_wal(&source.conn, work);
    println!("backup={backup}");
    println!("checkpoint={checkpoint}");
    drop(source);
    std::fs::remove_file(&compressed).ok();
}

/// SQLite's online backup of the plain database file into a live WAL database: the floor
/// of any restore that keeps readers of the live database safe.
fn floor(db: &Path, work: &Path) {
    let source = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open the plain file");
    let (backup, checkpoint) = backup_into_live_wal(&source, work);
    println!("backup={backup}");
    println!("checkpoint={checkpoint}");
}

/// Backs `source` up into a fresh WAL database that another connection holds open, with
/// Marmot's connection settings; returns the seconds of the backup and of the checkpoint
/// after it.
fn backup_into_live_wal(source: &Connection, work: &Path) -> (f64, f64) {
    let target = work.join("phase-target.db");
    create_schema(&target);
    let app = Connection::open(&target).expect("the application's connection");
    app.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).expect("read");
    let mut dest = Connection::open(&target).expect("open target");
    dest.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0;").expect("pragmas");
    let t = Instant::now();
    {
        let backup = rusqlite::backup::Backup::new(source, &mut dest).expect("backup");
        assert_eq!(backup.step(-1).expect("step"), rusqlite::backup::StepResult::Done);
    }
    let backup = t.elapsed().as_secs_f64();
    let t = Instant::now();
    dest.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").expect("checkpoint");
    let checkpoint = t.elapsed().as_secs_f64();
    drop((app, dest));
    for p in [&target, &target.with_extension("db-wal"), &target.with_extension("db-shm")] {
        std::fs::remove_file(p).ok();
    }
    (backup, checkpoint)
}
