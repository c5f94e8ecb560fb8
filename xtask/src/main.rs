//! herald's project chores, one entry point: `cargo xtask <command>`.
//!
//! Run `cargo xtask --help` for the commands and `cargo xtask help <command>` for one of them:
//! they are declared once, on `Cli` below, and their help is its doc comments. `it.rs` runs the
//! tests against real brokers that `kafka.rs`, `amqp.rs` and `nats.rs` provide; `bench.rs` the benchmarks;
//! `rules.rs` the alert rules' tests; `process.rs`, `broker.rs` and `report.rs` hold what they
//! share.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};

mod amqp;
mod bench;
mod broker;
mod chart;
mod command;
mod it;
mod kafka;
mod mqtt;
mod nats;
mod pin;
mod process;
mod proxy;
mod redis;
mod report;
mod rules;
mod spool;

use process::{cargo, project_root, run, run_within};

/// herald's project chores.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// What CI runs: fmt check, clippy -D warnings, all workspace tests, the spool's full-disk
    /// test (needs root), rules, docs -D warnings, it
    Ci,
    /// promtool check and unit tests of docs/operations/alerts.yml
    ///
    /// promtool is HERALD_PROMTOOL, else a 2.x on the PATH, else taken out of Debian's
    /// prometheus package (not installed) and cached in target/tools.
    Rules,
    /// Integration tests against real brokers, provisioned and torn down
    ///
    /// For each target: find or start its brokers, run its ignored tests, and always stop what
    /// was started. A broker given by HERALD_KAFKA_BOOTSTRAP, HERALD_AMQP_URL or HERALD_NATS_URL
    /// is used as it is; HERALD_AMQP_PROVISION=local or =docker forces how RabbitMQ is started. The test and
    /// example executables are those `cargo test --workspace` builds (built first, if need
    /// be); each one is killed after HERALD_IT_TIMEOUT_SECS (default 900) of running.
    It {
        /// Which tests to run, in the order given [default: all]
        #[arg(value_enum, value_name = "TARGET")]
        targets: Vec<it::Target>,
    },
    /// Run benchmarks, rewrite docs/benchmarks.md and docs/benchmarks-throughput.svg
    ///
    /// Each benchmark rewrites its section of docs/benchmarks.md; then the summary table and
    /// the chart are redrawn from the last runs in target/bench. Message counts:
    /// HERALD_BENCH_MESSAGES (pipeline), HERALD_BENCH_KAFKA_MESSAGES,
    /// HERALD_BENCH_AMQP_MESSAGES, HERALD_BENCH_REDIS_MESSAGES.
    Bench {
        /// Which benchmarks to run
        #[arg(value_enum, value_name = "NAME", default_value_t = bench::Which::All)]
        which: bench::Which,
        /// `command` and `latency`: the broker on CPU 0 and the herald command on CPU 1
        /// (taskset; a broker the machine runs as a service gets its affinity back after)
        #[arg(long)]
        pin: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Some(Cmd::Ci) => ci(),
        Some(Cmd::Rules) => rules::test(&root),
        Some(Cmd::It { targets }) => it::it(&targets),
        Some(Cmd::Bench { which, pin }) => bench::bench(&root, which, pin),
        None => {
            Cli::command().print_help()?;
            Ok(())
        }
    }
}

fn ci() -> Result<()> {
    // CI runs every test: a test that cannot run fails it. Skipping is for `it` runs by hand.
    if std::env::var_os("HERALD_IT_ALLOW_SKIP").is_some() {
        bail!(
            "HERALD_IT_ALLOW_SKIP is set: `cargo xtask ci` runs every test, and a test that \
             cannot run here must fail it; unset it (it is for `cargo xtask it` by hand)"
        );
    }
    // The one slow step that needs nothing of the workspace, started first: see its doc.
    let _install = kafka::InstallInBackground::start()?;
    run(
        "format check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    run(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            // The benchmark baselines and every facade part, not only the defaults.
            "--features",
            "herald-kafka/baseline,herald-amqp/baseline,herald-nats/baseline,herald-redis/baseline,herald-mqtt/baseline,herald/full",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // Every workspace build unifies herald-core's optional `otel` in (the facade's tests turn it
    // on): check the crate alone too, with its defaults.
    run(
        "herald-core without optional features",
        cargo().args(["check", "-p", "herald-core", "--all-targets"]),
    )?;
    // Time-limited, as the real-broker suites are: a hung test ends CI with a clear error
    // instead of holding it. The limit leaves room for building every test binary on a cold
    // machine.
    run_within(
        "tests",
        cargo().args(["test", "--workspace"]),
        Duration::from_secs(40 * 60),
    )?;
    // Needs root (it mounts a small tmpfs to fill): ignored in a plain `cargo test`. Selected
    // across the workspace, not with `-p herald-spool`: with the workspace's features it is the
    // binary the step above built (`-p` alone resolves other features and builds it again).
    run_within(
        "spool on a full disk",
        cargo().args([
            "test",
            "--workspace",
            "--test",
            "disk_full",
            "--",
            "--ignored",
        ]),
        Duration::from_secs(10 * 60),
    )?;
    rules::test(&project_root())?;
    run(
        "docs",
        cargo()
            .args(["doc", "--workspace", "--no-deps"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    // Real brokers last: found or started, tested, and stopped again.
    it::it(&[])?;
    eprintln!("\nxtask ci: all checks passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Cmd};
    use crate::{bench, it};

    #[test]
    fn the_command_line_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_form_the_commands_accepted_still_parses() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
                .map(|cli| cli.command)
        };
        assert!(matches!(parse(&[]), Ok(None)));
        assert!(matches!(parse(&["ci"]), Ok(Some(Cmd::Ci))));
        assert!(matches!(parse(&["rules"]), Ok(Some(Cmd::Rules))));
        assert!(matches!(parse(&["it"]), Ok(Some(Cmd::It { targets })) if targets.is_empty()));
        assert!(matches!(
            parse(&["it", "cli", "kafka"]),
            Ok(Some(Cmd::It { targets })) if targets == [it::Target::Cli, it::Target::Kafka]
        ));
        assert!(parse(&["it", "pulsar"]).is_err());
        assert!(matches!(
            parse(&["bench"]),
            Ok(Some(Cmd::Bench {
                which: bench::Which::All,
                pin: false
            }))
        ));
        assert!(matches!(
            parse(&["bench", "command", "--pin"]),
            Ok(Some(Cmd::Bench {
                which: bench::Which::Command,
                pin: true
            }))
        ));
        for (name, which) in [
            ("pipeline", bench::Which::Pipeline),
            ("kafka", bench::Which::Kafka),
            ("amqp", bench::Which::Amqp),
            ("nats", bench::Which::Nats),
            ("redis", bench::Which::Redis),
            ("mqtt", bench::Which::Mqtt),
            ("all", bench::Which::All),
            ("summary", bench::Which::Summary),
        ] {
            assert!(
                matches!(parse(&["bench", name]), Ok(Some(Cmd::Bench { which: w, pin: false })) if w == which),
                "bench {name}"
            );
        }
        assert!(parse(&["bench", "everything"]).is_err());
        assert!(parse(&["deploy"]).is_err());
    }
}
