//! One training peer per process: `cargo run --release -p colony-examples --bin trainer -- --listen
//! tcp://0.0.0.0:4100` on the first machine, then `--listen tcp://0.0.0.0:4100 --initial-peer
//! tcp://FIRST:4100` on the others (`--client-mode` without `--listen` behind NAT). Every option of the
//! collaborative optimizer is a flag (`--help`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::Parser;
use colony::config::NodeSettings;
use colony::peer::start_training_peer;
use colony_examples::swarm::{Event, TrainFlags, tensor_infos, train};
use colony_examples::{Mlp, generate};
use colony_transports::{Address, Keypair};

#[derive(Debug, Parser)]
#[command(about = "One peer of a Colony run training the example MLP")]
struct Args {
    /// Where to accept connections (tcp://HOST:PORT or quic://HOST:PORT); leave out for client mode.
    #[arg(long)]
    listen: Option<Address>,
    /// The address others dial when it is not the listening one (listening on 0.0.0.0, a port forward, a
    /// proxy); port 0 keeps the bound port. Default: the bound address.
    #[arg(long)]
    advertise: Option<Address>,
    /// A peer of the run to join through (repeatable); none for the first peer.
    #[arg(long = "initial-peer")]
    initial_peers: Vec<Address>,
    /// The run's name: peers of other runs are not admitted. Default `colony-example`.
    #[arg(long)]
    run_id: Option<String>,
    /// Identity file (created if missing), so a restarted peer keeps its id.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// Admit only these peers (peer ids; repeat the flag): the run's allowlist. Default: an open run.
    #[arg(long = "allow-peer", value_name = "PEER_ID")]
    allow_peers: Vec<String>,
    /// Admit only peers with a membership certificate from this authority (its id); needs --certificate.
    #[arg(long, value_name = "AUTHORITY_ID")]
    authority: Option<String>,
    /// This peer's membership certificate file (`colony authority issue`), presented to every peer.
    #[arg(long, value_name = "FILE")]
    certificate: Option<PathBuf>,
    /// Seed of this peer's batch order (give each peer its own).
    #[arg(long, default_value_t = 0)]
    shuffle_seed: u64,
    /// Seconds to keep trying the initial peers. Default 30.
    #[arg(long, visible_alias = "bootstrap-timeout-s")]
    bootstrap_timeout: Option<u64>,
    /// Serve Prometheus metrics over HTTP on HOST:PORT (`/metrics`; port 0 picks one, printed at start).
    /// Default off.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    #[command(flatten)]
    flags: TrainFlags,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // The peer's settings: the trainer's defaults < the [node] keys of --config < the flags given here.
    let file = args.flags.config()?;
    let defaults = NodeSettings {
        run_id: Some("colony-example".into()),
        ..NodeSettings::default()
    };
    let flags = NodeSettings {
        listen: args.listen.as_ref().map(ToString::to_string),
        advertise: args.advertise.as_ref().map(ToString::to_string),
        initial_peers: (!args.initial_peers.is_empty())
            .then(|| args.initial_peers.iter().map(ToString::to_string).collect()),
        run_id: args.run_id.clone(),
        identity: args.identity.clone(),
        allow_peers: (!args.allow_peers.is_empty()).then(|| args.allow_peers.clone()),
        authority: args.authority.clone(),
        certificate: args.certificate.clone(),
        bootstrap_timeout_s: args.bootstrap_timeout,
        metrics_address: args.metrics_address,
        ..NodeSettings::default()
    };
    let node = defaults.overlay(&file.node).overlay(&flags);
    // Prometheus metrics when `--metrics-address` or `[node] metrics_address` is set (the flag overrides the
    // file's key); the exporter is started here, once.
    if let Some(address) = node.metrics_address {
        let bound = colony::telemetry::serve_prometheus(address)?;
        eprintln!("Prometheus metrics on http://{bound}/metrics");
    }
    let config = node.membership()?;
    anyhow::ensure!(
        config.listen.is_some() || !config.initial_peers.is_empty(),
        "a peer that does not listen (client mode) needs --initial-peer"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let data_spec = args.flags.data_spec();
    let (train_set, validation) = generate(&data_spec);
    let mut model = Mlp::new(&args.flags.model_spec(&data_spec))?;
    let tensors = tensor_infos(&model);
    let options = args.flags.options(&tensors)?;
    let keypair = match &node.identity {
        Some(path) => Keypair::load_or_generate(path)?,
        None => Keypair::generate(),
    };
    let initial_peers = config.initial_peers.clone();
    let initial = model.params();
    let mut peer = runtime
        .block_on(start_training_peer(config, keypair, None, tensors, &initial, options))
        .map_err(anyhow::Error::msg)?;
    match peer.membership.address() {
        Some(address) => println!("listening on {address}"),
        None => println!("client mode: joined through {initial_peers:?}"),
    }
    let stop = AtomicBool::new(false);
    let summary = train(
        &mut peer,
        &mut model,
        (&train_set, &validation),
        &args.flags,
        args.shuffle_seed,
        &stop,
        |event| match event {
            Event::Epoch {
                epoch,
                loss,
                validation,
            } => match validation {
                Some(v) => println!(
                    "epoch {epoch}: training loss {loss:.4}, validation loss {:.4}, accuracy {:.1} %",
                    v.loss,
                    v.accuracy * 100.0
                ),
                None => println!("epoch {epoch}: training loss {loss:.4}"),
            },
            Event::Loaded(epoch) => println!("loaded the swarm's state at epoch {epoch}"),
            Event::StateRound {
                epoch,
                peers,
                group,
                digest,
            } => {
                let group = group.map_or(String::new(), |g| format!(" in group {g}"));
                match (peers, digest) {
                    (Some(peers), Some(digest)) => println!(
                        "state round of epoch {epoch}: averaged by {peers} peers{group}, parameters {digest:016x}"
                    ),
                    (Some(peers), None) => println!("state round of epoch {epoch}: averaged by {peers} peers{group}"),
                    (None, _) => println!("state round of epoch {epoch}: failed{group}"),
                }
            }
            Event::Step { .. } => {}
        },
    );
    runtime.block_on(async {
        peer.optimizer.shutdown().await;
        peer.membership.leave().await;
    });
    let summary = summary?;
    let evaluation = summary.validation.context("the final evaluation")?;
    println!(
        "done: {} epochs, {:.0} samples/s, validation loss {:.4}, accuracy {:.1} %, {} gradient rounds, {} state \
         rounds, {} failed rounds, {} states loaded",
        summary.epochs,
        summary.samples as f64 / summary.seconds.max(1e-9),
        evaluation.loss,
        evaluation.accuracy * 100.0,
        summary.gradient_rounds,
        summary.state_rounds,
        summary.failures,
        summary.loads
    );
    Ok(())
}
