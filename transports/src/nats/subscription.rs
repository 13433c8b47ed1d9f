//! [`NatsSubscription`]: one shard read in order through an ephemeral, unacknowledged pull
//! consumer (JetStream's "ordered consumer"), which this reader replaces itself.
//!
//! Such a consumer has one replica, in memory, on one server: it dies with that server, and
//! deliveries in flight are lost with the connection. The reader therefore replaces its
//! consumer with one starting after the last entry it delivered when the connection was lost
//! (at once, without waiting for heartbeats), when the consumer stayed silent for two idle
//! heartbeats (its server died), when a delivery is missing (a gap in consumer sequence) and on
//! any error of the consumer. Replacing runs in the background with backoff and never gives
//! up; meanwhile [`next_entries`](Subscription::next_entries) returns nothing. The old
//! consumer is deleted without waiting for the answer, which never comes when its server is
//! the dead one (the server also drops a consumer nobody pulls from after
//! [`INACTIVE_THRESHOLD`]).
//!
//! While the cluster elects a new meta leader (its old one died), requests to create a
//! consumer go unanswered, and a consumer placed on a server that just died is never
//! confirmed. So each attempt is given up after [`CREATE_ATTEMPT_TIMEOUT`] rather than the
//! full request timeout, and the next one asks for a new consumer (reusing the name would
//! find the stuck one). The wait grows with the attempts so that a server that is merely slow
//! still gets to answer; a consumer it creates after its attempt was given up is never
//! pulled from and dropped after [`INACTIVE_THRESHOLD`].
//!
//! Entries already delivered are dropped, so each is returned once. A jump in stream sequence
//! can only mean that the stream dropped entries this reader had not read yet (max_msgs): that
//! is reported as [`Error::Truncated`], and the subscription stays failed.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::Context;
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use marmot_core::{Entry, Error, Position, Result, Shard, Subscription};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::connect::{self, Counter};
use super::errors::retryable;
use super::{IDLE_HEARTBEAT, PULL_EXPIRES_MAX};

/// Most entries one pull request asks for (fewer if the server caps requests lower).
const PULL_BATCH_MAX: usize = 500;
/// How long the server keeps a consumer that nobody pulls from, such as one replaced while
/// its deletion could not be confirmed.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);
/// Longest wait for the answer to one of the first attempts to create a replacement
/// consumer; see [`create_attempt_timeout`].
const CREATE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Attempts after which the wait for the answer grows by [`CREATE_ATTEMPT_TIMEOUT`].
const CREATE_ATTEMPTS_PER_STEP: usize = 4;

/// The wait for the answer to attempt `attempt` (1-based) to create a replacement consumer:
/// [`CREATE_ATTEMPT_TIMEOUT`] for the first [`CREATE_ATTEMPTS_PER_STEP`] attempts (long
/// enough for a healthy cluster, short enough to ask again soon after an election), then
/// growing by as much every [`CREATE_ATTEMPTS_PER_STEP`] attempts up to `request_timeout`.
fn create_attempt_timeout(attempt: usize, request_timeout: Duration) -> Duration {
    let steps = 1 + attempt.saturating_sub(1) / CREATE_ATTEMPTS_PER_STEP;
    CREATE_ATTEMPT_TIMEOUT.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX)).min(request_timeout)
}

/// What a subscription needs to create consumers on its stream.
#[derive(Clone)]
pub(crate) struct ConsumerSource {
    pub js: Context,
    pub stream: String,
    /// Connection losses.
    pub losses: Counter,
    /// The transport's longest wait for an answer.
    pub request_timeout: Duration,
    /// Longest wait between two attempts to create a replacement consumer.
    pub wait_max: Duration,
}

/// One consumer and its messages.
struct Consumer {
    name: String,
    messages: pull::Stream,
    /// Consumer sequence of the last delivery taken from `messages`.
    sequence: u64,
    /// Connection losses counted before the consumer was created: any further loss may have
    /// taken deliveries or the consumer itself with it.
    created_after_losses: u64,
}

enum State {
    Reading(Box<Consumer>),
    Replacing(JoinHandle<Box<Consumer>>),
}

