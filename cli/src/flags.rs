//! The command line: Marmot v1's flags, in its Go single-dash spelling (`-config x`) as
//! well as the GNU spelling (`--config x`, `--config=x`), plus the subcommands that inspect
//! a running node.
//!
//! Go's `flag` package accepts `-name`, `--name`, `-name=value` and `-name value`, and
//! `-bool=true|false` for boolean flags. clap takes only the double-dash form for long
//! names, so [`normalize_args`] rewrites argv before clap sees it. Only the names declared
//! here are rewritten; short flags (`-h`, `-V`) and everything after `--` pass through.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Long flags that Go spells with one dash.
const LONG_FLAGS: &[&str] = &[
    "config",
    "cleanup",
    "save-snapshot",
    "force-restore",
    "cluster-addr",
    "cluster-peers",
    "leaf-servers",
    "pprof",
    "json",
    "table",
    "from-now",
    "timeout",
    "help",
    "version",
];

/// Boolean flags, which Go also accepts as `-flag=true` / `-flag=false`.
const BOOL_FLAGS: &[&str] = &["cleanup", "save-snapshot", "force-restore"];

/// `marmot`'s command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser)]
#[command(
    name = "marmot",
    version,
    about = "Leaderless multi-writer replication of SQLite over NATS JetStream",
    long_about = "Leaderless multi-writer replication of SQLite over NATS JetStream.\n\n\
        Runs next to an unchanged application: captures the changes made to db_path, streams \
        them through NATS JetStream and merges every other node's changes into the local \
        file. Flags may be written Go-style with one dash (-config node.toml) or with two \
        (--config node.toml, --config=node.toml). Configuration keys can be overridden by \
        environment variables MARMOT_<KEY> / MARMOT_<SECTION>_<KEY>; see \
        docs/configuration.md."
)]
pub struct Flags {
    /// TOML configuration file. Without one, the built-in defaults and MARMOT_* variables
    /// are used.
    #[arg(long = "config", value_name = "PATH", env = "MARMOT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Remove Marmot's triggers and change-log tables from the database, then exit.
    #[arg(long = "cleanup")]
    pub cleanup: bool,

    /// Take a snapshot of the database, upload it to the snapshot store, then exit.
    #[arg(long = "save-snapshot")]
    pub save_snapshot: bool,

    /// Restore a snapshot at start even if local changes could not be published first
    /// (they are lost). Without it, such a restore is refused.
    #[arg(long = "force-restore")]
    pub force_restore: bool,

    /// On a node that set aside local changes older than `tombstone_retention` and waits
    /// for a snapshot that no node can give (every node set changes aside): keep this
    /// node's data as it is, changes set aside included, so that it can run and save the
    /// snapshot the others restore; then exit.
    #[arg(long = "keep-set-aside")]
    pub keep_set_aside: bool,

    /// Listen address of the embedded NATS server's cluster port (use on at least two
    /// nodes); the leaf-node listener takes the cluster port + 1000.
    #[arg(long = "cluster-addr", value_name = "HOST:PORT")]
    pub cluster_addr: Option<String>,

    /// Comma-separated cluster routes: nats://host:port/ or
    /// dns://host:port/?min=N&interval_ms=M (waits for at least N addresses; defaults
    /// min=2, interval_ms=1000).
    #[arg(long = "cluster-peers", value_name = "URLS", value_delimiter = ',')]
    pub cluster_peers: Vec<String>,

    /// Comma-separated nats:// or dns:// remotes to join as a leaf node (?hub=true
    /// supported).
    #[arg(long = "leaf-servers", value_name = "URLS", value_delimiter = ',')]
    pub leaf_servers: Vec<String>,

    /// Marmot v1's Go profiler address. Accepted for compatibility; it does not apply here
    /// and is ignored with a warning.
    #[arg(long = "pprof", value_name = "ADDR")]
    pub pprof: Option<String>,

