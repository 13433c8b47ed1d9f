//! `LogTransport` implementations: `memory` (deterministic, fault-injecting) and `nats`.
#![warn(missing_docs)]

pub mod memory;

pub use memory::{FaultConfig, MemoryLog, MemoryTransport};

#[cfg(feature = "nats")]
pub mod embedded;
#[cfg(feature = "nats")]
pub mod nats;

#[cfg(feature = "nats")]
pub use embedded::{EmbeddedOptions, EmbeddedServer};
#[cfg(feature = "nats")]
pub use nats::{NatsOptions, NatsTransport};
