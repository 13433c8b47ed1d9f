//! placeholder

pub mod embedded;
pub mod nats;

pub use embedded::{EmbeddedOptions, EmbeddedServer};
pub use nats::{NatsOptions, NatsTransport};
