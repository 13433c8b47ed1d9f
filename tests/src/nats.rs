//! External `nats-server` processes with JetStream: a standalone server or a cluster of
//! routed servers, each killed on drop and restartable on the same ports and store.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::ports::free_port;
use crate::process::{kill, print_tail, spawn_logged};
use crate::{poll, DEADLINE};

/// One `nats-server -js` child process.
pub struct NatsServer {
    name: String,
    port: u16,
    monitor_port: u16,
    cluster_port: Option<u16>,
    routes: Vec<u16>,
    store_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a standalone server storing under `<dir>/<name>` and waits until it is ready.
    pub fn standalone(dir: &Path, name: &str) -> NatsServer {
        let mut server = NatsServer::new(dir, name, None, Vec::new());
        server.spawn();
        server.wait_ready(DEADLINE);
        server
    }

    /// Starts a cluster of `n` routed servers (`<name>-1` …) and waits until all are ready.
    pub fn cluster(dir: &Path, name: &str, n: usize) -> Vec<NatsServer> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers: Vec<NatsServer> = (0..n)
            .map(|i| {
                let routes = cluster_ports.iter().copied().filter(|&p| p != cluster_ports[i]).collect();
                NatsServer::new(dir, &format!("{name}-{}", i + 1), Some(cluster_ports[i]), routes)
            })
            .collect();
        for server in &mut servers {
            server.spawn();
        }
        for server in &servers {
            server.wait_ready(DEADLINE);
        }
        servers
    }

    fn new(dir: &Path, name: &str, cluster_port: Option<u16>, routes: Vec<u16>) -> NatsServer {
        NatsServer {
            name: name.to_owned(),
            port: free_port(),
            monitor_port: free_port(),
            cluster_port,
            routes,
            store_dir: dir.join(name),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut cmd = Command::new("nats-server");
        cmd.arg("-js")
            .arg("-n")
            .arg(&self.name)
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-sd")
            .arg(&self.store_dir);
        if let Some(port) = self.cluster_port {
            let routes: Vec<String> = self.routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
            cmd.args(["--cluster_name", "e2e"])
                .arg("--cluster")
                .arg(format!("nats://127.0.0.1:{port}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        self.child = Some(spawn_logged(&mut cmd, &self.log, None));
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the monitoring endpoint reports the server (and JetStream) healthy.
    pub fn is_healthy(&self) -> bool {
        healthz(self.monitor_port)
    }

    /// Waits until [`NatsServer::is_healthy`], panicking after `timeout` or if the process
    /// exits.
    pub fn wait_ready(&self, timeout: Duration) {
        let ready = poll(timeout, || self.is_healthy());
        if !ready {
            print_tail(&self.name, &self.log);
            panic!("{} did not become healthy within {timeout:?}", self.name);
        }
    }

    /// SIGKILLs the server (`kill -9`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child);
        }
    }

    /// Starts the server again on the same ports and store, and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready(DEADLINE);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            print_tail(&self.name, &self.log);
        }
    }
}

/// One `GET <path>` on `127.0.0.1:<port>`: the body when the answer is 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let get = || -> std::io::Result<String> {
        let mut conn = TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    };
    let response = get().ok()?;
    let ok = response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200");
    let body = response.split_once("\r\n\r\n")?.1;
    ok.then(|| body.to_owned())
}

/// One `GET /healthz` on `127.0.0.1:<port>`: whether it answered 200.
fn healthz(port: u16) -> bool {
    http_get(port, "/healthz").is_some()
}
