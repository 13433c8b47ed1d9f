//! Reading the configuration: the TOML file (if any), then `MARMOT_…` environment
//! overrides, then the value checks that serde cannot express (`node_id` ≠ 0, …).
//!
//! Nothing here touches the database; [`Loaded::validate`] does that afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::{ConfigError, Origin};
use super::{database, env, Config};

/// A configuration together with where its values came from and the notices to log once
/// logging is set up (ignored keys, unknown variables).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration to run with.
    pub config: Config,
    /// The file it was read from, if any.
    pub file: Option<PathBuf>,
    /// Keys set by environment variables: dotted key → variable name.
    pub env_keys: BTreeMap<String, String>,
    /// Things the user should hear about that do not stop the start.
    pub notices: Vec<String>,
}

impl Loaded {
    /// Where the value of `key` (dotted) came from.
    pub fn origin(&self, key: &str) -> Origin {
        if let Some(var) = self.env_keys.get(key) {
            return Origin::Env(var.clone());
        }
        match &self.file {
            Some(file) => Origin::File(file.clone()),
            None => Origin::Default,
        }
    }

    /// Checks what can only be checked outside the configuration: `db_path` names an
    /// existing, non-empty SQLite database in WAL mode, and the files named under `[nats]`
    /// exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let db = &self.config.db_path;
        database::check(db).map_err(|problem| ConfigError::Database {
            path: db.clone(),
            origin: self.origin("db_path"),
            problem,
        })?;
        self.check_files_exist()
    }

    fn check_files_exist(&self) -> Result<(), ConfigError> {
        let nats = &self.config.nats;
        let server_path = nats.server_path.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let files = [
            ("nats.server_config", nats.server_config.as_str()),
            ("nats.seed_file", &nats.seed_file),
            ("nats.ca_file", &nats.ca_file),
            ("nats.cert_file", &nats.cert_file),
            ("nats.key_file", &nats.key_file),
            ("nats.server_path", &server_path),
        ];
        for (key, path) in files {
            if !path.is_empty() && !Path::new(path).is_file() {
                return Err(self.invalid(key, format!("no such file: {path}")));
            }
        }
        Ok(())
    }

    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::InvalidValue { key: key.to_owned(), origin: self.origin(key), line: None, message }
    }
}

/// Loads the configuration from `file` (defaults when `None`) and the process environment.
pub fn load(file: Option<&Path>) -> Result<Loaded, ConfigError> {
    let vars: Vec<(String, String)> =
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
    load_with_env(file, &vars)
}

/// Loads the configuration from `file` (defaults when `None`) and the given environment
/// variables (`(name, value)` pairs; those not starting with `MARMOT_` are ignored).
pub fn load_with_env(file: Option<&Path>, vars: &[(String, String)]) -> Result<Loaded, ConfigError> {
    // Name the file absolutely in every message, whatever directory marmot runs from.
    let absolute = file.map(|f| std::path::absolute(f).unwrap_or_else(|_| f.to_owned()));
    let file = absolute.as_deref();
    let config = match file {
        Some(path) => read_file(path)?,
        None => Config::default(),
    };
    let origin = file.map_or(Origin::Default, |f| Origin::File(f.to_owned()));
    let overridden = env::apply(config, &origin, vars)?;
    let mut loaded = Loaded {
        config: overridden.config,
        file: file.map(Path::to_owned),
        env_keys: overridden.keys,
        notices: overridden.notices,
    };
    loaded.check_values()?;
    if let Some(path) = &loaded.config.seq_map_path {
        loaded.notices.push(format!(
            "seq_map_path (\"{path}\", set in {}) is ignored: stream positions are now kept \
             in the database itself",
            loaded.origin("seq_map_path")
        ));
    }
    Ok(loaded)
}

/// Reads and parses one TOML file.
pub fn read_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
    parse_str(&text, path)
}

/// Parses TOML text; `file` is only used to name the source in errors.
pub fn parse_str(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let line = inner.span().map(|s| line_of(text, s.start));
        let origin = Origin::File(file.to_owned());
        if path.is_empty() || path == "." {
            ConfigError::Syntax { file: file.to_owned(), line, message: inner.message().trim().replace('\n', ": ") }
        } else {
            from_serde_message(path, origin, line, inner.message())
        }
    })
}

/// Classifies a serde error message about `key` as an unknown key or an invalid value.
pub(crate) fn from_serde_message(key: String, origin: Origin, line: Option<usize>, message: &str) -> ConfigError {
    let message = message.trim().replace('\n', ": ");
    match message.strip_prefix("unknown field ") {
        Some(rest) => ConfigError::UnknownKey {
            key,
            origin,
            line,
            message: rest.split_once(", ").map_or(rest, |(_, e)| e).to_owned(),
        },
        None => ConfigError::InvalidValue { key, origin, line, message },
    }
}

fn line_of(text: &str, byte: usize) -> usize {
    let end = byte.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Loaded {
    /// Range checks serde's types do not express.
    fn check_values(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let checks = [
            ("node_id", c.node_id == 0, "must not be 0 (every node needs a distinct non-zero id)"),
            ("scan_max_changes", c.scan_max_changes == 0, "must be at least 1"),
            ("replication_log.shards", c.replication_log.shards == 0, "must be at least 1"),
            ("replication_log.max_entries", c.replication_log.max_entries == 0, "must be at least 1"),
            ("snapshot.keep", c.snapshot.keep == 0, "must be at least 1"),
            ("snapshot.nats.replicas", c.snapshot.nats.replicas == 0, "must be at least 1"),
        ];
        if let Some((key, _, why)) = checks.iter().find(|(_, bad, _)| *bad) {
            return Err(self.invalid(key, (*why).to_owned()));
        }
        // A client certificate needs its key and the reverse: one alone was silently unused.
        let (cert, key) = (&c.nats.cert_file, &c.nats.key_file);
        match (cert.is_empty(), key.is_empty()) {
            (false, true) => Err(self.invalid(
                "nats.cert_file",
                format!("is set ({cert}) but nats.key_file is not: a client certificate needs both"),
            )),
            (true, false) => Err(self.invalid(
                "nats.key_file",
                format!("is set ({key}) but nats.cert_file is not: a client certificate needs both"),
            )),
            _ => Ok(()),
        }
    }
}
