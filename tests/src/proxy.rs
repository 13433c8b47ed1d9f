//! A TCP proxy a test puts between two servers to cut the link between them, whole or one
//! way, and heal it again — a network partition on loopback.
//!
//! A cut *pauses* bytes, it does not drop them or close connections: what was sent while
//! the link was cut arrives after it heals, as TCP's retransmissions would deliver it after
//! a short partition; a connection opened during a cut is not passed on until the link is
//! whole again (a handshake needs both directions). Servers notice a cut as they would on a
//! real network: by missing heartbeats, not by a closed socket.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::ports::free_port;

/// How long a paused pump or an idle accept loop waits before looking again.
const TICK: Duration = Duration::from_millis(10);

/// How many free ports a proxy tries before it gives up.
const PORT_ATTEMPTS: usize = 20;

/// Which bytes flow.
struct Link {
    /// From the side that connected to the proxy to the target.
    forward: AtomicBool,
    /// From the target back to the side that connected.
    backward: AtomicBool,
    /// The proxy is gone: every thread ends.
    closed: AtomicBool,
}

impl Link {
    fn whole(&self) -> bool {
        self.forward.load(Ordering::SeqCst) && self.backward.load(Ordering::SeqCst)
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Listens on a free 127.0.0.1 port and passes every connection on to `127.0.0.1:<target>`.
pub struct Proxy {
    port: u16,
    link: Arc<Link>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:<target>`, its link whole.
    pub fn start(target: u16) -> Proxy {
        // The port was free when chosen but may be taken before it is bound (on a machine
        // whose ephemeral range covers ours, by any outgoing connection): take another.
        let (port, listener) = (0..PORT_ATTEMPTS)
            .find_map(|_| {
                let port = free_port();
                TcpListener::bind(("127.0.0.1", port)).ok().map(|listener| (port, listener))
            })
            .expect("bind a proxy port");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let link = Arc::new(Link {
            forward: AtomicBool::new(true),
            backward: AtomicBool::new(true),
            closed: AtomicBool::new(false),
        });
        let accept_link = Arc::clone(&link);
        thread::spawn(move || accept_loop(listener, target, accept_link));
        Proxy { port, link }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pauses bytes from the connecting side to the target.
    pub fn cut_forward(&self) {
        self.link.forward.store(false, Ordering::SeqCst);
    }

    /// Pauses bytes from the target to the connecting side.
    pub fn cut_backward(&self) {
        self.link.backward.store(false, Ordering::SeqCst);
    }

    /// Pauses both directions.
    pub fn cut(&self) {
        self.cut_forward();
        self.cut_backward();
    }

    /// Lets bytes flow both ways again; what waited is delivered, in order.
    pub fn heal(&self) {
        self.link.forward.store(true, Ordering::SeqCst);
        self.link.backward.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.closed.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, target: u16, link: Arc<Link>) {
    while !link.closed() {
        match listener.accept() {
            Ok((client, _)) => {
                let link = Arc::clone(&link);
                thread::spawn(move || connect(client, target, link));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(TICK),
            Err(_) => thread::sleep(TICK),
        }
    }
}

/// Waits until the link is whole, then connects to the target and pumps both ways.
fn connect(client: TcpStream, target: u16, link: Arc<Link>) {
    while !link.whole() {
        if link.closed() {
            return;
        }
        thread::sleep(TICK);
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let back_link = Arc::clone(&link);
    thread::spawn(move || pump(server2, client2, &back_link, |l| l.backward.load(Ordering::SeqCst)));
    pump(client, server, &link, |l| l.forward.load(Ordering::SeqCst));
}

/// Copies `from` to `to` while `open` says this direction flows; holds bytes while it does
/// not. Ends (closing both) when either side closes or the proxy is dropped.
fn pump(mut from: TcpStream, mut to: TcpStream, link: &Link, open: impl Fn(&Link) -> bool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    'copy: while !link.closed() {
        if !open(link) {
            thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue
            }
            Err(_) => break,
        };
        // Bytes read just as the link was cut wait for it to heal, like the rest.
        while !open(link) {
            if link.closed() {
                break 'copy;
            }
            thread::sleep(TICK);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
