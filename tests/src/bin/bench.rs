//! Colony's benchmarks: `cargo run --release -p colony-tests --bin bench -- <suite> [--json]`.
//!
//! Each suite prints its results against a bound measured in the same run (see `colony_tests::bench`).

use clap::{Parser, ValueEnum};
use colony_tests::bench;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Suite {
    /// Bulk transfer over loopback: tcp and quic against a raw tokio TcpStream.
    Transport,
    /// Membership on the in-process transport: a swarm's convergence, memory per peer, publish-to-visible.
    Membership,
    /// Matchmaking: four peers that start looking together until all hold their group, on mem and tcp.
    Matchmaking,
    /// Compression codecs: encode and decode GB/s on randn against a parallel memory copy.
    Codecs,
    /// Butterfly all-reduce among peer processes over loopback tcp, against raw TCP doing the same exchange.
    Allreduce,
    /// CPU optimizer steps (adam, adamw, sgd-momentum, lamb) and axpy on --values parameters (default 64 Mi),
    /// best of --repeat (default 3), against a memory-bandwidth triad.
    Optimizer,
    /// One peer process of the all-reduce suite (started by it).
    #[value(hide = true)]
    AllreducePeer,
    /// Two peer processes training the example MLP: collaborative samples/s against each one's solo rate.
    Efficiency,
    /// One peer process of the efficiency suite (started by it).
    #[value(hide = true)]
    EfficiencyPeer,
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
    /// Repetitions per case (transport: transfers, the best is reported, default 3; membership: publishes
    /// timed on 64 peers, the median is reported, default 20; matchmaking: rounds, the median and p90 are
    /// reported, default 20; codecs: rounds, the best is reported, default 3).
    #[arg(long)]
    repeat: Option<usize>,
    /// Values per codec run in the codecs suite (default 16 Mi: 64 MiB of f32), or per peer in the
    /// all-reduce suite (default 64 Mi: 256 MiB of f32).
    #[arg(long)]
    values: Option<usize>,
    /// Peers in the membership suite's swarm (default 1000) or all-reduce processes (default 4).
    #[arg(long)]
    peers: Option<usize>,
    /// All-reduce peer process: its index.
    #[arg(long, hide = true, default_value_t = 0)]
    index: usize,
    /// Run only the case of this name (the bound is always measured; membership: converge, rss/peer, visible;
    /// codecs: a codec name such as float16).
    #[arg(long)]
    case: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let results = match args.suite {
        Suite::Transport => runtime.block_on(bench::transport::run(
            args.size_mib << 20,
            args.repeat.unwrap_or(3).max(1),
            args.case.as_deref(),
        ))?,
        Suite::Membership => runtime.block_on(bench::membership::run(
            args.peers.unwrap_or(1000),
            args.repeat.unwrap_or(20).max(1),
            args.case.as_deref(),
        ))?,
        Suite::Matchmaking => runtime.block_on(bench::matchmaking::run(
            args.repeat.unwrap_or(20).max(1),
            args.case.as_deref(),
        ))?,
        Suite::Allreduce => runtime.block_on(bench::allreduce::run(
            args.peers.unwrap_or(4),
            args.values.unwrap_or(64 << 20),
            args.repeat.unwrap_or(3).max(1),
            args.case.as_deref(),
        ))?,
        Suite::AllreducePeer => {
            return runtime.block_on(bench::allreduce::peer_process(
                args.index,
                args.peers.unwrap_or(4),
                args.values.unwrap_or(64 << 20),
            ));
        }
        Suite::Efficiency => runtime.block_on(bench::efficiency::run(args.repeat.unwrap_or(150).max(1)))?,
        Suite::EfficiencyPeer => {
            drop(runtime);
            return bench::efficiency::peer_process(
                args.index,
                args.repeat.unwrap_or(150).max(1),
                args.case.as_deref().unwrap_or("tcp://127.0.0.1:0"),
            );
        }
        Suite::Codecs => bench::codecs::run(
            args.values.unwrap_or(16 << 20),
            args.repeat.unwrap_or(3).max(1),
            args.case.as_deref(),
        )?,
        Suite::Optimizer => {
            let values = args.values.unwrap_or(64 << 20);
            let repeat = args.repeat.unwrap_or(3).max(1);
            if args.case.as_deref() == Some("step") {
                vec![runtime.block_on(bench::optimizer::step_cost(values, repeat))?]
            } else {
                let mut results = bench::optimizer::run(values, repeat, args.case.as_deref())?;
                if args.case.is_none() {
                    results.push(runtime.block_on(bench::optimizer::step_cost(values, repeat))?);
                }
                results
            }
        }
    };
    if !args.json {
        println!("machine: {}", bench::machine());
    }
    bench::print(&results, args.json);
    Ok(())
}
