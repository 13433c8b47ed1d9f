//! [`NatsSubscription`]: one shard read in order through a JetStream ordered consumer.
//!
//! The ordered consumer recreates itself after missed heartbeats, reconnects or server
//! restarts, sometimes from the start of the stream; this reader drops entries it has
//! already delivered, so each is returned once. A jump in stream sequence can only mean
//! that the stream dropped entries this reader had not read yet (max_msgs): that is
//! reported as [`Error::Truncated`], and the subscription stays failed.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::Ordered;
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use marmot_core::{Entry, Error, Position, Result, Shard, Subscription};

use super::errors::retryable;

/// An ordered reader of one shard's stream.
pub struct NatsSubscription {
    shard: Shard,
    stream: String,
    messages: Ordered,
    /// The last position delivered (or the `after` the subscription started with).
    delivered: Position,
    /// Set once entries were found missing; every later call reports it again.
    truncated_at: Option<Position>,
    /// An error met after some entries were already collected; reported next call.
    pending: Option<Error>,
}

impl NatsSubscription {
    pub(crate) fn new(shard: Shard, stream: String, messages: Ordered, after: Position) -> Self {
        NatsSubscription { shard, stream, messages, delivered: after, truncated_at: None, pending: None }
    }

    fn truncated(&self, first: Position) -> Error {
        Error::Truncated { shard: self.shard, position: self.delivered, first }
    }

    /// Takes one message off the consumer: `Ok(Some)` a new entry, `Ok(None)` an entry
    /// already delivered, `Err` a failure.
    fn accept(&mut self, message: async_nats::jetstream::Message) -> Result<Option<Entry>> {
        let position = match message.info() {
            Ok(info) => Position(info.stream_sequence),
            Err(e) => return Err(retryable(format!("read {}", self.stream), e)),
        };
        if position <= self.delivered {
            return Ok(None);
        }
        if position.0 != self.delivered.0 + 1 {
            self.truncated_at = Some(position);
            return Err(self.truncated(position));
        }
        self.delivered = position;
        Ok(Some(Entry { position, payload: message.message.payload }))
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next_entries(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>> {
        if let Some(first) = self.truncated_at {
            return Err(self.truncated(first));
        }
        if let Some(err) = self.pending.take() {
            return Err(err);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < max {
            let next = if out.is_empty() {
                match tokio::time::timeout_at(deadline, self.messages.next()).await {
                    Ok(next) => next,
                    Err(_elapsed) => break,
                }
            } else {
                // Only what is already buffered: return as soon as one entry is there.
                match self.messages.next().now_or_never() {
                    Some(next) => next,
                    None => break,
                }
            };
            let step = match next {
                Some(Ok(message)) => self.accept(message),
                Some(Err(e)) => Err(retryable(format!("read {}", self.stream), e)),
                None => Err(retryable(format!("read {}", self.stream), "consumer ended")),
            };
            match step {
                Ok(Some(entry)) => out.push(entry),
                Ok(None) => {}
                Err(err) if out.is_empty() => return Err(err),
                Err(err) => {
                    if self.truncated_at.is_none() {
                        self.pending = Some(err);
                    }
                    break;
                }
            }
        }
        Ok(out)
    }
}
