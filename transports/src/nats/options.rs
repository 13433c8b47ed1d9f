//! [`NatsOptions`]: everything [`NatsTransport`](super::NatsTransport) needs to connect and
//! to lay out its streams. Plain data: the command line maps its configuration into it.

use std::path::PathBuf;
use std::time::Duration;

/// Default stream name prefix (Marmot v1: `nats.stream_prefix`).
pub const DEFAULT_STREAM_PREFIX: &str = "marmot-changes";
/// Default subject prefix (Marmot v1: `nats.subject_prefix`).
pub const DEFAULT_SUBJECT_PREFIX: &str = "marmot-change-log";

/// How to reach JetStream and how the shard streams are configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsOptions {
    /// Server URLs (`nats://host:port`, `tls://host:port`); at least one.
    pub urls: Vec<String>,
    /// User name for user/password authentication (with `user_password`).
    pub user_name: Option<String>,
    /// Password for user/password authentication (with `user_name`).
    pub user_password: Option<String>,
    /// A file holding an nkey user seed (`SU…`), alone or inside a `.creds`-style file.
    pub seed_file: Option<PathBuf>,
    /// PEM file of CA certificates that sign the server's certificate. Implies TLS.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`). Implies TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Longest wait between two connection attempts. Attempts back off exponentially from
    /// 50 ms up to this; they never stop (Marmot v1: `reconnect_wait_seconds`).
    pub reconnect_wait_max: Duration,
    /// Connection attempts at start before giving up (`None`: keep trying for ever).
    /// After the first connection, the client reconnects for ever regardless.
    pub connect_attempts_max: Option<usize>,
    /// How long one JetStream request or publish acknowledgement may take before it fails
    /// with a retryable error.
    pub request_timeout: Duration,
    /// Streams are named `<stream_prefix>-<shard>`.
    pub stream_prefix: String,
    /// Stream `<stream_prefix>-<shard>` holds subject `<subject_prefix>-<shard>`.
    pub subject_prefix: String,
    /// Number of shards (streams); at least 1.
    pub shards: u32,
    /// Most entries one stream keeps (its `max_msgs`); the oldest are dropped beyond it.
    pub max_entries: u64,
    /// Stream replicas, 1 to 5.
    pub replicas: usize,
    /// How long the server remembers a `Nats-Msg-Id` to drop republished entries.
    pub duplicate_window: Duration,
    /// Update streams whose settings differ from these options instead of failing.
    pub update_existing: bool,
    /// Connection name shown by the server's monitoring (for example `marmot-node-1`).
    pub client_name: Option<String>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            urls: vec!["nats://127.0.0.1:4222".to_string()],
            user_name: None,
            user_password: None,
            seed_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            reconnect_wait_max: Duration::from_secs(2),
            connect_attempts_max: None,
            request_timeout: Duration::from_secs(10),
            stream_prefix: DEFAULT_STREAM_PREFIX.to_string(),
            subject_prefix: DEFAULT_SUBJECT_PREFIX.to_string(),
            shards: 1,
            max_entries: 1024,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            update_existing: false,
            client_name: None,
        }
    }
}

impl NatsOptions {
    /// The name of the stream that holds `shard`.
    pub fn stream_name(&self, shard: u32) -> String {
        format!("{}-{}", self.stream_prefix, shard)
    }

    /// The subject that entries of `shard` are published on.
    pub fn subject(&self, shard: u32) -> String {
        format!("{}-{}", self.subject_prefix, shard)
    }

    /// Checks the values that the server would otherwise reject less clearly.
    pub fn validate(&self) -> Result<(), String> {
        if self.urls.is_empty() {
            return Err("nats.urls: at least one server URL is needed".into());
        }
        if self.shards == 0 {
            return Err("replication_log.shards must be at least 1".into());
        }
        if self.max_entries == 0 || self.max_entries > i64::MAX as u64 {
            return Err(format!(
                "replication_log.max_entries must be between 1 and {} (got {})",
                i64::MAX,
                self.max_entries
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!("replication_log.replicas must be between 1 and 5 (got {})", self.replicas));
        }
        if self.user_name.is_some() != self.user_password.is_some() {
            return Err("nats.user_name and nats.user_password must be set together".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("nats.cert_file and nats.key_file must be set together".into());
        }
        for (what, prefix) in [("stream_prefix", &self.stream_prefix), ("subject_prefix", &self.subject_prefix)] {
            let bad = |c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\');
            if prefix.is_empty() || prefix.contains(bad) {
                return Err(format!("nats.{what} {prefix:?} must be non-empty, without spaces, '.', '*', '>', '/'"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_marmot_v1() {
        let o = NatsOptions::default();
        assert_eq!(o.stream_name(3), "marmot-changes-3");
        assert_eq!(o.subject(0), "marmot-change-log-0");
        assert!(o.validate().is_ok());
    }

    #[test]
    fn validate_rejects_out_of_range_replicas_and_bad_prefixes() {
        let o = NatsOptions { replicas: 6, ..NatsOptions::default() };
        assert!(o.validate().unwrap_err().contains("replicas"));
        let o = NatsOptions { stream_prefix: "a.b".into(), ..NatsOptions::default() };
        assert!(o.validate().unwrap_err().contains("stream_prefix"));
        let o = NatsOptions { user_name: Some("u".into()), ..NatsOptions::default() };
        assert!(o.validate().unwrap_err().contains("user_password"));
    }
}
