//! `flowgate`: parse the command line, run it, map errors to exit codes.

use clap::Parser;
use provisioner::cli::{Cli, run};

#[tokio::main]
async fn main() {
    tracing_subscriber_init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("flowgate: {e}");
            std::process::exit(e.exit_code());
        }
    }
}

fn tracing_subscriber_init() {
    adapter::telemetry::init();
}
