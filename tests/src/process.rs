//! Child processes: spawning with output to a log file and death with the test process,
//! signals, log tails, and [`Background`] client processes (writers, readers).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{LOG_TAIL_LINES, POLL_INTERVAL};

/// Spawns `cmd` with stdout and stderr appended to `log` and stdin from `stdin` (or
/// nothing). On Linux the child is SIGKILLed if the test process dies.
pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path, stdin: Option<&Path>) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let err = out.try_clone().expect("clone a log file handle");
    let input = match stdin {
        Some(path) => Stdio::from(std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))),
        None => Stdio::null(),
    };
    cmd.stdin(input).stdout(out).stderr(err);
    die_with_parent(cmd);
    cmd.spawn().unwrap_or_else(|e| panic!("start {:?}: {e}", cmd.get_program()))
}

#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl, getppid and _exit are async-signal-safe and the closure allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Sends `signal` to the child (no effect when it already exited).
pub(crate) fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// SIGKILLs the child and reaps it.
pub(crate) fn kill(child: &mut Child) -> ExitStatus {
    signal(child, libc::SIGKILL);
    child.wait().expect("wait for a killed child")
}

/// Waits up to `timeout` for the child to exit.
pub(crate) fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last `lines` lines of a log file (or a note that it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

pub(crate) fn print_tail(what: &str, path: &Path) {
    eprintln!(
        "----- last {LOG_TAIL_LINES} lines of {what} ({}) -----\n{}\n----- end of {what} -----",
        path.display(),
        log_tail(path, LOG_TAIL_LINES)
    );
}

/// A client process running in the background (a writer or a reader): killed on drop,
/// its output in `<dir>/<name>.log`.
pub struct Background {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Background {
    /// Runs `python3 -c script args...`.
    pub fn python(dir: &Path, name: &str, script: &str, args: &[&str]) -> Background {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script).args(args);
        let child = spawn_logged(&mut cmd, &log, None);
        Background { name: name.to_owned(), log, child: Some(child) }
    }

    /// Runs the `sqlite3` CLI on `db` with the script `sql` on its standard input; it stops
    /// at the first error (`-bail`) and waits up to 10 s for locks.
    pub fn sqlite3(dir: &Path, name: &str, db: &Path, sql: &str) -> Background {
        let log = dir.join(format!("{name}.log"));
        let script = dir.join(format!("{name}.sql"));
        std::fs::write(&script, format!(".timeout 10000\n{sql}\n")).expect("write a SQL script");
        let mut cmd = Command::new("sqlite3");
        cmd.arg("-bail").arg(db);
        let child = spawn_logged(&mut cmd, &log, Some(&script));
        Background { name: name.to_owned(), log, child: Some(child) }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Waits up to `timeout` for the process to exit, and panics (with its output) unless
    /// it succeeded.
    pub fn wait_success(&mut self, timeout: Duration) {
        let Some(child) = &mut self.child else { return };
        let status = wait_exit(child, timeout).unwrap_or_else(|| {
            panic!(
                "{} still running after {timeout:?}; its output:\n{}",
                self.name,
                log_tail(&self.log, LOG_TAIL_LINES)
            )
        });
        self.child = None;
        assert!(
            status.success(),
            "{} failed ({status}); its output:\n{}",
            self.name,
            log_tail(&self.log, LOG_TAIL_LINES)
        );
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill(child);
            if std::thread::panicking() {
                print_tail(&self.name, &self.log);
            }
        }
    }
}
