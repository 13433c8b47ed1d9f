//! The `marmot` configuration: every Marmot v1 key with its v1 default, plus the few keys
//! this implementation adds (documented as new in `docs/configuration.md`).
//!
//! This module owns the *shape* of the configuration and its defaults. Reading it
//! (file, then `MARMOT_…` environment overrides) lives in [`load`], the errors in [`error`],
//! and the checks against the filesystem (is `db_path` a SQLite database in WAL mode?) in
//! [`database`].
//!
//! Faults handled: a missing or unreadable file, TOML syntax errors, unknown keys, values of
//! the wrong type or out of range, and environment variables that do not parse. Each is
//! refused before anything starts, with the key (or variable) and the file named.
//!
//! Durations keep Marmot v1's unit, integer milliseconds; the Rust field names carry the
//! unit (`sleep_timeout_ms`) while the TOML keys keep the v1 spelling (`sleep_timeout`).

pub mod database;
pub mod env;
pub mod error;
pub mod load;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use error::{ConfigError, Origin};
pub use load::Loaded;

/// The whole configuration of one `marmot` node (the TOML file's top level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The SQLite database to replicate. v1 default: `<tmp>/marmot.db`.
    pub db_path: PathBuf,
    /// This node's identity; must not be 0. Default: a 64-bit hash of the machine id.
    pub node_id: u64,
    /// v1's positions file. Accepted and ignored: positions now live in the database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq_map_path: Option<String>,
    /// Publish local changes to the log.
    pub publish: bool,
    /// Apply other nodes' changes from the log.
    pub replicate: bool,
    /// Replicate schema changes (`CREATE`, `ALTER`, `DROP` of tables, indexes, views,
    /// triggers) through the schema log. Not a v1 key; `false` keeps v1's way (change the
    /// schema on every node by hand).
    pub replicate_ddl: bool,
    /// Most change rows read per scan of the change tables.
    pub scan_max_changes: u64,
    /// How often published change rows are removed, in milliseconds.
    #[serde(rename = "cleanup_interval")]
    pub cleanup_interval_ms: u64,
    /// Exit after this long without activity, in milliseconds (0 = never).
    #[serde(rename = "sleep_timeout")]
    pub sleep_timeout_ms: u64,
    /// Poll the database at this interval instead of watching it, in milliseconds (0 = off).
    #[serde(rename = "polling_interval")]
    pub polling_interval_ms: u64,
    /// Log remote changes versioned further ahead of this node's clock than this, in
    /// milliseconds (0 = never). Not a v1 key.
    #[serde(rename = "max_clock_skew")]
    pub max_clock_skew_ms: u64,
    /// Remove versions of deleted rows (tombstones) older than this, in milliseconds
    /// (0 = keep them for ever). Not a v1 key.
    #[serde(rename = "tombstone_retention")]
    pub tombstone_retention_ms: u64,
    /// `[snapshot]`.
    pub snapshot: SnapshotConfig,
    /// `[replication]`: which tables replicate. Not a v1 section.
    pub replication: ReplicationConfig,
    /// `[conflicts]`: the conflict journal. Not a v1 section.
    pub conflicts: ConflictsConfig,
    /// `[replication_log]`.
    pub replication_log: ReplicationLogConfig,
    /// `[nats]`.
    pub nats: NatsConfig,
    /// `[logging]`.
    pub logging: LoggingConfig,
    /// `[prometheus]`.
    pub prometheus: PrometheusConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            db_path: std::env::temp_dir().join("marmot.db"),
            node_id: default_node_id(),
            seq_map_path: None,
            publish: true,
            replicate: true,
            replicate_ddl: true,
            scan_max_changes: 512,
            cleanup_interval_ms: 5000,
            sleep_timeout_ms: 0,
            polling_interval_ms: 0,
            max_clock_skew_ms: marmot_core::engine::CLOCK_SKEW_MS_MAX_DEFAULT,
            tombstone_retention_ms: marmot_core::engine::TOMBSTONE_RETENTION_MS_DEFAULT,
            snapshot: SnapshotConfig::default(),
            replication: ReplicationConfig::default(),
            conflicts: ConflictsConfig::default(),
            replication_log: ReplicationLogConfig::default(),
            nats: NatsConfig::default(),
            logging: LoggingConfig::default(),
            prometheus: PrometheusConfig::default(),
        }
    }
}

