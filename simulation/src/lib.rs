//! The deterministic multi-node simulation of Marmot.
//!
//! 2–5 nodes, each a real SQLite file with real capture triggers and a real engine, on the
//! fault-injecting memory transport. One seed chooses the node count, shards, workload and
//! fault mix; a chaos phase runs, then every fault is healed and the nodes run to
//! quiescence. Oracles: during the run no node shows part of a remote transaction; at the
//! end every node's user tables equal the last-writer-wins model of all writes made.
//! Determinism: no clocks, no thread RNG, no hash-map iteration; a seed replays exactly.
//!
//! Modules: [`schema`] (the tables nodes start with, as SQL and as the oracle sees them;
//! the migration), [`workload`] (the SQL applications run; reading capture's log into the
//! model), [`faults`] (transport fault mix, crash points, partitions, truncation, healing),
//! [`oracle`] (atomicity, convergence, dumps) with [`model`] (the last-writer-wins model),
//! [`journal`] (the conflict journal's oracle),
//! [`scenario`] (the proptest strategies), [`counters`] (what a run exercised) and
//! [`world`] (the nodes and the loop driving them).
#![warn(missing_docs)]

pub mod counters;
pub mod expiry;
pub mod faults;
pub mod journal;
pub mod model;
pub mod oracle;
pub mod scenario;
pub mod schema;
pub mod snapshots;
pub mod verify;
pub mod workload;
pub mod world;

pub use counters::{Counters, NOT_YET_REACHABLE};
pub use scenario::{from_seed, Scenario};
pub use world::{run_scenario, Failure, World};

/// Actions per seeded scenario.
pub const SEED_ACTIONS_MAX: usize = 120;

/// Runs the scenario of `seed`. On failure returns the message (the trace is in the error).
pub fn run_seed(seed: u64) -> Result<World, (Failure, Vec<String>)> {
    run_scenario(from_seed(seed, SEED_ACTIONS_MAX), seed)
}
