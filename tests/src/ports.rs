//! Free TCP ports on 127.0.0.1, never handed out twice by one test process.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::{Mutex, OnceLock};

static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The offset of the embedded server's leaf-node listener from its cluster port.
pub const LEAF_PORT_OFFSET: u16 = 1000;

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn claim(ports: &[u16]) -> bool {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if ports.iter().any(|p| handed.contains(p)) {
        return false;
    }
    handed.extend(ports);
    true
}

/// Ports handed out here come from this range when it lies outside the kernel's ephemeral
/// range (Linux's default is 32768–60999): the kernel never gives those to `bind(:0)` or to
/// outgoing connections, so a port chosen here cannot be taken by, say, an embedded
/// nats-server's random client port or a route's outgoing socket between the moment it is
/// chosen and the moment it is used.
const PORT_RANGE: Range<u16> = 20_000..31_000;

/// The fewest ports a range outside the ephemeral one must hold to be used instead.
const MIN_SPAN: u16 = 4_000;

/// [`PORT_RANGE`], or where the machine's ephemeral range covers it, the ports below or
/// above that range (whichever is larger); the default when there is no room outside.
fn port_range() -> Range<u16> {
    static RANGE: OnceLock<Range<u16>> = OnceLock::new();
    RANGE
        .get_or_init(|| {
            let Some((low, high)) =
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|text| {
                    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
                    Some((parts.next()??, parts.next()??))
                })
            else {
                return PORT_RANGE;
            };
            if PORT_RANGE.end <= low || PORT_RANGE.start > high {
                return PORT_RANGE;
            }
            let below = 10_000.min(low)..low;
            let above = high.saturating_add(1)..u16::MAX;
            [below, above]
                .into_iter()
                .filter(|r| r.len() >= MIN_SPAN as usize)
                .max_by_key(|r| r.len())
                .unwrap_or(PORT_RANGE)
        })
        .clone()
}

/// A port that was free a moment ago and that this process has not handed out before.
pub fn free_port() -> u16 {
    let range = port_range();
    let span = (range.end - range.start) as u32;
    let start = (std::process::id().wrapping_mul(7919)) % span;
    for i in 0..span {
        let port = range.start + ((start + i) % span) as u16;
        if bindable(port) && claim(&[port]) {
            return port;
        }
    }
    panic!("no free port in {range:?}");
}

/// A cluster port for an embedded server: free, and so is `port + 1000`, where the
/// embedded server puts its leaf-node listener.
pub fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        let Some(leaf) = port.checked_add(LEAF_PORT_OFFSET) else {
            continue;
        };
        if bindable(leaf) && claim(&[leaf]) {
            return port;
        }
    }
}