/// What the consumer did next.
enum Event {
    Entry(Position, Bytes),
    Broken(String),
    Replaced(Box<Consumer>),
}

impl ConsumerSource {
    /// Creates a consumer that starts after `after`, waiting at most `timeout` for the
    /// answer. Fails (retryable) if the connection is lost meanwhile, as the answer may then
    /// never come.
    async fn create(&self, after: Position, timeout: Duration) -> Result<Box<Consumer>> {
        let seen = connect::count(&self.losses);
        let mut losses = self.losses.clone();
        let mut js = self.js.clone();
        js.set_timeout(timeout);
        tokio::select! {
            consumer = self.create_with(&js, after, seen) => consumer,
            () = connect::changed_from(&mut losses, seen) => {
                Err(retryable(format!("create consumer on {}", self.stream), "connection lost"))
            }
        }
    }

    async fn create_with(&self, js: &Context, after: Position, seen: u64) -> Result<Box<Consumer>> {
        let config = pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after.0 + 1 },
            ack_policy: AckPolicy::None,
            max_expires: PULL_EXPIRES_MAX,
            inactive_threshold: INACTIVE_THRESHOLD,
            num_replicas: 1,
            memory_storage: true,
            ..pull::Config::default()
        };
        let consumer = js
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|e| retryable(format!("create consumer on {}", self.stream), e))?;
        let info = consumer.cached_info();
        let name = info.name.clone();
        let batch = match usize::try_from(info.config.max_batch) {
            Ok(limit) if limit > 0 => PULL_BATCH_MAX.min(limit),
            _ => PULL_BATCH_MAX,
        };
        // The expiry is left to the client, which keeps it within the consumer's
        // `max_expires` and the heartbeat within half of it.
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(IDLE_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| retryable(format!("read {}", self.stream), e))?;
        Ok(Box::new(Consumer { name, messages, sequence: 0, created_after_losses: seen }))
    }

    /// Creates a consumer starting after `after` in the background, retrying until it
    /// succeeds. Attempts start at least a backoff apart; one that timed out has waited that
    /// long already.
    fn replace(&self, after: Position) -> JoinHandle<Box<Consumer>> {
        let source = self.clone();
        tokio::spawn(async move {
            let mut attempt = 0usize;
            loop {
                attempt += 1;
                let started = tokio::time::Instant::now();
                let timeout = create_attempt_timeout(attempt, source.request_timeout);
                match source.create(after, timeout).await {
                    Ok(consumer) => {
                        info!(stream = %source.stream, consumer = %consumer.name, after = %after, attempts = attempt,
                              "consumer replaced");
                        return consumer;
                    }
                    Err(e) => {
                        warn!(stream = %source.stream, after = %after, attempt, error = %e,
                              "cannot replace the consumer yet; retrying")
                    }
                }
                tokio::time::sleep_until(started + connect::backoff(attempt, source.wait_max)).await;
            }
        })
    }

    /// Asks the server to delete consumer `name` without waiting for the answer.
    fn delete_later(&self, name: String) {
        let (js, stream) = (self.js.clone(), self.stream.clone());
        tokio::spawn(async move {
            if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                debug!(stream = %stream, consumer = %name, error = %e, "replaced consumer not deleted");
            }
        });
    }
}

/// An ordered reader of one shard's stream.
pub struct NatsSubscription {
    shard: Shard,
    source: ConsumerSource,
    state: State,
    /// The last position delivered (or the `after` the subscription started with).
    delivered: Position,
    /// Set once entries were found missing; every later call reports it again.
    truncated_at: Option<Position>,
}

impl NatsSubscription {
    /// Creates the first consumer, starting after `after`; its failure is the caller's.
    pub(crate) async fn open(shard: Shard, source: ConsumerSource, after: Position) -> Result<Self> {
        let consumer = source.create(after, source.request_timeout).await?;
        Ok(NatsSubscription { shard, source, state: State::Reading(consumer), delivered: after, truncated_at: None })
    }

    fn truncated(&self, first: Position) -> Error {
        Error::Truncated { shard: self.shard, position: self.delivered, first }
    }