impl Config {
    /// How capture is installed on this node's database.
    pub fn capture_options(&self) -> marmot_core::sqlite::CaptureOptions {
        marmot_core::sqlite::CaptureOptions {
            replicate_ddl: self.replicate_ddl,
            selection: self.replication.selection(),
            conflicts: self.conflicts.enabled,
            ..Default::default()
        }
    }

    /// `cleanup_interval` as a duration.
    pub fn cleanup_interval(&self) -> Duration {
        Duration::from_millis(self.cleanup_interval_ms)
    }

    /// `sleep_timeout` as a duration; `None` when 0 (never sleep).
    pub fn sleep_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.sleep_timeout_ms)
    }

    /// `polling_interval` as a duration; `None` when 0 (watch the file instead).
    pub fn polling_interval(&self) -> Option<Duration> {
        nonzero_ms(self.polling_interval_ms)
    }

    /// The directory of `db_path`: the embedded server's store and temporary snapshot files
    /// live there.
    pub fn data_dir(&self) -> PathBuf {
        self.db_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// The embedded server's name, `marmot-node-<node_id>`.
    pub fn server_name(&self) -> String {
        format!("marmot-node-{}", self.node_id)
    }

    /// Whether `marmot` must start its own `nats-server` (no `nats.urls` given).
    pub fn embedded_nats(&self) -> bool {
        self.nats.urls.is_empty()
    }
}

fn nonzero_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// `[snapshot]`: when and where snapshots are saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Save and restore snapshots at all.
    pub enabled: bool,
    /// Save a snapshot at this interval, in milliseconds (0 = only by log size).
    #[serde(rename = "interval")]
    pub interval_ms: u64,
    /// Which store holds the snapshots.
    pub store: SnapshotStoreKind,
    /// New: how many snapshots to keep in the store (older ones are deleted). Default 3.
    pub keep: u32,
    /// `[snapshot.nats]`.
    pub nats: SnapshotNatsConfig,
    /// `[snapshot.s3]`.
    pub s3: SnapshotS3Config,
    /// `[snapshot.webdav]`.
    pub webdav: SnapshotWebdavConfig,
    /// `[snapshot.sftp]`.
    pub sftp: SnapshotSftpConfig,
    /// New: `[snapshot.file]`, a local directory.
    pub file: SnapshotFileConfig,
    /// New: `[snapshot.url]`, any URL the `object_store` crate understands (gs://, az://…).
    pub url: SnapshotUrlConfig,
}

/// `[snapshot.file]`: a local directory (new).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotFileConfig {
    /// The directory (created when missing).
    pub path: String,
}

/// `[snapshot.url]`: an `object_store` URL and its options (new).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotUrlConfig {
    /// `gs://bucket/prefix`, `az://container/prefix`, `s3://bucket/prefix`, `file:///dir`.
    pub url: String,
    /// `object_store` configuration keys, e.g. `google_service_account = "/path/key.json"`.
    pub options: std::collections::BTreeMap<String, String>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            enabled: true,
            interval_ms: 0,
            store: SnapshotStoreKind::Nats,
            keep: 3,
            nats: SnapshotNatsConfig::default(),
            s3: SnapshotS3Config::default(),
            webdav: SnapshotWebdavConfig::default(),
            sftp: SnapshotSftpConfig::default(),
            file: SnapshotFileConfig::default(),
            url: SnapshotUrlConfig::default(),
        }
    }
}

impl SnapshotConfig {
    /// `interval` as a duration; `None` when 0.
    pub fn interval(&self) -> Option<Duration> {
        nonzero_ms(self.interval_ms)
    }
}

