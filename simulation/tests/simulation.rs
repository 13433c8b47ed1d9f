//! The simulation as a property test: proptest draws scenarios (node count, shards, fault
//! mix, workload, crashes) and shrinks a failing one to a small schedule.

use marmot_sim::scenario::scenario;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_to_the_last_writer_wins_model_under_faults(s in scenario(80), seed in any::<u64>()) {
        if let Err((failure, trace)) = marmot_sim::run_scenario(s, seed) {
            let tail: Vec<&String> = trace.iter().rev().take(20).collect();
            prop_assert!(false, "{}\nlast events (newest first): {:#?}", failure.0, tail);
        }
    }
}

#[test]
fn a_seed_replays_the_same_trace() {
    for seed in [3u64, 17, 42] {
        let a = marmot_sim::run_seed(seed).map_err(|(f, _)| f.0).expect("seed passes");
        let b = marmot_sim::run_seed(seed).map_err(|(f, _)| f.0).expect("seed passes");
        assert_eq!(a.trace, b.trace, "seed {seed} must replay exactly");
        assert!(a.writes() > 0, "seed {seed} wrote something");
    }
}