    /// What to do instead of running the node.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands that inspect a node rather than run it.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Print this node's replication status (tables, changes waiting to be published,
    /// stored position and lag per shard, parked batches, set-aside rows) and exit.
    Status {
        /// One JSON object instead of text, for scripts.
        #[arg(long)]
        json: bool,
        /// How long to try reaching NATS before reporting it unreachable, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "3", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Print every replicated change as it arrives in the change streams (origin, version,
    /// table, operation, key, values), until interrupted.
    Watch {
        /// Only changes to this table (repeat for several).
        #[arg(long, value_name = "TABLE")]
        table: Vec<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Start at the end of the streams instead of their first entry.
        #[arg(long)]
        from_now: bool,
    },
    /// Wait until every local change committed before it started is durably published,
    /// then exit 0; exit 1 when the timeout passes first (for scripts and deploys).
    Wait {
        /// Give up after this many seconds (fractions allowed; 0 waits forever).
        #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Compare the replicated tables of every running node: exit 0 when they are
    /// identical, 1 when they differ (naming the tables and up to 10 keys with each node's
    /// version), 2 when no point to compare was found within the timeout.
    Verify {
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
        timeout: Duration,
        /// One JSON object instead of text, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List the writes last-writer-wins overwrote without their data having been seen
    /// (the conflict journal), newest first: table, key, the losing version and image, and
    /// the version that overwrote it.
    Conflicts {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Only this table.
        #[arg(long, value_name = "TABLE")]
        table: Option<String>,
        /// Only losing writes made within this long before now (`90s`, `15m`, `2h`, `7d`).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<Duration>,
        /// At most this many entries.
        #[arg(long, value_name = "N", default_value = "100")]
        limit: u64,
    },
}

/// Parses a duration: a number with an optional unit `s`, `m`, `h` or `d` (seconds when
/// none), fractions allowed.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let scale = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let n: f64 = number.trim().parse().map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 2h or 7d"))?;
    Duration::try_from_secs_f64(n * scale).map_err(|_| format!("{s:?} is not a non-negative duration"))
}

/// Parses a non-negative number of seconds, fractions allowed.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a non-negative number of seconds"))
}

impl Flags {
    /// Parses the process's arguments (after [`normalize_args`]); prints help, version or a
    /// usage error and exits as clap does.
    pub fn from_process() -> Flags {
        Flags::parse_from(normalize_args(std::env::args_os()))
    }

    /// Parses the given arguments (the first is the program name), Go spelling included.
    pub fn try_from_args<I, T>(args: I) -> Result<Flags, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Flags::try_parse_from(normalize_args(args))
    }
}

/// Rewrites Go-style flags into the spelling clap accepts: `-config x` → `--config x`,
/// `-config=x` → `--config=x`, `-cleanup=true` → `--cleanup`, `-cleanup=false` → dropped.
/// The first argument (the program name) and everything after `--` are left alone.
pub fn normalize_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut passthrough = false;
    for (i, arg) in args.into_iter().map(Into::into).enumerate() {
        if i == 0 || passthrough {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        match arg.to_str().and_then(rewrite) {
            Some(Rewritten::Arg(s)) => out.push(s.into()),
            Some(Rewritten::Drop) => {}
            None => out.push(arg),
        }
    }
    out
}

enum Rewritten {
    Arg(String),
    Drop,
}