/// `snapshot.store`: the kind of snapshot store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStoreKind {
    /// The NATS JetStream object store (v1 default).
    #[default]
    Nats,
    /// An S3-compatible object store.
    S3,
    /// A WebDAV server.
    Webdav,
    /// An SFTP server.
    Sftp,
    /// New: a local directory (`[snapshot.file] path`).
    File,
    /// New: an `object_store` URL (`[snapshot.url]`): GCS, Azure, S3, local.
    Url,
}

/// `[snapshot.nats]`: the JetStream object store bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotNatsConfig {
    /// Replicas of the bucket.
    pub replicas: u32,
    /// Bucket name; empty means `<stream_prefix>-snapshot-store`.
    pub bucket: String,
}

impl Default for SnapshotNatsConfig {
    fn default() -> Self {
        SnapshotNatsConfig { replicas: 1, bucket: String::new() }
    }
}

impl SnapshotNatsConfig {
    /// The bucket to use: `bucket`, or `<stream_prefix>-snapshot-store` when empty.
    pub fn bucket_or_default(&self, stream_prefix: &str) -> String {
        if self.bucket.is_empty() {
            format!("{stream_prefix}-snapshot-store")
        } else {
            self.bucket.clone()
        }
    }
}

/// `[snapshot.s3]`: an S3-compatible store.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotS3Config {
    /// Endpoint, `host[:port]`.
    pub endpoint: String,
    /// Key prefix inside the bucket.
    pub path: String,
    /// Bucket name.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret: String,
    /// Session token for temporary credentials.
    pub session_token: String,
    /// Use HTTPS.
    pub use_ssl: bool,
}

/// `[snapshot.webdav]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotWebdavConfig {
    /// `https://host/path?dir=/snapshots/path&login=USER&secret=PASS`.
    pub url: String,
}

/// `[snapshot.sftp]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSftpConfig {
    /// `sftp://user:password@host:port/path`.
    pub url: String,
    /// New: the server's host key, as a known-hosts line or a `SHA256:…` fingerprint.
    /// Required: an unknown host key is never accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
}

/// `[replication]`: which tables this node replicates. Glob patterns (`*`, `?`) matched
/// against whole table names; empty `include` means every table with a primary key;
/// `exclude` wins. Excluded tables get no triggers and are never written by the merge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Tables to replicate (empty: all).
    pub include: Vec<String>,
    /// Tables not to replicate.
    pub exclude: Vec<String>,
}

impl ReplicationConfig {
    /// The selection capture and the merge follow.
    pub fn selection(&self) -> marmot_core::sqlite::TableSelection {
        marmot_core::sqlite::TableSelection { include: self.include.clone(), exclude: self.exclude.clone() }
    }
}

/// `[conflicts]`: the journal of writes that last-writer-wins overwrote without their data
/// having been seen (docs/conflicts.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConflictsConfig {
    /// Keep the journal.
    pub enabled: bool,
    /// Remove entries whose losing write is older than this, in milliseconds (0: keep).
    #[serde(rename = "retention")]
    pub retention_ms: u64,
}

impl Default for ConflictsConfig {
    fn default() -> Self {
        ConflictsConfig { enabled: true, retention_ms: marmot_core::engine::CONFLICTS_RETENTION_MS_DEFAULT }
    }
}

/// `[replication_log]`: the JetStream streams that carry changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationLogConfig {
    /// Number of shards (streams).
    pub shards: u32,
    /// Entries kept per stream before the oldest are discarded.
    pub max_entries: u64,
    /// Stream replicas; values below 1 mean `shards/2 + 1`. At most 5 either way.
    pub replicas: i64,
    /// Compress change batches with zstd.
    pub compress: bool,
    /// Update the settings of existing streams to match this configuration.
    pub update_existing: bool,
}

impl Default for ReplicationLogConfig {
    fn default() -> Self {
        ReplicationLogConfig { shards: 1, max_entries: 1024, replicas: 1, compress: true, update_existing: false }
    }
}

