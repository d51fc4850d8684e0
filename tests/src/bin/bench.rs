//! Colony's benchmarks: `cargo run --release -p colony-tests --bin bench -- <suite> [--json]`.
//!
//! Each suite prints its results against a bound measured in the same run (see `colony_tests::bench`).

use clap::{Parser, ValueEnum};
use colony_tests::bench;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Suite {
    /// Bulk transfer over loopback: tcp and quic against a raw tokio TcpStream.
    Transport,
}

#[derive(Debug, Parser)]
#[command(about = "Colony's benchmarks; each result is a ratio against a bound measured in the same run")]
struct Args {
    /// Which suite to run.
    suite: Suite,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Bytes per transfer, in MiB (the transport suite's default is 1024, i.e. 1 GiB).
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Transfers per case; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Run only the case of this name (the bound is always measured).
    #[arg(long)]
    case: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let results = match args.suite {
        Suite::Transport => runtime.block_on(bench::transport::run(
            args.size_mib << 20,
            args.repeat.max(1),
            args.case.as_deref(),
        ))?,
    };
    if !args.json {
        println!("machine: {}", bench::machine());
    }
    bench::print(&results, args.json);
    Ok(())
}
