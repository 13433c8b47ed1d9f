//! `marmot`: parse flags, load and check the configuration, set up logging, run.
//!
//! Exit status: 0 on a clean stop, 1 when the node fails, 2 for a usage or configuration
//! error (nothing has been started then).

use std::process::ExitCode;

use marmot::config::{self, ConfigError, Loaded};
use marmot::flags::{Command, Flags};
use marmot::{commands, logging, run};

fn main() -> ExitCode {
    let flags = Flags::from_process();
    let loaded = match load_config(&flags) {
        Ok(loaded) => loaded,
        Err(err) => return config_error(&err),
    };
    // The inspection commands print their results on stdout and report trouble there:
    // their logs are quieter (`watch` still says while it waits for NATS).
    let level = match &flags.command {
        None => "info",
        Some(Command::Watch { .. }) => "warn",
        Some(_) => "error",
    };
    if let Err(err) = logging::init(&loaded.config.logging, level) {
        eprintln!("marmot: {err}");
        return ExitCode::from(ConfigError::EXIT_CODE as u8);
    }
    if let Some(command) = &flags.command {
        return commands::run(command, &loaded.config);
    }
    log_notices(&loaded, &flags);
    match run::run(loaded.config, flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "marmot stopped");
            ExitCode::FAILURE
        }
    }
}

fn load_config(flags: &Flags) -> Result<Loaded, ConfigError> {
    let loaded = config::load::load(flags.config.as_deref())?;
    loaded.validate()?;
    Ok(loaded)
}

fn config_error(err: &ConfigError) -> ExitCode {
    eprintln!("marmot: configuration error: {err}");
    ExitCode::from(ConfigError::EXIT_CODE as u8)
}

fn log_notices(loaded: &Loaded, flags: &Flags) {
    for notice in &loaded.notices {
        tracing::warn!("{notice}");
    }
    if let Some(addr) = &flags.pprof {
        tracing::warn!(
            pprof = %addr,
            "-pprof is Marmot v1's Go profiler endpoint; it does not apply here and is ignored"
        );
    }
    match &loaded.file {
        Some(file) => {
            tracing::info!(config = %file.display(), node_id = loaded.config.node_id, "configuration loaded")
        }
        None => {
            tracing::info!(node_id = loaded.config.node_id, "no -config given; using defaults and MARMOT_* variables")
        }
    }
}
