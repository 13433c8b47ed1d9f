//! `marmot-sim`: runs seeded simulations. `--seed N` replays one seed (twice, checking the
//! trace is identical); `--seeds N` runs seeds `0..N` (from `--from S`). Both print the
//! counters of what the runs exercised (summed over the seeds that passed).

use std::process::ExitCode;
use std::time::Instant;

fn usage() -> ExitCode {
    eprintln!("usage: marmot-sim --seed N [--trace] | --seeds N [--from S]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(seed) = get("--seed") {
        return replay(seed, args.iter().any(|a| a == "--trace"));
    }
    let Some(count) = get("--seeds") else { return usage() };
    let from = get("--from").unwrap_or(0);
    let started = Instant::now();
    let mut failed = 0;
    let mut counters = marmot_sim::Counters::default();
    for seed in from..from + count {
        match marmot_sim::run_seed(seed) {
            Ok(world) => counters.add(&world.counters()),
            Err((f, _)) => {
                failed += 1;
                eprintln!("seed {seed} FAILED: {}\nreproduce with: marmot-sim --seed {seed}", f.0);
            }
        }
    }
    println!(
        "{count} seeds from {from}: {} passed, {failed} failed in {:.1}s",
        count - failed,
        started.elapsed().as_secs_f64()
    );
    print!("counters (summed over the seeds that passed):\n{counters}");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn replay(seed: u64, print_trace: bool) -> ExitCode {
    let scenario = marmot_sim::from_seed(seed, marmot_sim::SEED_ACTIONS_MAX);
    println!(
        "seed {seed}: {} nodes, {} shards, {} actions, faults {:?}",
        scenario.nodes,
        scenario.shards,
        scenario.actions.len(),
        scenario.faults
    );
    let first = marmot_sim::run_seed(seed);
    let second = marmot_sim::run_seed(seed);
    let trace = |r: &Result<marmot_sim::World, (marmot_sim::Failure, Vec<String>)>| match r {
        Ok(w) => w.trace.clone(),
        Err((_, t)) => t.clone(),
    };
    let (t1, t2) = (trace(&first), trace(&second));
    if print_trace {
        for line in &t1 {
            println!("  {line}");
        }
    }
    if t1 != t2 {
        eprintln!("seed {seed}: NOT DETERMINISTIC: the two runs' traces differ");
        return ExitCode::FAILURE;
    }
    match first {
        Ok(w) => {
            println!(
                "seed {seed}: converged; {} writes, {} trace events, trace {:016x} (same on replay)",
                w.writes(),
                w.trace.len(),
                w.trace_hash()
            );
            print!("counters:\n{}", w.counters());
            ExitCode::SUCCESS
        }
        Err((f, _)) => {
            eprintln!("seed {seed} FAILED: {}\nreproduce with: marmot-sim --seed {seed}", f.0);
            ExitCode::FAILURE
        }
    }
}
