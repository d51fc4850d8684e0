//! The chaos soak: `cargo run --release -p colony-tests --bin soak -- --minutes 10` runs 8 training peers as
//! processes over TCP on loopback, kills one with SIGKILL every 10–30 s and restarts it, cuts a third of the
//! swarm off for 30 s, then prints the report (Markdown) and every rule it broke. Exits 1 when one was broken.

use std::time::Duration;

use clap::Parser;
use colony_tests::soak::{SoakConfig, run};

#[derive(Debug, Parser)]
#[command(about = "Colony's chaos soak: kills, restarts and a partition among training processes")]
struct Args {
    /// Minutes of chaos after the peers' first epochs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Training peers (processes).
    #[arg(long, default_value_t = 8)]
    peers: usize,
    /// Seed of the schedule (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds into the chaos phase when a third of the swarm is cut off (default: 40 % of the phase).
    #[arg(long)]
    partition_at: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.minutes.is_finite() && args.minutes > 0.0,
        "--minutes must be a positive number of minutes, not {}",
        args.minutes
    );
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let partition_at = match args.partition_at {
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => Duration::from_secs_f64(seconds),
        Some(seconds) => anyhow::bail!("--partition-at must be a number of seconds >= 0, not {seconds}"),
        None => duration.mul_f64(0.4),
    };
    let config = SoakConfig {
        peers: args.peers,
        duration,
        partition_at,
        warm_up: duration.mul_f64(0.2).max(Duration::from_secs(30)),
        ..SoakConfig::full(seed)
    };
    println!("soak: seed {seed}, {config:?}");
    let report = run(&config, |event| println!("{event}"))?;
    println!("\n{}", report.markdown());
    let violations = report.violations(&config);
    if violations.is_empty() {
        println!("every rule held");
        Ok(())
    } else {
        for violation in &violations {
            println!("BROKEN: {violation}");
        }
        std::process::exit(1);
    }
}
