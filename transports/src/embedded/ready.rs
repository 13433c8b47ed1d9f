//! Readiness of the embedded server: its monitoring endpoint
//! `/healthz?js-enabled-only=true` answers 200 once the server accepts clients and
//! JetStream is enabled (a cluster may still be electing its meta leader then; stream
//! creation retries that on its own).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for one health request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The wait between two probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Most bytes of a health answer read.
const ANSWER_BYTES_MAX: u64 = 64 * 1024;

/// One probe of `monitor` (`host:port`): whether JetStream reports healthy.
pub(crate) async fn probe(monitor: &str) -> bool {
    let request = async {
        let mut conn = TcpStream::connect(monitor).await?;
        let req = format!("GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: {monitor}\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await?;
        let mut answer = String::new();
        conn.take(ANSWER_BYTES_MAX).read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, request).await {
        Ok(Ok(answer)) => answer.lines().next().is_some_and(|status| status.contains(" 200")),
        _ => false,
    }
}

/// Probes `monitor` until it is healthy or `timeout` passes; `alive` is asked between
/// probes so a server that died is not waited for.
pub(crate) async fn wait(monitor: &str, timeout: Duration, mut alive: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if probe(monitor).await {
            return true;
        }
        if !alive() || tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
