//! The `colony` command. Subcommands so far: `keygen` (create a peer identity file). `node`, `status` and
//! `authority` arrive with membership, operability and access control.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
