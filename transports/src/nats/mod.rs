//! [`NatsTransport`]: the production [`LogTransport`], one JetStream stream per shard.
//!
//! Owns the NATS connection and the shard streams `<stream_prefix>-<shard>` (subject
//! `<subject_prefix>-<shard>`), which it creates on connect when missing. Positions are
//! stream sequences. Deduplication is JetStream's: every entry is published with its id
//! in the `Nats-Msg-Id` header, and a duplicate within the stream's duplicate window is
//! acknowledged with the sequence of the entry stored first.
//!
//! Tolerates: servers down at start or lost later (unlimited reconnects with backoff; a
//! publish whose acknowledgement went down with the connection is sent again with the same
//! id at once instead of waiting out its timeout, subscriptions replace their consumers;
//! other calls made meanwhile fail with retryable errors), stream leader elections (a
//! publish keeps asking while there is no leader, for a while, and one whose
//! acknowledgement the old leader still owed is sent again once a new one is elected),
//! several nodes creating the same streams at once. Detects: entries dropped by
//! `max_msgs` before a subscriber read them ([`Error::Truncated`]), streams configured
//! differently from the options (a clear error, or an update with `update_existing`).

mod connect;
mod errors;
pub mod lease;
mod options;
mod streams;
mod subscription;

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use marmot_core::{Bounds, Error, LogTransport, Position, Result, Shard, Subscription};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

pub use options::{NatsOptions, DEFAULT_STREAM_PREFIX, DEFAULT_SUBJECT_PREFIX};
pub use subscription::NatsSubscription;

/// How often a publish is asked again when JetStream reports it as a duplicate of an entry
/// still being stored (clustered streams: "duplicate message id is in process", or a
/// duplicate acknowledged with sequence 0 by older servers).
const DUPLICATE_IN_FLIGHT_RETRIES: u32 = 20;
/// The wait between those retries.
const DUPLICATE_IN_FLIGHT_WAIT: Duration = Duration::from_millis(50);
/// How long one publish keeps asking while its stream has no leader (JetStream answers "no
/// responders" from the moment the leader is lost until the next one is elected, a few
/// seconds) before failing with a retryable error and leaving the retries to the caller's
/// backoff. Asking often lets the publish through as soon as the leader is there; failing
/// soon lets the caller do other work meanwhile.
const LEADERLESS_RETRY_FOR: Duration = Duration::from_secs(2);
/// The wait between those attempts.
const LEADERLESS_RETRY_WAIT: Duration = Duration::from_millis(100);
/// Longest life of one pull request of a subscription.
pub const PULL_EXPIRES_MAX: Duration = Duration::from_secs(4);
/// How often the server tells an idle subscription that its consumer is alive. A consumer
/// silent for twice this is presumed lost with its server and replaced, so this bounds how
/// long a subscription stays silent after the server holding its consumer died.
pub const IDLE_HEARTBEAT: Duration = Duration::from_secs(1);
/// Most publish acknowledgements awaited at once per transport; further publishes wait.
pub const ACKS_IN_FLIGHT_MAX: usize = 4096;
/// How often one publish is sent again because the connection was lost, or its stream
/// elected a new leader, while its acknowledgement was awaited; after that it waits for the
/// acknowledgement until `request_timeout`.
const REPUBLISHES_MAX: u32 = 8;
/// How long an acknowledgement no caller waits for any more (its publish was sent again, or
/// given up) keeps its place among the [`ACKS_IN_FLIGHT_MAX`]. Short, so that
/// acknowledgements lost with a connection or a leader do not hold back the publishes that
/// replace them.
const ABANDONED_ACK_WAIT: Duration = Duration::from_secs(1);

/// A [`LogTransport`] over NATS JetStream.
pub struct NatsTransport {
    client: async_nats::Client,
    js: Context,
    /// Losses of the connection.
    losses: connect::Counter,
    /// Leader elections of each shard stream, counted by `advisories`.
    elections: Vec<connect::Counter>,
    advisories: JoinHandle<()>,
    opts: NatsOptions,
}

impl Drop for NatsTransport {
    fn drop(&mut self) {
        self.advisories.abort();
    }
}

