//! Environment overrides: `MARMOT_<KEY>` for top-level keys and `MARMOT_<SECTION>_<KEY>`
//! for keys in tables (`MARMOT_NODE_ID=3`, `MARMOT_NATS_URLS=nats://a:4222,nats://b:4222`,
//! `MARMOT_SNAPSHOT_NATS_REPLICAS=3`), applied after the file.
//!
//! The variable name is the dotted key with dots replaced by `_`, upper-cased; the set of
//! keys comes from the configuration itself, so a new key gets its variable for free. A
//! value is parsed by the type of the key (integer, boolean, comma-separated list, string);
//! a value that does not parse is an error naming the variable.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::error::{ConfigError, Origin};
use super::load::from_serde_message;
use super::Config;

/// The prefix of every override variable.
pub const PREFIX: &str = "MARMOT_";

/// Variables with the prefix that are not configuration keys but are read elsewhere
/// (the command line's `MARMOT_CONFIG`), so they are not reported as unknown.
pub const NON_KEY_VARS: &[&str] = &["MARMOT_CONFIG"];

/// Optional string keys: absent from the serialized defaults, so listed here.
const OPTIONAL_KEYS: &[&str] = &["seq_map_path", "snapshot.sftp.host_key", "nats.server_path"];

/// The type of a key's value, which decides how its variable is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TOML string.
    String,
    /// A TOML integer.
    Integer,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
    Boolean,
    /// A comma-separated list of strings.
    List,
}

/// The result of applying the environment to a configuration.
#[derive(Debug)]
pub struct Overridden {
    /// The configuration with the overrides applied.
    pub config: Config,
    /// The keys that were overridden: dotted key → variable name.
    pub keys: BTreeMap<String, String>,
    /// Notices (variables with the prefix that match no key).
    pub notices: Vec<String>,
}

/// The variable that overrides a dotted key: `replication_log.shards` →
/// `MARMOT_REPLICATION_LOG_SHARDS`.
pub fn var_name(key: &str) -> String {
    format!("{PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Every dotted key that can be overridden, with its kind, in a stable order.
pub fn known_keys() -> Vec<(String, Kind)> {
    let mut keys = Vec::new();
    if let Ok(Value::Table(table)) = Value::try_from(Config::default()) {
        collect_leaves(&table, "", &mut keys);
    }
    keys.extend(OPTIONAL_KEYS.iter().map(|k| ((*k).to_owned(), Kind::String)));
    keys
}

fn collect_leaves(table: &Table, prefix: &str, out: &mut Vec<(String, Kind)>) {
    for (name, value) in table {
        let key = format!("{prefix}{name}");
        let kind = match value {
            Value::Table(inner) => {
                collect_leaves(inner, &format!("{key}."), out);
                continue;
            }
            Value::Integer(_) => Kind::Integer,
            Value::Boolean(_) => Kind::Boolean,
            Value::Array(_) => Kind::List,
            _ => Kind::String,
        };
        out.push((key, kind));
    }
}

/// Applies the `MARMOT_…` variables among `vars` to `config`. `file` names where the other
/// values came from, for errors.
pub fn apply(config: Config, file: &Origin, vars: &[(String, String)]) -> Result<Overridden, ConfigError> {
    let lookup: BTreeMap<&str, &str> =
        vars.iter().filter(|(k, _)| k.starts_with(PREFIX)).map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut values = Vec::new();
    let mut keys = BTreeMap::new();
    for (key, kind) in known_keys() {
        let var = var_name(&key);
        if let Some(raw) = lookup.get(var.as_str()) {
            values.push((key.clone(), parse(raw, kind, &key, &var)?));
            keys.insert(key, var);
        }
    }
    let notices = unknown_vars(&lookup, &keys);
    if values.is_empty() {
        return Ok(Overridden { config, keys, notices });
    }
    let config = merge(config, file, values, &keys)?;
    Ok(Overridden { config, keys, notices })
}

fn unknown_vars(lookup: &BTreeMap<&str, &str>, keys: &BTreeMap<String, String>) -> Vec<String> {
    lookup
        .keys()
        .filter(|var| !keys.values().any(|v| v == *var) && !NON_KEY_VARS.contains(var))
        .map(|var| format!("environment variable {var} matches no configuration key; ignored"))
        .collect()
}

/// Writes the parsed values into the serialized configuration and reads it back, so serde
/// checks enums and ranges exactly as it does for the file.
fn merge(
    config: Config,
    file: &Origin,
    values: Vec<(String, Value)>,
    keys: &BTreeMap<String, String>,
) -> Result<Config, ConfigError> {
    let mut root = match Value::try_from(&config) {
        Ok(Value::Table(table)) => table,
        Ok(_) | Err(_) => {
            return Err(ConfigError::InvalidValue {
                key: "db_path".into(),
                origin: file.clone(),
                line: None,
                message: "the configuration cannot be represented as TOML (non-UTF-8 path?)".into(),
            })
        }
    };
    for (key, value) in values {
        set_path(&mut root, &key, value);
    }
    serde_path_to_error::deserialize(Value::Table(root)).map_err(|err| {
        let key = err.path().to_string();
        let origin = keys.get(&key).map_or(file.clone(), |v| Origin::Env(v.clone()));
        from_serde_message(key, origin, None, err.into_inner().message())
    })
}

fn set_path(root: &mut Table, key: &str, value: Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut table = root;
    for part in parts {
        let entry = table.entry(part.to_owned()).or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(inner) = entry else { unreachable!("entry was just made a table") };
        table = inner;
    }
    table.insert(last.to_owned(), value);
}

/// Parses one variable's text as a value of `kind`.
fn parse(raw: &str, kind: Kind, key: &str, var: &str) -> Result<Value, ConfigError> {
    let bad = |what: &str| ConfigError::InvalidValue {
        key: key.to_owned(),
        origin: Origin::Env(var.to_owned()),
        line: None,
        message: format!("expected {what}, got {raw:?}"),
    };
    let text = raw.trim();
    match kind {
        Kind::String => Ok(Value::String(raw.to_owned())),
        Kind::Integer => text.parse::<i64>().map(Value::Integer).map_err(|_| bad("an integer")),
        Kind::Boolean => match text.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err(bad("a boolean (true or false)")),
        },
        Kind::List => Ok(Value::Array(
            text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::String(s.to_owned())).collect(),
        )),
    }
}
