//! The `colony` command. Subcommands so far: `keygen` (create a peer identity file) and `node` (run a peer
//! that others join through). `status` and `authority` arrive with operability and access control.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use colony::config::{Config, NodeSettings};
use colony::membership::{Membership, MembershipEvent};
use colony_transports::Keypair;

#[derive(Debug, Parser)]
#[command(
    name = "colony",
    about = "Colony: collaborative training on unreliable machines",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a peer identity (an ed25519 key, PEM PKCS#8, mode 0600) and print its peer id.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file (the old identity is lost).
        #[arg(long)]
        force: bool,
    },
    /// Run a peer: a bootstrap peer others join through (or one that joins with --initial-peer). Prints its
    /// full dialable address on the first line of standard output, then one line per member that joins
    /// (`joined PEER ROLE ADDRESS`) or leaves (`left PEER`); logs go to standard error. SIGINT or SIGTERM
    /// leaves the swarm gracefully and exits.
    Node(NodeArgs),
    /// Show a run's swarm: joins through --initial-peer as a client-mode observer (it publishes nothing and
    /// is counted by no trainer), reads the peers' progress records and prints the global epoch, samples
    /// against the target, samples/s, ETA, members by role and one row per peer; --watch refreshes in
    /// place, --json prints one JSON object (per refresh). Leaves the swarm gracefully when done.
    Status(colony::status::StatusArgs),
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// A configuration file (TOML, see docs/configuration.md): its `[node]` keys are these flags' names with
    /// underscores; a flag given here overrides the file's key.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: NodeSettings,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("colony: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(node(args))
        }
        Command::Status(args) => {
            // Warnings only: standard output carries the status (a script reads it with --json).
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(colony::status::run(args)).map_err(anyhow::Error::from)
        }
        Command::Keygen { out, force } => {
            if out.exists() && !force {
                anyhow::bail!(
                    "{} already exists; it may be a peer's identity. Pass --force to replace it",
                    out.display()
                );
            }
            let keypair = Keypair::generate();
            keypair.save(&out)?;
            println!("{}", keypair.peer_id());
            Ok(())
        }
    }
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    // Defaults < file < flags: a flag not given leaves the file's key alone.
    let file = Config::load_optional(args.config.as_deref())?;
    let settings = file.node.overlay(&args.settings);
    let config = settings.membership()?;
    let Some(listen) = config.listen.clone() else {
        anyhow::bail!("colony node needs an address to listen on: pass --listen HOST:PORT or set [node] listen");
    };
    let keypair = match &settings.identity {
        Some(path) => Keypair::load_or_generate(path)?,
        None => Keypair::generate(),
    };
    let transport = colony::peer::transport_for(listen.scheme(), &keypair).map_err(anyhow::Error::msg)?;
    if let Some(address) = settings.metrics_address {
        let bound = colony::telemetry::serve_prometheus(address)?;
        tracing::info!(%bound, "Prometheus metrics on http://{bound}/metrics");
    }
    if settings.auxiliary == Some(true) {
        return auxiliary_node(config, keypair, transport, &file, settings.bootstrap_timeout_s).await;
    }
    // The node relays the records of the trainers that join through it, so it validates their kinds.
    let schemas = colony::peer::training_schemas();
    let membership = Membership::start(config, Arc::new(keypair), transport, schemas).await?;
    let mut events = membership.events();
    let address = membership.address().context("a listening node has an address")?;
    println!("{address}");
    let print_joined = |member: colony::membership::MemberInfo| {
        let address = member.address.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        println!("joined {} {} {address}", member.peer, member.role);
    };
    // Members learned while joining, before the event stream was open (one may be printed twice).
    for member in membership.members() {
        print_joined(member);
    }
    tracing::info!(%address, "node running; Ctrl-C leaves the swarm");

    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("handling SIGTERM")?;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(MembershipEvent::Joined(member)) => print_joined(member),
                Ok(MembershipEvent::Left(peer)) => println!("left {peer}"),
                Ok(MembershipEvent::Rejoined(generation)) => {
                    tracing::warn!(generation, "declared dead by the swarm; rejoined");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "membership events were dropped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    tracing::info!("leaving the swarm");
    membership.leave().await;
    Ok(())
}

/// Resolves at SIGINT or SIGTERM.
async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        }
        Err(error) => {
            tracing::warn!("cannot handle SIGTERM ({error}); Ctrl-C still stops the node");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `colony node --auxiliary`: joins, learns the run's gradient schema from a trainer, and reduces parts of
/// every gradient round for the trainers until SIGINT or SIGTERM. The file's `[optimizer]` keys give the
/// round timings; the model, its codecs and the target batch size come from the trainers. Prints its
/// address, then `auxiliary for N tensors (V values), target B` and `epoch E: reduced with P peers` /
/// `epoch E: round failed: REASON` lines.
async fn auxiliary_node(
    config: colony::membership::MembershipConfig,
    keypair: Keypair,
    transport: Arc<dyn colony_transports::Transport>,
    file: &Config,
    bootstrap_timeout_s: Option<u64>,
) -> anyhow::Result<()> {
    // The trainers' schema replaces the model-dependent keys, so they need not be in the file.
    let mut settings = file.optimizer.clone();
    settings.target_batch_size.get_or_insert(1);
    settings.optimizer.get_or_insert(colony::config::OptimizerRule::Sgd);
    settings.lr.get_or_insert(1e-3);
    let options = settings.options(&[])?;
    let wait = Duration::from_secs(bootstrap_timeout_s.unwrap_or(30).max(1));
    let (mut peer, schema) = colony::peer::start_auxiliary_peer(config, keypair, Some(transport), options, wait)
        .await
        .map_err(anyhow::Error::msg)?;
    let address = peer.membership.address().context("an auxiliary node listens")?;
    println!("{address}");
    let values: usize = schema.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    println!(
        "auxiliary for {} tensors ({values} values), target {}",
        schema.tensors.len(),
        schema.target_batch_size
    );
    tracing::info!(%address, "auxiliary node running; Ctrl-C leaves the swarm");
    let (reduced, failed) = colony::peer::run_auxiliary(
        &mut peer.optimizer,
        Duration::from_millis(10),
        shutdown_signal(),
        |round| match &round.result {
            colony::optimizer::RoundResult::Averaged { peers } => {
                println!("epoch {}: reduced with {peers} peers", round.epoch)
            }
            colony::optimizer::RoundResult::Failed { reason } => {
                println!("epoch {}: round failed: {reason}", round.epoch)
            }
        },
    )
    .await;
    tracing::info!(reduced, failed, "leaving the swarm");
    peer.optimizer.shutdown().await;
    peer.membership.leave().await;
    Ok(())
}
