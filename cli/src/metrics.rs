//! The Prometheus endpoint (`[prometheus]`): what a node did and how far behind it is, in
//! the text exposition format, served at `GET /metrics` by a minimal HTTP responder.
//!
//! Owns the metric values and the listener. The node loop feeds it from the engine's
//! counters every step ([`Metrics::record`], cheap) and from the database at most
//! [`DB_SAMPLE_EVERY`]; a background task ([`Metrics::spawn_collector`]) reads the stream
//! bounds and the NATS connection state every [`COLLECT_EVERY`], so a slow server never
//! holds up replication. Every series carries a `node_id` label. Names are
//! `<namespace>_<subsystem>_<name>`, empty parts left out, as Prometheus' Go client
//! builds them (Marmot v1's `published` and `pending_publish` keep their v1 names).
//!
//! Faults tolerated: a scrape that never finishes its request (dropped after
//! [`REQUEST_TIMEOUT`]), database or NATS errors while sampling (the previous values stay,
//! logged at debug level). A listen address that cannot be bound fails the start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use marmot_core::engine::{Engine, EngineStats};
use marmot_core::sqlite::SqliteChangeSource;
use marmot_core::{LogTransport, Shard};
use marmot_transports::{EmbeddedServer, NatsTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::config::PrometheusConfig;

/// The database counters (pending, parked, set aside, positions) are read at most this
/// often.
pub const DB_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Stream bounds, the connection state and server restarts are read this often.
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);
/// A scrape must send its request within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read from a scraper.
const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Upper bounds of the replication-lag histogram's buckets, in seconds.
pub const LAG_BUCKETS_S: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The process's metrics, once [`start`] enabled them (a node runs one per process, as
/// Prometheus' Go client keeps one default registry).
static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// When `[prometheus] enable` is set: binds `bind`, serves `/metrics` from a background
/// task and makes the metrics the process's ([`global`]). Does nothing when disabled.
pub async fn start(node_id: u64, config: &PrometheusConfig) -> std::io::Result<()> {
    if !config.enable {
        return Ok(());
    }
    let metrics = Metrics::new(node_id, config);
    let addr = metrics.serve(&listen_addr(&config.bind)).await?;
    info!(%addr, "serving Prometheus metrics at /metrics");
    let _ = GLOBAL.set(metrics);
    Ok(())
}

/// The process's metrics, when enabled.
pub fn global() -> Option<&'static Metrics> {
    GLOBAL.get()
}

/// [`Metrics::record`] on the process's metrics, when enabled.
pub fn record(engine: &Engine<SqliteChangeSource>) {
    if let Some(m) = global() {
        m.record(engine);
    }
}

/// Sets the `disk_full` gauge (applying paused on a full disk), when metrics are enabled.
pub fn set_disk_full(full: bool) {
    if let Some(m) = global() {
        m.state().disk_full = full;
    }
}

/// Records the result of a `marmot verify` run (0 identical, 1 differ, 2 inconclusive),
/// when metrics are enabled.
pub fn set_verify(code: u8, at_ms: u64) {
    if let Some(m) = global() {
        m.state().verify = Some((code, at_ms));
    }
}

/// [`Metrics::spawn_collector`] on the process's metrics, when enabled.
pub fn spawn_collector(transport: &Arc<NatsTransport>) -> Option<Collector> {
    global().map(|m| m.spawn_collector(transport.clone()))
}

/// Runs `work`, meanwhile reading the embedded server's restart count into the process's
/// metrics every [`COLLECT_EVERY`] (the server stays owned by the caller, who stops it
/// afterwards).
pub async fn with_embedded<F: Future>(server: Option<&EmbeddedServer>, work: F) -> F::Output {
    let (Some(m), Some(server)) = (global(), server) else {
        return work.await;
    };
    let sample = async {
        loop {
            m.state().embedded_restarts = Some(server.restarts());
            tokio::time::sleep(COLLECT_EVERY).await;
        }
    };
    tokio::select! {
        out = work => out,
        _ = sample => unreachable!("the restart sampler never ends"),
    }
}

