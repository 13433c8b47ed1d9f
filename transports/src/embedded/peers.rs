//! Peer and leaf-remote URLs: `nats://host:port` taken as given, and
//! `dns://host:port/?min=N&interval_ms=M` resolved (A and AAAA) into one URL per address,
//! waiting until at least `min` addresses exist (servers of a cluster that is still
//! being deployed register in DNS one by one).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use marmot_core::{Error, Result};
use tracing::info;

/// Default least number of addresses a `dns://` peer must resolve to.
pub const DNS_MIN_DEFAULT: usize = 2;
/// Default wait between two lookups of a `dns://` peer.
pub const DNS_INTERVAL_DEFAULT: Duration = Duration::from_millis(1000);

/// One parsed peer or leaf remote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum PeerUrl {
    /// A `nats://` URL, without its query.
    Nats { url: String, hub: bool },
    /// A DNS name to resolve.
    Dns { host: String, port: u16, min: usize, interval: Duration, hub: bool },
}

fn bad(what: &str, url: &str, why: &str) -> Error {
    Error::Transport { message: format!("{what} {url:?}: {why}"), retryable: false }
}

/// Parses one `nats://` or `dns://` URL; `what` names the setting in errors.
pub(crate) fn parse(what: &str, url: &str) -> Result<PeerUrl> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad(what, url, "no scheme"))?;
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, q),
        None => (rest, ""),
    };
    let authority = authority.trim_end_matches('/');
    let mut min = DNS_MIN_DEFAULT;
    let mut interval = DNS_INTERVAL_DEFAULT;
    let mut hub = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = || value.parse::<u64>().map_err(|_| bad(what, url, "not a number"));
        match key {
            "min" => min = number()? as usize,
            "interval_ms" => interval = Duration::from_millis(number()?),
            "hub" => hub = value == "true" || value == "1",
            _ => return Err(bad(what, url, &format!("unknown parameter {key:?}"))),
        }
    }
    match scheme {
        "nats" | "tls" => Ok(PeerUrl::Nats { url: format!("{scheme}://{authority}"), hub }),
        "dns" => {
            let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad(what, url, "needs host:port"))?;
            let port = port.parse().map_err(|_| bad(what, url, "bad port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            Ok(PeerUrl::Dns { host, port, min, interval, hub })
        }
        _ => Err(bad(what, url, "scheme must be nats:// or dns://")),
    }
}

/// `nats://` URLs for `addrs`.
fn urls_of(addrs: &BTreeSet<SocketAddr>) -> Vec<String> {
    addrs.iter().map(|a| format!("nats://{a}")).collect()
}

/// Resolves a peer into its URLs; `dns://` peers wait for at least `min` addresses.
pub(crate) async fn resolve(peer: &PeerUrl) -> Vec<String> {
    let (host, port, min, interval) = match peer {
        PeerUrl::Nats { url, .. } => return vec![url.clone()],
        PeerUrl::Dns { host, port, min, interval, .. } => (host, *port, *min, *interval),
    };
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let found: BTreeSet<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                info!(host = %host, attempt, error = %e, "peer lookup failed; retrying");
                BTreeSet::new()
            }
        };
        if found.len() >= min.max(1) {
            info!(host = %host, addresses = found.len(), "resolved peers");
            return urls_of(&found);
        }
        info!(host = %host, found = found.len(), min, attempt, "waiting for more peer addresses");
        tokio::time::sleep(interval).await;
    }
}

/// Whether a peer asked to be treated as a hub (leaf remotes).
pub(crate) fn is_hub(peer: &PeerUrl) -> bool {
    match peer {
        PeerUrl::Nats { hub, .. } | PeerUrl::Dns { hub, .. } => *hub,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nats_and_dns_urls_with_defaults() {
        assert_eq!(
            parse("peer", "nats://node-2:4222/").unwrap(),
            PeerUrl::Nats { url: "nats://node-2:4222".into(), hub: false }
        );
        assert_eq!(
            parse("leaf", "nats://hub:7422?hub=true").unwrap(),
            PeerUrl::Nats { url: "nats://hub:7422".into(), hub: true }
        );
        assert_eq!(
            parse("peer", "dns://marmot:4221/").unwrap(),
            PeerUrl::Dns {
                host: "marmot".into(),
                port: 4221,
                min: 2,
                interval: Duration::from_millis(1000),
                hub: false
            }
        );
        assert_eq!(
            parse("peer", "dns://marmot:4221/?min=3&interval_ms=250").unwrap(),
            PeerUrl::Dns {
                host: "marmot".into(),
                port: 4221,
                min: 3,
                interval: Duration::from_millis(250),
                hub: false
            }
        );
    }

    #[test]
    fn rejects_unknown_schemes_and_parameters() {
        assert!(parse("peer", "http://x:1").unwrap_err().to_string().contains("scheme"));
        assert!(parse("peer", "dns://x:1/?mni=2").unwrap_err().to_string().contains("mni"));
        assert!(parse("peer", "dns://x/").unwrap_err().to_string().contains("host:port"));
    }

    #[tokio::test]
    async fn dns_peer_resolves_localhost() {
        let peer = parse("peer", "dns://localhost:4221/?min=1&interval_ms=10").unwrap();
        let urls = resolve(&peer).await;
        assert!(urls.iter().any(|u| u.ends_with(":4221")), "{urls:?}");
    }
}
