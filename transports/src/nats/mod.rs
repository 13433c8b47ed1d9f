//! [`NatsTransport`]: the production [`LogTransport`], one JetStream stream per shard.
//!
//! Owns the NATS connection and the shard streams `<stream_prefix>-<shard>` (subject
//! `<subject_prefix>-<shard>`), which it creates on connect when missing. Positions are
//! stream sequences. Deduplication is JetStream's: every entry is published with its id
//! in the `Nats-Msg-Id` header, and a duplicate within the stream's duplicate window is
//! acknowledged with the sequence of the entry stored first.
//!
//! Tolerates: servers down at start or lost later (unlimited reconnects with backoff;
//! calls made meanwhile fail with retryable errors), stream leader elections (retryable),
//! several nodes creating the same streams at once. Detects: entries dropped by
//! `max_msgs` before a subscriber read them ([`Error::Truncated`]), streams configured
//! differently from the options (a clear error, or an update with `update_existing`).

mod connect;
mod errors;
pub mod lease;
mod options;
mod streams;
mod subscription;

use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use marmot_core::{Bounds, Error, LogTransport, Position, Result, Shard, Subscription};
use tracing::{debug, warn};

pub use options::{NatsOptions, DEFAULT_STREAM_PREFIX, DEFAULT_SUBJECT_PREFIX};
pub use subscription::NatsSubscription;

/// How often a publish is asked again when JetStream reports it as a duplicate of an entry
/// still being stored (clustered streams: "duplicate message id is in process", or a
/// duplicate acknowledged with sequence 0 by older servers).
const DUPLICATE_IN_FLIGHT_RETRIES: u32 = 20;
/// The wait between those retries.
const DUPLICATE_IN_FLIGHT_WAIT: Duration = Duration::from_millis(50);
/// Longest life of one pull request of a subscription. Idle heartbeats come at half of
/// it, and two missed heartbeats make the ordered consumer recreate itself, so this bounds
/// how long a subscription stays silent after its server restarted (about twice this).
pub const PULL_EXPIRES_MAX: Duration = Duration::from_secs(4);
/// Most publish acknowledgements awaited at once per transport; further publishes wait.
pub const ACKS_IN_FLIGHT_MAX: usize = 4096;

/// A [`LogTransport`] over NATS JetStream.
pub struct NatsTransport {
    client: async_nats::Client,
    js: Context,
    opts: NatsOptions,
}

impl NatsTransport {
    /// Connects (waiting for the servers as long as they are unreachable) and makes sure
    /// every shard stream exists with the configured settings.
    ///
    /// Fails at once, without retrying, for invalid options, bad credentials or TLS files,
    /// and a stream with different settings while `update_existing` is false.
    pub async fn connect(opts: NatsOptions) -> Result<NatsTransport> {
        opts.validate().map_err(|m| Error::Transport { message: m, retryable: false })?;
        let client = connect::connect(&opts).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(opts.request_timeout)
            .max_ack_inflight(ACKS_IN_FLIGHT_MAX)
            .backpressure_on_inflight(true)
            .build(client.clone());
        for shard in 0..opts.shards {
            let wanted = streams::desired_config(&opts, shard);
            streams::ensure_with_retry(&js, &wanted, opts.update_existing, opts.reconnect_wait_max).await?;
        }
        Ok(NatsTransport { client, js, opts })
    }

    /// The options this transport was made with.
    pub fn options(&self) -> &NatsOptions {
        &self.opts
    }

    /// The underlying client, for other users of the same connection (snapshot store, KV).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context of the connection.
    pub fn jetstream(&self) -> &Context {
        &self.js
    }

    fn check(&self, shard: Shard) -> Result<()> {
        if shard.0 < self.opts.shards {
            Ok(())
        } else {
            Err(Error::Transport {
                message: format!("shard {shard} out of range (shards: {})", self.opts.shards),
                retryable: false,
            })
        }
    }

    /// One publish and its acknowledgement.
    async fn publish_once(
        &self,
        subject: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, id);
        let ack = self.js.publish_with_headers(subject.to_string(), headers, payload).await?;
        ack.await
    }
}

#[async_trait]
impl LogTransport for NatsTransport {
    fn shard_count(&self) -> u32 {
        self.opts.shards
    }

    async fn publish(&self, shard: Shard, id: &str, payload: Bytes) -> Result<Position> {
        self.check(shard)?;
        let subject = self.opts.subject(shard.0);
        let stream = self.opts.stream_name(shard.0);
        for _ in 0..DUPLICATE_IN_FLIGHT_RETRIES {
            let ack = match self.publish_once(&subject, id, payload.clone()).await {
                Ok(ack) => ack,
                // The original is still being replicated: its position comes soon.
                Err(e) if errors::is_duplicate_in_flight(&e) => {
                    tokio::time::sleep(DUPLICATE_IN_FLIGHT_WAIT).await;
                    continue;
                }
                Err(e) => return Err(errors::publish(&subject, e)),
            };
            if ack.stream != stream {
                return Err(errors::permanent(
                    format!("publish to {subject}"),
                    format!("stored by stream {} instead of {stream}", ack.stream),
                ));
            }
            // JetStream answers a duplicate with the sequence of the stored original;
            // older servers answer 0 while a clustered original is still in flight.
            if ack.sequence > 0 {
                if ack.duplicate {
                    debug!(stream = %stream, id, position = ack.sequence, "duplicate publish");
                }
                return Ok(Position(ack.sequence));
            }
            tokio::time::sleep(DUPLICATE_IN_FLIGHT_WAIT).await;
        }
        Err(errors::retryable(
            format!("publish to {subject}"),
            format!("entry {id:?} is a duplicate of one still being stored"),
        ))
    }

    async fn subscribe(&self, shard: Shard, after: Position) -> Result<Box<dyn Subscription>> {
        let bounds = self.bounds(shard).await?;
        if !bounds.can_resume_after(after) {
            return Err(Error::Truncated { shard, position: after, first: bounds.first });
        }
        if after > bounds.last {
            warn!(shard = %shard, after = %after, last = %bounds.last,
                  "subscribing after a position the stream never reached; was it recreated?");
        }
        let stream = self.opts.stream_name(shard.0);
        let config = OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after.0 + 1 },
            max_expires: PULL_EXPIRES_MAX,
            ..OrderedConfig::default()
        };
        let consumer = self
            .js
            .create_consumer_on_stream(config, &stream)
            .await
            .map_err(|e| errors::retryable(format!("create consumer on {stream}"), e))?;
        let messages = consumer.messages().await.map_err(|e| errors::retryable(format!("read {stream}"), e))?;
        debug!(shard = %shard, after = %after, stream = %stream, "subscribed");
        Ok(Box::new(NatsSubscription::new(shard, stream, messages, after)))
    }

    async fn bounds(&self, shard: Shard) -> Result<Bounds> {
        self.check(shard)?;
        let name = self.opts.stream_name(shard.0);
        let stream = self.js.get_stream(&name).await.map_err(|e| {
            errors::get_stream(&name, e)
                .unwrap_or_else(|| errors::permanent(format!("stream {name}"), "does not exist"))
        })?;
        let state = &stream.cached_info().state;
        Ok(Bounds { first: Position(state.first_sequence.max(1)), last: Position(state.last_sequence) })
    }
}
