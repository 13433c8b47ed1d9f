//! Real servers for the conformance tests: started as children on free loopback ports,
//! killed when dropped.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections.
const STARTUP_WAIT: Duration = Duration::from_secs(30);

/// A server process, killed (and reaped) on drop.
pub struct Server {
    child: std::process::Child,
    name: String,
    log: PathBuf,
    /// The loopback port it listens on.
    pub port: u16,
}

impl Server {
    /// Starts `program args…` with output to `log_dir/<name>.log` and waits until `port`
    /// accepts connections.
    pub fn start(program: &Path, args: &[String], port: u16, log_dir: &Path) -> Server {
        Server::start_with_env(program, args, &[], port, log_dir)
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(program: &Path, args: &[String], env: &[(&str, &str)], port: u16, log_dir: &Path) -> Server {
        let name = program.file_name().unwrap().to_string_lossy().into_owned();
        let log = log_dir.join(format!("{name}-{port}.log"));
        let out = std::fs::File::create(&log).expect("create server log");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        let mut server = Server { child, name, log, port };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + STARTUP_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before listening:\n{}", self.name, self.log_text());
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not listen on port {} within {STARTUP_WAIT:?}:\n{}", self.name, self.port, self.log_text());
    }

    /// The server's output so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
}

/// `name` on `PATH`, or a panic that says how to install it.
pub fn require_binary(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` is not on PATH; install it with: {install}");
}

/// Runs a command to completion and returns its stdout; panics on failure.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(out.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