/// The most replicas JetStream allows for a stream.
pub const MAX_STREAM_REPLICAS: u32 = 5;

impl ReplicationLogConfig {
    /// The replica count to use: `replicas`, or `shards/2 + 1` when below 1; capped at 5.
    pub fn effective_replicas(&self) -> u32 {
        let wanted = if self.replicas < 1 { i64::from(self.shards / 2 + 1) } else { self.replicas };
        wanted.clamp(1, i64::from(MAX_STREAM_REPLICAS)) as u32
    }

    /// Entries one shard's stream keeps: `max_entries / shards`, at least 1. The bounds
    /// that keep a node from falling off a stream (saving only when caught up, parking an
    /// incomplete batch, pausing publishing) are a quarter of it.
    pub fn entries_per_shard(&self) -> u64 {
        (self.max_entries / u64::from(self.shards.max(1))).max(1)
    }
}

/// `[nats]`: how to reach NATS, or how to run the embedded server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs; empty starts the embedded `nats-server`.
    pub urls: Vec<String>,
    /// Subjects are `<subject_prefix>-<shard>`.
    pub subject_prefix: String,
    /// Streams are `<stream_prefix>-<shard>`.
    pub stream_prefix: String,
    /// A nats-server configuration file for the embedded server.
    pub server_config: String,
    /// An nkey seed file.
    pub seed_file: String,
    /// User name.
    pub user_name: String,
    /// User password.
    pub user_password: String,
    /// CA certificate file for TLS.
    pub ca_file: String,
    /// Client certificate file for TLS.
    pub cert_file: String,
    /// Client key file for TLS.
    pub key_file: String,
    /// Client listen address of the embedded server (`:-1` = a random port).
    pub bind_address: String,
    /// Connection attempts before giving up at start.
    pub connect_retries: u32,
    /// Seconds between reconnection attempts.
    pub reconnect_wait_seconds: u64,
    /// New: the `nats-server` binary for the embedded server (default: found on `PATH`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_path: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            urls: Vec::new(),
            subject_prefix: "marmot-change-log".into(),
            stream_prefix: "marmot-changes".into(),
            server_config: String::new(),
            seed_file: String::new(),
            user_name: String::new(),
            user_password: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            bind_address: ":-1".into(),
            connect_retries: 5,
            reconnect_wait_seconds: 2,
            server_path: None,
        }
    }
}

impl NatsConfig {
    /// `reconnect_wait_seconds` as a duration.
    pub fn reconnect_wait(&self) -> Duration {
        Duration::from_secs(self.reconnect_wait_seconds)
    }
}

/// `[logging]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Log at debug level.
    pub verbose: bool,
    /// Console (human) or JSON lines.
    pub format: LogFormat,
}

/// `logging.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Console,
    /// One JSON object per line.
    Json,
}

/// `[prometheus]`: the metrics endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Serve metrics.
    pub enable: bool,
    /// Listen address, `host:port` (`:3010` = every interface).
    pub bind: String,
    /// Metric namespace.
    pub namespace: String,
    /// Metric subsystem.
    pub subsystem: String,
}

impl Default for PrometheusConfig {
    fn default() -> Self {
        PrometheusConfig { enable: false, bind: ":3010".into(), namespace: "marmot".into(), subsystem: String::new() }
    }
}

/// The default `node_id`: a 63-bit hash of `/etc/machine-id` (falling back to
/// `/var/lib/dbus/machine-id`, then the host name), never 0.
pub fn default_node_id() -> u64 {
    let seed = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .or_else(host_name)
        .unwrap_or_else(|| "marmot".to_owned());
    node_id_from(&seed)
}

/// Hashes a machine identity into a non-zero node id. The hash keeps 63 bits so that the
/// id can be written back into a TOML file (TOML integers are signed 64-bit).
pub fn node_id_from(seed: &str) -> u64 {
    let hash = xxhash_rust::xxh3::xxh3_64(seed.as_bytes()) & (i64::MAX as u64);
    hash.max(1)
}

fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .chain(std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
}
