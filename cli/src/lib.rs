//! The `marmot` command: configuration, command line, logging, and the entry point that
//! wires a node together ([`run::run`]).
//!
//! The binary (`src/main.rs`) is a thin shell over this library so that tests can drive
//! flag parsing and configuration loading directly.

#![warn(missing_docs)]

pub mod ack_flush;
pub mod commands;
pub mod config;
pub mod flags;
pub mod lock;
pub mod logging;
pub mod metrics;
pub mod run;
pub mod sampler;
pub mod snapshot;
pub mod verify;
