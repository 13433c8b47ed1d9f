//! Connecting to NATS: credentials and TLS from [`NatsOptions`], an initial connection
//! that keeps trying with backoff until it succeeds or fails for a reason retrying cannot
//! fix, and a client that reconnects forever afterwards. Connection events are logged.
//!
//! Tolerates: servers that are down or unreachable at start (waits for them), connection
//! loss at any time (the client reconnects and resubscribes). Does not tolerate: bad
//! credentials, unreadable key files, malformed URLs (reported at once).

use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event};
use marmot_core::{Error, Result};
use tracing::{debug, error, info, warn};

use super::errors::permanent;
use super::options::NatsOptions;

/// First delay between connection attempts; it doubles up to `reconnect_wait_max`.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);

/// The wait before connection attempt `attempt` (0-based), exponential and capped.
pub(crate) fn backoff(attempt: usize, max: Duration) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (attempt - 1).min(16);
    BACKOFF_FIRST.saturating_mul(factor).min(max)
}

/// Connects to the servers in `opts`, retrying transient failures forever.
pub(crate) async fn connect(opts: &NatsOptions) -> Result<async_nats::Client> {
    let urls = opts.urls.join(",");
    let mut attempt = 0usize;
    loop {
        tokio::time::sleep(backoff(attempt, opts.reconnect_wait_max)).await;
        attempt += 1;
        match connect_options(opts)?.connect(opts.urls.as_slice()).await {
            Ok(client) => {
                info!(urls = %urls, attempts = attempt, "connected to NATS");
                return Ok(client);
            }
            Err(err) => match err.kind() {
                ConnectErrorKind::TimedOut | ConnectErrorKind::Io | ConnectErrorKind::Dns => {
                    warn!(urls = %urls, attempt, error = %err, "cannot reach NATS yet; retrying");
                }
                _ => return Err(permanent(format!("connect to {urls}"), err)),
            },
        }
    }
}

/// Builds the client options: credentials, TLS, unlimited reconnects and event logging.
fn connect_options(opts: &NatsOptions) -> Result<ConnectOptions> {
    let wait_max = opts.reconnect_wait_max;
    let urls = opts.urls.join(",");
    let mut o = ConnectOptions::new()
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempts| backoff(attempts, wait_max))
        .request_timeout(Some(opts.request_timeout))
        .connection_timeout(opts.request_timeout)
        .event_callback(move |event| {
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