impl NatsTransport {
    /// Connects (waiting for the servers as long as they are unreachable) and makes sure
    /// every shard stream exists with the configured settings.
    ///
    /// Fails at once, without retrying, for invalid options, bad credentials or TLS files,
    /// and a stream with different settings while `update_existing` is false.
    pub async fn connect(opts: NatsOptions) -> Result<NatsTransport> {
        opts.validate().map_err(|m| Error::Transport { message: m, retryable: false })?;
        let (client, losses) = connect::connect(&opts).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(opts.request_timeout)
            .ack_timeout(ABANDONED_ACK_WAIT)
            .max_ack_inflight(ACKS_IN_FLIGHT_MAX)
            .backpressure_on_inflight(true)
            .build(client.clone());
        for shard in 0..opts.shards {
            let wanted = streams::desired_config(&opts, shard);
            streams::ensure_with_retry(
                &js,
                &wanted,
                opts.update_existing,
                opts.reconnect_wait_max,
                opts.request_timeout,
            )
            .await?;
        }
        let (elections, advisories) = streams::count_leader_elections(&client, &opts).await?;
        Ok(NatsTransport { client, js, losses, elections, advisories, opts })
    }

    /// When `shard`'s stream is full (it holds `max_entries`), how many entries it holds and
    /// the time between its oldest and newest one: how long a node may stall before what it
    /// has not read is dropped, at the recent publish rate. `None` while it is not full.
    pub async fn retained_span(&self, shard: Shard) -> Result<Option<(u64, Duration)>> {
        let name = self.opts.stream_name(shard.0);
        let stream = self.js.get_stream(&name).await.map_err(|e| {
            errors::get_stream(&name, e)
                .unwrap_or_else(|| errors::permanent(format!("stream {name}"), "does not exist"))
        })?;
        let state = &stream.cached_info().state;
        if state.messages < self.opts.max_entries {
            return Ok(None);
        }
        let span = state.last_timestamp - state.first_timestamp;
        Ok(Some((state.messages, Duration::try_from(span).unwrap_or_default())))
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

    /// One publish and its acknowledgement. When the connection is lost, or the stream
    /// elects a new leader, before the acknowledgement came, the acknowledgement may never
    /// come (the reply was routed to the lost connection, or the request to the lost leader)
    /// and the entry may or may not be stored: it is sent again at once with the same id,
    /// which the stream stores at most once.
    async fn publish_once(
        &self,
        shard: Shard,
        subject: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        let mut losses = self.losses.clone();
        let mut elections = self.elections[shard.0 as usize].clone();
        let mut republished = 0;
        loop {
            let (losses_seen, elections_seen) = (connect::count(&losses), connect::count(&elections));
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, id);
            let ack = self.js.publish_with_headers(subject.to_string(), headers, payload.clone()).await?;
            let can_republish = republished < REPUBLISHES_MAX;
            let why = tokio::select! {
                ack = ack.into_future() => return ack,
                () = connect::changed_from(&mut losses, losses_seen), if can_republish => "connection lost",
                () = connect::changed_from(&mut elections, elections_seen), if can_republish => "new stream leader",
            };
            republished += 1;
            debug!(subject, id, republished, why, "acknowledgement may never come; publishing again");
        }
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
        let leaderless_until = tokio::time::Instant::now() + LEADERLESS_RETRY_FOR;
        let mut duplicates = 0;
        while duplicates < DUPLICATE_IN_FLIGHT_RETRIES {
            let ack = match self.publish_once(shard, &subject, id, payload.clone()).await {
                Ok(ack) => ack,
                // The original is still being replicated: its position comes soon.
                Err(e) if errors::is_duplicate_in_flight(&e) => {
                    duplicates += 1;
                    tokio::time::sleep(DUPLICATE_IN_FLIGHT_WAIT).await;
                    continue;
                }
                Err(e) if errors::is_leaderless(&e) && tokio::time::Instant::now() < leaderless_until => {
                    tokio::time::sleep(LEADERLESS_RETRY_WAIT).await;
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
            duplicates += 1;
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
        let source = subscription::ConsumerSource {
            js: self.js.clone(),
            stream: self.opts.stream_name(shard.0),
            losses: self.losses.clone(),
            request_timeout: self.opts.request_timeout,
            wait_max: self.opts.reconnect_wait_max,
        };
        let sub = NatsSubscription::open(shard, source, after).await?;
        debug!(shard = %shard, after = %after, "subscribed");
        Ok(Box::new(sub))
    }

    async fn bounds(&self, shard: Shard) -> Result<Bounds> {
        self.check(shard)?;
        let name = self.opts.stream_name(shard.0);
        let stream = self.js.get_stream(&name).await.map_err(|e| {
            errors::get_stream(&name, e)
                .unwrap_or_else(|| errors::permanent(format!("stream {name}"), "does not exist"))
        })?;
        let info = stream.cached_info();
        let state = &info.state;
        let epoch = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        Ok(Bounds { first: Position(state.first_sequence.max(1)), last: Position(state.last_sequence), epoch })
    }
}
