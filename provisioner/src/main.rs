//! `flowgate`: parse the command line, run it, map errors to exit codes.

use clap::Parser;
use provisioner::cli::{Cli, run};

fn main() {
    tracing_subscriber_init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flowgate: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli));
    // Blocking work still running (an unpack, a stuck file operation) must not
    // hold the exit: `serve` has bounded its own shutdown already.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
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
