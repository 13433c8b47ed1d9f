//! Free TCP ports on 127.0.0.1, never handed out twice by one test process.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

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

/// Ports handed out here come from this range, below Linux's ephemeral range
/// (32768–60999): the kernel never gives these to `bind(:0)` or outgoing connections, so
/// a port chosen here cannot be taken by, say, an embedded nats-server's random client or
/// monitoring port between the moment it is chosen and the moment it is used.
const PORT_RANGE: std::ops::Range<u16> = 20_000..31_000;

/// A port that was free a moment ago and that this process has not handed out before.
pub fn free_port() -> u16 {
    let span = (PORT_RANGE.end - PORT_RANGE.start) as u32;
    let start = (std::process::id().wrapping_mul(7919)) % span;
    for i in 0..span {
        let port = PORT_RANGE.start + ((start + i) % span) as u16;
        if bindable(port) && claim(&[port]) {
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
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
