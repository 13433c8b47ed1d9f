//! The node's side of `marmot verify`: every running node answers requests on
//! `<subject_prefix>-verify` with digests of its replicated tables
//! ([`marmot_core::sqlite::Db::digests`]), the sub-bucket digests of one bucket, or the rows
//! of some sub-buckets, each read in one read transaction on a connection of its own (a
//! WAL reader never blocks the application's writes); and records the result a `verify`
//! run announces at its end, for `status` and the metrics.

use std::sync::Arc;

use futures::StreamExt;
use marmot_core::sqlite::{BucketRow, Db, Digests};
use marmot_core::NodeId;
use marmot_transports::NatsTransport;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::config::Config;

/// What `verify` asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// Every replicated table's bucket digests.
    Digests,
    /// The sub-bucket digests of a bucket.
    SubDigests {
        /// The table.
        table: String,
        /// The bucket.
        bucket: usize,
    },
    /// The rows of some sub-buckets of a bucket.
    Rows {
        /// The table.
        table: String,
        /// The bucket.
        bucket: usize,
        /// Its sub-buckets (all when empty).
        subs: Vec<usize>,
    },
    /// The run's result.
    Result {
        /// 0 identical, 1 differ, 2 inconclusive.
        code: u8,
        /// When it ended (ms since the Unix epoch).
        at_ms: u64,
        /// One line.
        summary: String,
    },
}

/// A node's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The answering node.
    pub node_id: u64,
    /// For [`Request::Digests`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<Digests>,
    /// For [`Request::SubDigests`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_digests: Option<Vec<u64>>,
    /// For [`Request::Rows`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<BucketRow>>,
    /// What went wrong answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The subject verify requests go to.
pub fn subject(config: &Config) -> String {
    format!("{}-verify", config.nats.subject_prefix)
}

/// Answers verify requests until the returned task is aborted.
pub async fn listen(
    config: Arc<Config>,
    transport: &NatsTransport,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let client = transport.client().clone();
    let mut sub = client.subscribe(subject(&config)).await?;
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let request: Request = match serde_json::from_slice(&msg.payload) {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "ignoring a malformed verify request");
                    continue;
                }
            };
            let config = config.clone();
            let answer = tokio::task::spawn_blocking(move || answer(&config, request)).await;
            let reply = match answer {
                Ok(reply) => reply,
                Err(e) => Reply { error: Some(format!("answering failed: {e}")), ..Reply::default() },
            };
            // A result is announced without a reply subject.
            let Some(reply_to) = msg.reply.clone() else {
                if let Some(e) = reply.error {
                    warn!(error = %e, "could not record a verify result");
                }
                continue;
            };
            let bytes = serde_json::to_vec(&reply).expect("a reply serializes");
            if let Err(e) = client.publish(reply_to, bytes.into()).await {
                warn!(error = %e, "could not answer a verify request");
            }
        }
    }))
}

fn answer(config: &Config, request: Request) -> Reply {
    let node_id = config.node_id;
    let result = Db::open(&config.db_path, NodeId(node_id), config.capture_options()).and_then(|db| {
        let mut reply = Reply { node_id, ..Reply::default() };
        match request {
            Request::Digests => reply.digests = Some(db.digests()?),
            Request::SubDigests { table, bucket } => reply.sub_digests = Some(db.sub_digests(&table, bucket)?),
            Request::Rows { table, bucket, subs } => reply.rows = Some(db.bucket_rows(&table, bucket, &subs)?),
            Request::Result { code, at_ms, summary } => {
                db.conn()
                    .execute_batch(&format!(
                        "INSERT OR REPLACE INTO __marmot__state(key, value) VALUES ('verify_result', {code}), \
                         ('verify_at_ms', {at_ms})"
                    ))
                    .map_err(|e| marmot_core::Error::Database(format!("recording the verify result: {e}")))?;
                crate::metrics::set_verify(code, at_ms);
                info!(code, summary, "marmot verify ended");
            }
        }
        Ok(reply)
    });
    result.unwrap_or_else(|e| Reply { node_id, error: Some(e.to_string()), ..Reply::default() })
}