/// Rewrites one argument if it is one of our long flags in either spelling.
fn rewrite(arg: &str) -> Option<Rewritten> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    let (name, value) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    };
    if !LONG_FLAGS.contains(&name) {
        return None;
    }
    match value {
        Some(v) if BOOL_FLAGS.contains(&name) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "t" => Some(Rewritten::Arg(format!("--{name}"))),
            "false" | "0" | "f" => Some(Rewritten::Drop),
            _ => Some(Rewritten::Arg(format!("--{body}"))),
        },
        _ => Some(Rewritten::Arg(format!("--{body}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        Flags::try_from_args(args.iter().copied()).expect("parses")
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("7w").unwrap_err().contains("unit"));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn go_single_dash_spelling_parses() {
        let f = parse(&[
            "marmot",
            "-config",
            "node.toml",
            "-cluster-addr",
            "127.0.0.1:4221",
            "-cluster-peers",
            "nats://127.0.0.1:4222/",
        ]);
        assert_eq!(f.config, Some(PathBuf::from("node.toml")));
        assert_eq!(f.cluster_addr.as_deref(), Some("127.0.0.1:4221"));
        assert_eq!(f.cluster_peers, vec!["nats://127.0.0.1:4222/".to_owned()]);
    }

    #[test]
    fn equals_and_double_dash_spellings_parse_alike() {
        for args in [
            &["marmot", "-config=a.toml"][..],
            &["marmot", "--config=a.toml"][..],
            &["marmot", "--config", "a.toml"][..],
        ] {
            assert_eq!(parse(args).config, Some(PathBuf::from("a.toml")), "{args:?}");
        }
    }

    #[test]
    fn go_boolean_values_are_understood() {
        assert!(parse(&["marmot", "-cleanup"]).cleanup);
        assert!(parse(&["marmot", "-cleanup=true"]).cleanup);
        assert!(!parse(&["marmot", "-cleanup=false"]).cleanup);
        assert!(parse(&["marmot", "-save-snapshot"]).save_snapshot);
    }

    #[test]
    fn peer_lists_split_on_commas() {
        let f = parse(&[
            "marmot",
            "-cluster-peers",
            "nats://a:4222/,dns://b:4222/?min=3",
            "-leaf-servers=nats://hub:7422?hub=true",
        ]);
        assert_eq!(f.cluster_peers.len(), 2);
        assert_eq!(f.cluster_peers[1], "dns://b:4222/?min=3");
        assert_eq!(f.leaf_servers, vec!["nats://hub:7422?hub=true".to_owned()]);
    }

    #[test]
    fn pprof_is_accepted() {
        assert_eq!(parse(&["marmot", "-pprof", ":6060"]).pprof.as_deref(), Some(":6060"));
    }

    #[test]
    fn subcommands_parse_after_flags() {
        let f = parse(&["marmot", "-config", "n.toml", "status"]);
        assert_eq!(f.command, Some(Command::Status { json: false, timeout: Duration::from_secs(3) }));
        assert_eq!(parse(&["marmot", "wait"]).command, Some(Command::Wait { timeout: Duration::from_secs(30) }));
        assert_eq!(
            parse(&["marmot", "watch"]).command,
            Some(Command::Watch { table: vec![], json: false, from_now: false })
        );
    }

    #[test]
    fn subcommand_options_parse_in_both_spellings() {
        let f = parse(&["marmot", "-config", "n.toml", "status", "-json"]);
        assert_eq!(f.command, Some(Command::Status { json: true, timeout: Duration::from_secs(3) }));
        let f = parse(&["marmot", "watch", "--table", "a", "-table=b", "--json", "--from-now"]);
        assert_eq!(f.command, Some(Command::Watch { table: vec!["a".into(), "b".into()], json: true, from_now: true }));
        let f = parse(&["marmot", "wait", "--timeout", "0.5"]);
        assert_eq!(f.command, Some(Command::Wait { timeout: Duration::from_millis(500) }));
        assert!(Flags::try_from_args(["marmot", "wait", "--timeout", "-1"]).is_err());
    }

    #[test]
    fn unknown_single_dash_flags_are_not_rewritten() {
        let args = normalize_args(["marmot", "-x", "-h", "--", "-config"]);
        assert_eq!(args, vec!["marmot", "-x", "-h", "--", "-config"]);
        assert!(Flags::try_from_args(["marmot", "-bogus"]).is_err());
    }

    #[test]
    fn help_explains_every_flag() {
        let help = Flags::try_from_args(["marmot", "-help"]).unwrap_err().to_string();
        for flag in ["--config", "--cleanup", "--save-snapshot", "--cluster-addr"] {
            assert!(help.contains(flag), "{flag} missing from help:\n{help}");
        }
        for flag in ["--cluster-peers", "--leaf-servers", "--pprof", "status", "wait"] {
            assert!(help.contains(flag), "{flag} missing from help:\n{help}");
        }
    }
}
