//! Marmot core: the data model, the wire format, the three traits ([`ChangeSource`],
//! [`LogTransport`], [`SnapshotStore`]), the SQLite side (capture triggers, change reader,
//! merge) and the [`engine`] that wires one node together.
//!
//! Nothing here knows NATS, S3 or the command line.
#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod model;
pub mod snapshot;
pub mod snapshots;
pub mod source;
pub mod sqlite;
pub mod testing;
pub mod transport;
pub mod wire;

pub use error::{Error, Result};
pub use model::{Batch, Hlc, NodeId, Op, Position, RowChange, Shard, TableChanges, Value, Version};
pub use snapshot::{ObjectInfo, SnapshotStore};
pub use source::{ChangeSource, Pending};
pub use transport::{Bounds, Entry, LogTransport, Subscription};