/// The metrics of one node; cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: u64,
    prefix: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    stats: EngineStats,
    pending_publish: u64,
    parked_batches: u64,
    aside_rows: u64,
    null_key_rows: u64,
    conflicts: Vec<(String, u64)>,
    conflicts_held: u64,
    clock_ahead_ms: u64,
    positions: BTreeMap<u32, u64>,
    schema_fingerprint: u64,
    schema_pending: u64,
    schema_differing_nodes: u64,
    stream_first: BTreeMap<u32, u64>,
    stream_last: BTreeMap<u32, u64>,
    nats_connected: Option<bool>,
    nats_connects: u64,
    disk_full: bool,
    /// The last `marmot verify` result this node heard: (exit code, when in ms).
    verify: Option<(u8, u64)>,
    embedded_restarts: Option<u64>,
    lag: Histogram,
    last_db_sample: Option<Instant>,
}

/// A cumulative histogram over [`LAG_BUCKETS_S`].
#[derive(Default)]
struct Histogram {
    counts: [u64; LAG_BUCKETS_S.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if let Some(i) = LAG_BUCKETS_S.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += v;
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `:3010` → `0.0.0.0:3010` (Go's spelling of "every interface"); others unchanged.
pub fn listen_addr(bind: &str) -> String {
    match bind.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => bind.to_owned(),
    }
}

impl Metrics {
    /// Empty metrics named after `config`'s namespace and subsystem.
    pub fn new(node_id: u64, config: &PrometheusConfig) -> Metrics {
        let prefix: String = [config.namespace.as_str(), config.subsystem.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| format!("{s}_"))
            .collect();
        Metrics { inner: Arc::new(Inner { node_id, prefix, state: Mutex::new(State::default()) }) }
    }

    /// Binds `addr` and answers scrapes until the runtime stops. Returns the bound address.
    pub async fn serve(&self, addr: &str) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("prometheus.bind {addr}: {e}")))?;
        let local = listener.local_addr()?;
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let m = metrics.clone();
                        tokio::spawn(async move {
                            if let Err(e) = m.answer(stream).await {
                                debug!(error = %e, "metrics scrape failed");
                            }
                        });
                    }
                    Err(e) => {
                        debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(local)
    }

    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        let read = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_BYTES_MAX {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, read)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        let line = String::from_utf8_lossy(&head);
        let mut words = line.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let path = path.split('?').next().unwrap_or("");
        let (status, body) = match (method, path) {
            ("GET" | "HEAD", "/metrics") => ("200 OK", self.render()),
            ("GET" | "HEAD", _) => ("404 Not Found", "metrics are at /metrics\n".to_owned()),
            _ => ("405 Method Not Allowed", String::new()),
        };
        let mut response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if method != "HEAD" {
            response.push_str(&body);
        }
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the engine's counters (every step) and, at most every [`DB_SAMPLE_EVERY`],
    /// the database's. A step that applied batches adds one lag observation: now minus
    /// the origin's commit time of the newest batch applied.
    pub fn record(&self, engine: &Engine<SqliteChangeSource>) {
        let due = {
            let mut s = self.state();
            self.take_stats(&mut s, engine.stats(), now_ms());
            s.schema_fingerprint = engine.db().schema_fingerprint();
            s.schema_differing_nodes = engine.differing_schemas().len() as u64;
            !matches!(s.last_db_sample, Some(t) if t.elapsed() < DB_SAMPLE_EVERY)
        };
        if due {
            match sample_db(engine) {
                Ok(sample) => {
                    let mut s = self.state();
                    s.pending_publish = sample.pending;
                    s.parked_batches = sample.parked;
                    s.aside_rows = sample.aside;
                    s.null_key_rows = sample.null_keys;
                    s.conflicts = sample.conflicts;
                    s.conflicts_held = sample.conflicts_held;
                    s.clock_ahead_ms = sample.clock_ahead_ms;
                    s.positions = sample.positions;
                    s.schema_pending = sample.schema_pending;
                    s.last_db_sample = Some(Instant::now());
                }
                Err(e) => {
                    debug!(error = %e, "could not sample the database for metrics");
                    self.state().last_db_sample = Some(Instant::now());
                }
            }
        }
    }

    fn take_stats(&self, s: &mut State, stats: &EngineStats, now_ms: u64) {
        if stats.batches_applied > s.stats.batches_applied && stats.last_applied_hlc.0 > 0 {
            let lag_ms = now_ms.saturating_sub(stats.last_applied_hlc.millis());
            s.lag.observe(lag_ms as f64 / 1000.0);
        }
        s.stats = stats.clone();
    }

    /// Reads stream bounds and the connection state every [`COLLECT_EVERY`] until the
    /// returned guard is dropped.
    pub fn spawn_collector(&self, transport: Arc<NatsTransport>) -> Collector {
        let metrics = self.clone();
        Collector(tokio::spawn(async move {
            loop {
                metrics.collect(&transport).await;
                tokio::time::sleep(COLLECT_EVERY).await;
            }
        }))
    }

    async fn collect(&self, transport: &NatsTransport) {
        let client = transport.client();
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        let connects = client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed);
        {
            let mut s = self.state();
            s.nats_connected = Some(connected);
            s.nats_connects = connects;
        }
        for shard in 0..transport.shard_count() {
            match transport.bounds(Shard(shard)).await {
                Ok(b) => {
                    let mut s = self.state();
                    s.stream_first.insert(shard, b.first.0);
                    s.stream_last.insert(shard, b.last.0);
                }
                Err(e) => debug!(shard, error = %e, "could not read stream bounds for metrics"),
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let s = self.state();
        let mut out = Exposition { out: String::new(), prefix: &self.inner.prefix, node: self.inner.node_id };
        let st = &s.stats;
        out.one(
            "info",
            "gauge",
            "Always 1; the version label says which marmot runs.",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
        out.scalar("published", "counter", "Row changes published (Marmot v1's name).", st.changes_published);
        out.scalar("published_batches_total", "counter", "Batches published and acknowledged.", st.batches_published);
        out.scalar(
            "publish_errors_total",
            "counter",
            "Publish attempts that failed and were retried.",
            st.publish_errors,
        );
        out.scalar(
            "pending_publish",
            "gauge",
            "Captured local changes not yet published (Marmot v1's name).",
            s.pending_publish,
        );
        out.scalar("applied_batches_total", "counter", "Remote batches applied.", st.batches_applied);
        out.scalar("applied_rows_total", "counter", "Remote row changes applied.", st.rows_applied);
        out.scalar(
            "skipped_rows_total",
            "counter",
            "Remote row changes skipped as older than the stored version.",
            st.rows_skipped,
        );
        out.scalar(
            "excluded_rows_total",
            "counter",
            "Remote row changes passed over because their table is not replicated here ([replication]).",
            st.rows_excluded,
        );
        out.scalar(
            "parked_total",
            "counter",
            "Entries parked since start (undecodable or naming a missing table or column).",
            st.batches_parked,
        );
        out.scalar("parked_batches", "gauge", "Entries in __marmot__parked now.", s.parked_batches);
        out.scalar(
            "aside_rows",
            "gauge",
            "Rows set aside in __marmot__aside (lost a UNIQUE value to a newer write).",
            s.aside_rows,
        );
        out.scalar(
            "null_key_rows",
            "gauge",
            "Rows whose primary key holds NULL: not replicated (nodes cannot tell them apart).",
            s.null_key_rows,
        );
        out.scalar(
            "clock_ahead_milliseconds",
            "gauge",
            "How far this node's clock (highest version produced or applied) is ahead of its wall clock.",
            s.clock_ahead_ms,
        );
        out.scalar(
            "remote_clock_ahead_milliseconds",
            "gauge",
            "How far the last remote batch's versions were ahead of this node's wall clock (skew plus transit).",
            st.remote_ahead_ms,
        );
        out.scalar(
            "skewed_batches_total",
            "counter",
            "Remote batches versioned more than max_clock_skew ahead of this node's clock.",
            st.skewed_batches,
        );
        let fingerprint = format!("{:016x}", s.schema_fingerprint);
        out.one(
            "schema_info",
            "gauge",
            "Always 1; the fingerprint label identifies this node's schema (equal on nodes with equal schemas).",
            &[("fingerprint", &fingerprint)],
            1.0,
        );
        out.scalar(
            "schema_changes_published_total",
            "counter",
            "Schema changes of this node published on the schema log.",
            st.schema_changes_published,
        );
        out.scalar(
            "schema_changes_applied_total",
            "counter",
            "Entries of the schema log applied here (this node's own included).",
            st.schema_changes_applied,
        );
        let full = out.header(
            "conflicts_total",
            "counter",
            "Writes recorded in the conflict journal as lost (overwritten by a write whose origin had not seen them), per table.",
        );
        for (table, n) in &s.conflicts {
            out.sample(&full, &[("table", table)], *n as f64);
        }
        out.scalar(
            "conflicts_held",
            "gauge",
            "Entries in the conflict journal (__marmot__conflicts) now.",
            s.conflicts_held,
        );
        out.scalar(
            "tombstones_collected_total",
            "counter",
            "Tombstones (versions of deleted rows) removed after tombstone_retention.",
            st.tombstones_collected,
        );
        out.scalar(
            "schema_changes_pending",
            "gauge",
            "Schema changes of this node waiting to be published.",
            s.schema_pending,
        );
        out.scalar(
            "schema_differing_nodes",
            "gauge",
            "Other nodes whose latest batch carried a schema fingerprint unlike this node's.",
            s.schema_differing_nodes,
        );
        out.histogram(
            "replication_lag_seconds",
            "Origin commit to apply here, sampled once per receive step from the newest batch applied.",
            &s.lag,
        );
        out.per_shard("stream_position", "Last stream position processed and stored, per shard.", &s.positions);
        out.per_shard("stream_last", "Last position the stream holds, per shard.", &s.stream_last);
        out.per_shard("stream_first", "First position the stream still holds, per shard.", &s.stream_first);
        let behind: BTreeMap<u32, u64> = s
            .stream_last
            .iter()
            .map(|(&shard, &last)| (shard, last.saturating_sub(s.positions.get(&shard).copied().unwrap_or(0))))
            .collect();
        out.per_shard("stream_lag_entries", "Entries the stream holds beyond this node's stored position.", &behind);
        out.scalar(
            "disk_full",
            "gauge",
            "1 while applying is paused because the database's disk is full.",
            u64::from(s.disk_full),
        );
        if let Some((code, at_ms)) = s.verify {
            out.scalar(
                "verify_last_result",
                "gauge",
                "Result of the last marmot verify: 0 identical, 1 the nodes differ, 2 no point to compare found.",
                u64::from(code),
            );
            out.scalar(
                "verify_last_timestamp_seconds",
                "gauge",
                "When the last marmot verify ended (Unix time).",
                at_ms / 1000,
            );
        }
        if let Some(connected) = s.nats_connected {
            out.scalar("nats_connected", "gauge", "1 while the NATS connection is up.", u64::from(connected));
            out.scalar(
                "nats_reconnects_total",
                "counter",
                "NATS reconnections after the first connection.",
                s.nats_connects.saturating_sub(1),
            );
        }
        if let Some(restarts) = s.embedded_restarts {
            out.scalar(
                "embedded_server_restarts_total",
                "counter",
                "Restarts of the embedded nats-server after it died.",
                restarts,
            );
        }
        out.out
    }
}

/// Stops the collector task when dropped.
pub struct Collector(JoinHandle<()>);

impl Drop for Collector {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct DbSample {
    pending: u64,
    parked: u64,
    aside: u64,
    null_keys: u64,
    conflicts: Vec<(String, u64)>,
    conflicts_held: u64,
    clock_ahead_ms: u64,
    positions: BTreeMap<u32, u64>,
    schema_pending: u64,
}

fn sample_db(engine: &Engine<SqliteChangeSource>) -> marmot_core::Result<DbSample> {
    let db = engine.db();
    // Acknowledgements reach the database a little later than they happen; the engine's
    // in-memory point is the fresher one.
    let published = db.published_hlc()?.max(engine.source().acknowledged());
    let count = |sql: &str, args: &[i64]| -> marmot_core::Result<u64> {
        db.conn()
            .query_row(sql, rusqlite::params_from_iter(args), |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| marmot_core::Error::Database(format!("{sql}: {e}")))
    };
    Ok(DbSample {
        pending: count("SELECT count(*) FROM __marmot__log WHERE hlc > ?1", &[published.0 as i64])?,
        parked: db.parked_count()?,
        aside: count("SELECT count(*) FROM __marmot__aside", &[])?,
        null_keys: db.null_key_rows()?.iter().map(|(_, n)| n).sum(),
        conflicts: db.conflicts_recorded()?,
        conflicts_held: db.conflicts_held()?,
        clock_ahead_ms: db.clock_ahead_ms()?,
        positions: db.positions()?.into_iter().map(|(s, p)| (s.0, p.0)).collect(),
        schema_pending: db.schema_changes_queued()?,
    })
}

struct Exposition<'a> {
    out: String,
    prefix: &'a str,
    node: u64,
}

impl Exposition<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) -> String {
        let full = format!("{}{name}", self.prefix);
        let _ = writeln!(self.out, "# HELP {full} {help}\n# TYPE {full} {kind}");
        full
    }

    fn sample(&mut self, full: &str, labels: &[(&str, &str)], v: f64) {
        let mut l = format!("node_id=\"{}\"", self.node);
        for (k, val) in labels {
            let _ = write!(l, ",{k}=\"{}\"", val.replace('\\', "\\\\").replace('"', "\\\""));
        }
        let _ = writeln!(self.out, "{full}{{{l}}} {v}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        let full = self.header(name, kind, help);
        self.sample(&full, labels, v);
    }

    fn scalar(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.one(name, kind, help, &[], v as f64);
    }

    fn per_shard(&mut self, name: &str, help: &str, values: &BTreeMap<u32, u64>) {
        let full = self.header(name, "gauge", help);
        for (shard, v) in values {
            self.sample(&full, &[("shard", &shard.to_string())], *v as f64);
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        let full = self.header(name, "histogram", help);
        let mut cumulative = 0;
        for (bound, n) in LAG_BUCKETS_S.iter().zip(h.counts) {
            cumulative += n;
            self.sample(&format!("{full}_bucket"), &[("le", &bound.to_string())], cumulative as f64);
        }
        self.sample(&format!("{full}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{full}_sum"), &[], h.sum);
        self.sample(&format!("{full}_count"), &[], h.count as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marmot_core::Hlc;

    fn config(namespace: &str, subsystem: &str) -> PrometheusConfig {
        PrometheusConfig { namespace: namespace.into(), subsystem: subsystem.into(), ..PrometheusConfig::default() }
    }

    #[test]
    fn names_join_namespace_and_subsystem_like_the_go_client() {
        let text = Metrics::new(7, &config("marmot", "")).render();
        assert!(text.contains("marmot_published{node_id=\"7\"} 0"), "{text}");
        assert!(text.contains("# TYPE marmot_pending_publish gauge"), "{text}");
        let text = Metrics::new(7, &config("a", "b")).render();
        assert!(text.contains("a_b_published{node_id=\"7\"} 0"), "{text}");
        let text = Metrics::new(7, &config("", "")).render();
        assert!(text.contains("\npublished{node_id=\"7\"} 0"), "{text}");
    }

    #[test]
    fn lag_is_observed_once_per_step_that_applied_batches() {
        let m = Metrics::new(1, &config("marmot", ""));
        let mut stats = EngineStats { batches_applied: 2, ..EngineStats::default() };
        stats.last_applied_hlc = Hlc::from_millis(10_000);
        {
            let mut s = m.state();
            m.take_stats(&mut s, &stats, 10_040);
            m.take_stats(&mut s, &stats, 99_999); // nothing new applied: no observation
        }
        let text = m.render();
        assert!(text.contains("marmot_replication_lag_seconds_count{node_id=\"1\"} 1"), "{text}");
        assert!(text.contains("marmot_replication_lag_seconds_bucket{node_id=\"1\",le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("marmot_replication_lag_seconds_bucket{node_id=\"1\",le=\"0.025\"} 0"), "{text}");
    }

    #[test]
    fn shards_behind_are_last_minus_stored_position() {
        let m = Metrics::new(1, &config("marmot", ""));
        {
            let mut s = m.state();
            s.positions.insert(0, 5);
            s.stream_last.insert(0, 9);
            s.stream_last.insert(1, 3);
        }
        let text = m.render();
        assert!(text.contains("marmot_stream_lag_entries{node_id=\"1\",shard=\"0\"} 4"), "{text}");
        assert!(text.contains("marmot_stream_lag_entries{node_id=\"1\",shard=\"1\"} 3"), "{text}");
    }

    #[test]
    fn go_style_bind_means_every_interface() {
        assert_eq!(listen_addr(":3010"), "0.0.0.0:3010");
        assert_eq!(listen_addr("127.0.0.1:9"), "127.0.0.1:9");
    }

    #[tokio::test]
    async fn scrape_over_http_returns_the_exposition() {
        let m = Metrics::new(3, &config("marmot", ""));
        let addr = m.serve("127.0.0.1:0").await.unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("marmot_published{node_id=\"3\"} 0"), "{body}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 404"), "{body}");
    }
}