    /// Waits for what happens next: an entry, a reason to replace the consumer, or its
    /// replacement. Cancel-safe.
    async fn next_event(&mut self) -> Event {
        let mut losses = self.source.losses.clone();
        match &mut self.state {
            State::Reading(consumer) => {
                let seen = consumer.created_after_losses;
                tokio::select! {
                    // Entries received before a loss are still good.
                    biased;
                    next = consumer.messages.next() => match next {
                        Some(Ok(message)) => match message.info() {
                            Ok(info) if info.consumer_sequence == consumer.sequence + 1 => {
                                consumer.sequence = info.consumer_sequence;
                                Event::Entry(Position(info.stream_sequence), message.message.payload)
                            }
                            Ok(info) => Event::Broken(format!(
                                "delivery {} missing (got {})",
                                consumer.sequence + 1,
                                info.consumer_sequence
                            )),
                            Err(e) => Event::Broken(format!("delivery without JetStream metadata: {e}")),
                        },
                        Some(Err(e)) => Event::Broken(e.to_string()),
                        None => Event::Broken("consumer ended".to_string()),
                    },
                    () = connect::changed_from(&mut losses, seen) => Event::Broken("connection lost".to_string()),
                }
            }
            State::Replacing(task) => match task.await {
                Ok(consumer) => Event::Replaced(consumer),
                Err(e) => Event::Broken(format!("replacing the consumer failed: {e}")),
            },
        }
    }

    /// Drops the current consumer and starts creating one after the last entry delivered.
    fn replace(&mut self, reason: &str) {
        info!(stream = %self.source.stream, after = %self.delivered, reason, "replacing the consumer");
        let task = self.source.replace(self.delivered);
        match std::mem::replace(&mut self.state, State::Replacing(task)) {
            State::Reading(old) => self.source.delete_later(old.name),
            State::Replacing(old) => old.abort(),
        }
    }

    /// Takes the entry at `position`: `Ok(Some)` a new entry, `Ok(None)` an entry already
    /// delivered, `Err` entries missing before it.
    fn accept(&mut self, position: Position, payload: Bytes) -> Result<Option<Entry>> {
        if position <= self.delivered {
            return Ok(None);
        }
        if position.0 != self.delivered.0 + 1 {
            self.truncated_at = Some(position);
            return Err(self.truncated(position));
        }
        self.delivered = position;
        Ok(Some(Entry { position, payload }))
    }
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        if let State::Replacing(task) = &self.state {
            task.abort();
        }
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next_entries(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>> {
        if let Some(first) = self.truncated_at {
            return Err(self.truncated(first));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < max {
            let event = if out.is_empty() {
                match tokio::time::timeout_at(deadline, self.next_event()).await {
                    Ok(event) => event,
                    Err(_elapsed) => break,
                }
            } else {
                // Only what is already there: return as soon as one entry is.
                match self.next_event().now_or_never() {
                    Some(event) => event,
                    None => break,
                }
            };
            match event {
                Event::Entry(position, payload) => match self.accept(position, payload) {
                    Ok(Some(entry)) => out.push(entry),
                    Ok(None) => {}
                    // Reported now, or with the next call after the entries before the gap.
                    Err(err) if out.is_empty() => return Err(err),
                    Err(_) => break,
                },
                Event::Broken(reason) => self.replace(&reason),
                Event::Replaced(consumer) => self.state = State::Reading(consumer),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_attempt_timeout_starts_short_and_grows_to_the_request_timeout() {
        let request = Duration::from_secs(10);
        for attempt in 1..=4 {
            assert_eq!(create_attempt_timeout(attempt, request), Duration::from_secs(1));
        }
        assert_eq!(create_attempt_timeout(5, request), Duration::from_secs(2));
        assert_eq!(create_attempt_timeout(13, request), Duration::from_secs(4));
        assert_eq!(create_attempt_timeout(37, request), request);
        assert_eq!(create_attempt_timeout(usize::MAX, request), request);
        assert_eq!(create_attempt_timeout(1, Duration::from_millis(500)), Duration::from_millis(500));
    }
}
