//! Connecting to NATS: credentials and TLS from [`NatsOptions`], an initial connection
//! that keeps trying with backoff until it succeeds or fails for a reason retrying cannot
//! fix, and a client that reconnects forever afterwards. Connection events are logged, and
//! every connection loss is counted (a [`Counter`]) so that callers waiting for a reply can
//! stop waiting for one that went down with the connection.
//!
//! Tolerates: servers that are down or unreachable at start (waits for them), connection
//! loss at any time (the client reconnects and resubscribes), servers that go silent
//! without closing the connection (pings detect them). Does not tolerate: bad credentials,
//! unreadable key files, malformed URLs (reported at once).

use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event};
use marmot_core::{Error, Result};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::errors::permanent;
use super::options::NatsOptions;

/// First delay between connection attempts; it doubles up to `reconnect_wait_max`.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// How often the client pings its server. A server that stops answering without closing the
/// connection (its host died, a partition) is given up after three unanswered pings, so
/// within about three times this, instead of about three minutes with the client's default.
/// A server killed on a live host closes the connection and is noticed at once anyway.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// A count of events after which the reply to a request sent before may never come:
/// connection losses (the reply was routed to the connection that is gone) or stream leader
/// elections (the request went to the leader that is gone).
pub(crate) type Counter = watch::Receiver<u64>;

/// The count so far.
pub(crate) fn count(counter: &Counter) -> u64 {
    *counter.borrow()
}

/// Resolves once the count differs from `seen` (at once if it already does). Never resolves
/// once nothing counts any more (the client is gone).
pub(crate) async fn changed_from(counter: &mut Counter, seen: u64) {
    if counter.wait_for(|&n| n != seen).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The wait before connection attempt `attempt` (0-based), exponential and capped.
pub(crate) fn backoff(attempt: usize, max: Duration) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (attempt - 1).min(16);
    BACKOFF_FIRST.saturating_mul(factor).min(max)
}

/// Connects to the servers in `opts`, retrying transient failures (for ever, or up to
/// `opts.connect_attempts_max` attempts). Returns the client and the count of its
/// connection losses.
pub(crate) async fn connect(opts: &NatsOptions) -> Result<(async_nats::Client, Counter)> {
    let urls = opts.urls.join(",");
    let (counter, losses) = watch::channel(0u64);
    let counter = Arc::new(counter);
    let mut attempt = 0usize;
    loop {
        // Bounded attempts wait `reconnect_wait_max` between them, as Marmot v1 did; the
        // unbounded ones back off from 50 ms.
        let wait = match opts.connect_attempts_max {
            Some(_) if attempt > 0 => opts.reconnect_wait_max,
            _ => backoff(attempt, opts.reconnect_wait_max),
        };
        tokio::time::sleep(wait).await;
        attempt += 1;
        match connect_options(opts, counter.clone())?.connect(opts.urls.as_slice()).await {
            Ok(client) => {
                info!(urls = %urls, attempts = attempt, "connected to NATS");
                return Ok((client, losses));
            }
            Err(err) => match err.kind() {
                ConnectErrorKind::TimedOut | ConnectErrorKind::Io | ConnectErrorKind::Dns => {
                    if opts.connect_attempts_max.is_some_and(|max| attempt >= max) {
                        return Err(Error::Transport {
                            message: format!(
                                "cannot reach NATS at {urls} after {attempt} attempts \
                                 (nats.connect_retries = {}; 0 waits for ever): {err}",
                                attempt - 1
                            ),
                            retryable: false,
                        });
                    }
                    warn!(urls = %urls, attempt, error = %err, "cannot reach NATS yet; retrying");
                }
                _ => return Err(permanent(format!("connect to {urls}"), err)),
            },
        }
    }
}

/// Builds the client options: credentials, TLS, unlimited reconnects, pings, and event
/// logging that also counts connection losses in `losses`.
fn connect_options(opts: &NatsOptions, losses: Arc<watch::Sender<u64>>) -> Result<ConnectOptions> {
    let wait_max = opts.reconnect_wait_max;
    let urls = opts.urls.join(",");
    let mut o = ConnectOptions::new()
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| backoff(attempts, wait_max))
        .request_timeout(Some(opts.request_timeout))
        .connection_timeout(opts.request_timeout)
        .ping_interval(PING_INTERVAL)
        .event_callback(move |event| {
            if matches!(event, Event::Disconnected) {
                losses.send_modify(|n| *n += 1);
            }
            let urls = urls.clone();
            async move { log_event(&urls, event) }
        });
    if let Some(name) = &opts.client_name {
        o = o.name(name);
    }
    if let (Some(user), Some(password)) = (&opts.user_name, &opts.user_password) {
        o = o.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &opts.seed_file {
        o = o.nkey(read_seed(path)?);
    }
    if let Some(ca) = &opts.ca_file {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&opts.cert_file, &opts.key_file) {
        o = o.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    Ok(o)
}

/// Reads an nkey user seed from a file that holds it alone or among other lines (as
/// `.creds` files and `nk -gen user` output do).
fn read_seed(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Io { context: format!("read nkey seed {}", path.display()), source })?;
    text.lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU") && line.len() > 50)
        .map(str::to_string)
        .ok_or_else(|| permanent(format!("nkey seed file {}", path.display()), "no user seed (SU…) found"))
}

fn log_event(urls: &str, event: Event) {
    match event {
        Event::Connected => info!(urls, event = "connected", "NATS connection (re)established"),
        Event::Disconnected => {
            warn!(urls, event = "disconnected", "NATS connection lost; reconnecting")
        }
        Event::LameDuckMode => {
            warn!(urls, event = "lame_duck", "NATS server entering lame duck mode")
        }
        Event::Draining => debug!(urls, event = "draining", "NATS connection draining"),
        Event::Closed => info!(urls, event = "closed", "NATS connection closed"),
        Event::SlowConsumer(sid) => {
            warn!(urls, event = "slow_consumer", sid, "NATS slow consumer")
        }
        Event::ServerError(err) => {
            error!(urls, event = "server_error", error = %err, "NATS server error")
        }
        Event::ClientError(err) => {
            error!(urls, event = "client_error", error = %err, "NATS client error")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff(0, max), Duration::ZERO);
        assert_eq!(backoff(1, max), Duration::from_millis(50));
        assert_eq!(backoff(2, max), Duration::from_millis(100));
        assert_eq!(backoff(30, max), max);
        assert_eq!(backoff(usize::MAX, max), max);
    }

    #[test]
    fn seed_is_found_among_other_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed");
        let seed = format!("SUA{}", "B".repeat(55));
        std::fs::write(&path, format!("-----BEGIN USER NKEY SEED-----\n{seed}\n------\n")).unwrap();
        assert_eq!(read_seed(&path).unwrap(), seed);
        std::fs::write(&path, "nothing here").unwrap();
        assert!(read_seed(&path).unwrap_err().to_string().contains("no user seed"));
    }
}
