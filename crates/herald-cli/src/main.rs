//! `herald`: produce a file or stdin to Kafka or RabbitMQ reliably, try herald with nothing to
//! install (`herald demo`), and measure it against the raw clients (`herald bench`).
//!
//! The top-level README.md (section "The `herald` command") is the contract: destination URLs, input formats, the dead-letter
//! file, `--report json` and exit statuses.

/// `println!` for results on stdout, which a reader may close early (`herald ... | head -1`):
/// a closed stdout ends the output quietly instead of panicking after the work is done.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _closed_early = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod base64;
mod bench;
mod dead_letter;
mod demo;
mod engine;
mod input;
mod log;
mod open_loop;
mod outstanding;
mod produce;
mod report;
mod settings;
mod spool;
mod target;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::report::Exit;

/// Produce messages to Kafka and RabbitMQ reliably and fast: batching, retries with backoff,
/// per-key order, backpressure, and a record of every message that was not acknowledged.
// No `Debug` here or below: the arguments hold URLs with their passwords and raw
// --kafka-property values.
#[derive(Parser)]
#[command(name = "herald", version)]
#[command(
    after_help = "Logs go to stderr: warnings and errors by default, more with -v, errors \
only with -q. RUST_LOG, when set, takes precedence over -v and -q (e.g. RUST_LOG=herald=debug; \
a malformed RUST_LOG is a usage error)."
)]
struct Cli {
    #[command(flatten)]
    log: log::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send each line of a file or stdin as a message; what is not acknowledged goes to the
    /// dead-letter file.
    Produce(produce::ProduceArgs),
    /// Nothing to install: a stream of keyed messages through herald to librdkafka's in-process
    /// mock Kafka cluster, with faults injected, and what happened.
    Demo(demo::DemoArgs),
    /// herald's throughput and latency on a broker (the mock cluster without --to); with
    /// --baseline, the raw client at its best and the naive pattern in the same run.
    Bench(bench::BenchArgs),
    /// What a spool (`herald produce --spool DIR`) holds, and whether it is sound: `status`,
    /// `check [--repair]`. Sends nothing.
    Spool(spool::SpoolArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What herald's libraries log, on stderr; by default warnings and errors only: a setting
    // that weakens what "delivered" means, failures nobody claimed. Text or JSON lines.
    if let Err(e) = log::init(&cli.log) {
        eprintln!("error: {e}");
        return ExitCode::from(Exit::Usage.code());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Usage.code());
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Produce(args) => produce::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Spool(args) => spool::run(args),
        }
    });
    // Transports may hold background threads (librdkafka): do not wait for them beyond a moment.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(exit) => ExitCode::from(exit.code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(Exit::Usage.code())
        }
    }
}
