//! The `colony` command. Subcommands so far: `keygen` (create a peer identity file) and `node` (run a peer
//! that others join through). `status` and `authority` arrive with operability and access control.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use colony::membership::{Membership, MembershipConfig, MembershipEvent, Role};
use colony_transports::{Address, Keypair};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    /// TCP (LAN): Colony's signed handshake and stream multiplexer.
    Tcp,
    /// QUIC (WAN): TLS 1.3 over UDP.
    Quic,
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// Where to listen: `HOST:PORT` (port 0 picks a free one) or a full address such as `tcp://0.0.0.0:4000`.
    #[arg(long)]
    listen: String,
    /// A peer to join through (its full address, as another node printed it); repeat for several.
    #[arg(long = "initial-peer")]
    initial_peers: Vec<Address>,
    /// The identity file (created if missing, so that a restarted node keeps its peer id).
    #[arg(long)]
    identity: Option<PathBuf>,
    /// The transport, when --listen gives no scheme.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: TransportKind,
    /// The run to join.
    #[arg(long, default_value = "colony")]
    run_id: String,
    /// Join as an auxiliary peer (helps others average, trains nothing).
    #[arg(long)]
    auxiliary: bool,
    /// How often each member probes another, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    probe_period_ms: u64,
    /// How long a suspected member has to refute before it is dropped, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    suspect_timeout_ms: u64,
    /// How long to keep trying the initial peers, in seconds.
    #[arg(long, default_value_t = 30)]
    bootstrap_timeout_s: u64,
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

fn listen_address(args: &NodeArgs) -> anyhow::Result<Address> {
    if args.listen.contains("://") {
        return args.listen.parse().map_err(|e| anyhow::anyhow!("--listen: {e}"));
    }
    let scheme = match args.transport {
        TransportKind::Tcp => "tcp",
        TransportKind::Quic => "quic",
    };
    format!("{scheme}://{}", args.listen)
        .parse()
        .map_err(|e| anyhow::anyhow!("--listen: {e}"))
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let keypair = match &args.identity {
        Some(path) => Keypair::load_or_generate(path)?,
        None => Keypair::generate(),
    };
    let listen = listen_address(&args)?;
    let transport = colony::peer::transport_for(listen.scheme(), &keypair).map_err(anyhow::Error::msg)?;
    let mut config = MembershipConfig::new(args.run_id.clone(), Some(listen));
    config.initial_peers = args.initial_peers.clone();
    config.role = if args.auxiliary { Role::Auxiliary } else { Role::Trainer };
    config.swim.probe_period = Duration::from_millis(args.probe_period_ms);
    config.swim.probe_rtt = Duration::from_millis(args.probe_period_ms * 2 / 5);
    config.swim.suspect_to_down_after = Duration::from_millis(args.suspect_timeout_ms);
    config.bootstrap_timeout = Duration::from_secs(args.bootstrap_timeout_s);
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
