//! The `ferry` binary: command-line entry point (setup side; no per-packet work here).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry_encap::DropReason;

/// ferry: userspace AF_XDP overlay data plane for Kubernetes pod networks.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every drop reason the data plane counts, with its metric name.
    DropReasons,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DropReasons => {
            for r in DropReason::ALL {
                println!("{:>3}  {:<26} {}", *r as u8, r.name(), r.description());
            }
        }
    }
    ExitCode::SUCCESS
}
