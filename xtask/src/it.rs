//! `cargo xtask it`: broker integration tests. For each broker: find or start one, run its
//! adapter's integration tests against it, and always stop what was started, also when the
//! tests fail.
//!
//! Integration tests live in each adapter crate as `tests/it.rs` (herald-amqp also has
//! `tests/cluster.rs`, on a RabbitMQ cluster its tests start themselves), every test marked
//! `#[ignore = "needs a broker: cargo xtask it"]` or similar, so that `cargo test --workspace`
//! stays hermetic. They read the broker's address from the environment
//! (`HERALD_KAFKA_BOOTSTRAP`, `HERALD_AMQP_URL`, `HERALD_NATS_URL`, `HERALD_REDIS_URL`,
//! `HERALD_MQTT_URL`); a broker given that way by the user is used as it is.
//!
//! The facade's tests that need that broker (`crates/herald/tests/otel.rs`: the trace header
//! read back from Kafka and RabbitMQ) and its examples for it (`crates/herald/examples/kafka.rs`,
//! `rabbitmq.rs`) then run against it, with the same environment: an example that exits
//! non-zero (a message not delivered) fails the run.

use anyhow::{bail, Result};
use clap::ValueEnum;

use crate::broker::Broker;
use crate::process::{cargo, run_within};
use crate::{amqp, kafka, mqtt, nats, redis};

/// A set of tests that need real brokers.
///
/// In the order they run when none is named: the brokers that need no install first, so that
/// Tansu's (when Kafka needs it) goes on in the background meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Target {
    /// herald-amqp's tests/it.rs and tests/cluster.rs, against RabbitMQ
    Amqp,
    /// herald-nats's tests/it.rs, against NATS with JetStream
    Nats,
    /// herald-redis's tests/it.rs, against Redis
    Redis,
    /// herald-mqtt's tests/it.rs, against an MQTT broker (Mosquitto)
    Mqtt,
    /// herald-kafka's tests/it.rs, against Kafka
    Kafka,
    /// herald-cli's tests/real_brokers.rs, against Kafka, RabbitMQ, NATS, Redis and MQTT
    Cli,
}

/// A target's tests and how to get their brokers.
struct Suite {
    name: &'static str,
    package: &'static str,
    /// The test targets (`tests/NAME.rs`) whose ignored tests need the broker.
    tests: &'static [&'static str],
    /// The facade's examples to run against the broker: (example, the feature it requires).
    examples: &'static [(&'static str, &'static str)],
    /// The facade's ignored tests that need this broker: (test target, test name filter).
    facade_tests: &'static [(&'static str, &'static str)],
    provision: fn() -> Result<Broker>,
}

impl Target {
    fn suite(self) -> Suite {
        match self {
            Target::Kafka => Suite {
                name: "kafka",
                package: "herald-kafka",
                tests: &["it"],
                examples: &[("kafka", "kafka")],
                facade_tests: &[("otel", "kafka_")],
                provision: kafka::provision,
            },
            Target::Amqp => Suite {
                name: "amqp",
                package: "herald-amqp",
                tests: &["it", "cluster"],
                examples: &[("rabbitmq", "amqp")],
                facade_tests: &[("otel", "rabbitmq_")],
                provision: amqp::provision,
            },
            Target::Nats => Suite {
                name: "nats",
                package: "herald-nats",
                tests: &["it"],
                examples: &[],
                facade_tests: &[],
                provision: nats::provision,
            },
            Target::Redis => Suite {
                name: "redis",
                package: "herald-redis",
                tests: &["it"],
                examples: &[],
                facade_tests: &[],
                provision: redis::provision,
            },
            Target::Mqtt => Suite {
                name: "mqtt",
                package: "herald-mqtt",
                tests: &["it"],
                examples: &[],
                facade_tests: &[],
                provision: mqtt::provision,
            },
            Target::Cli => Suite {
                name: "cli",
                package: "herald-cli",
                tests: &["real_brokers"],
                examples: &[],
                facade_tests: &[],
                provision: provision_all,
            },
        }
    }
}

/// Kafka, RabbitMQ, NATS, Redis and MQTT together, for the CLI's tests; all stopped afterwards.
fn provision_all() -> Result<Broker> {
    let mut kafka = kafka::provision()?;
    let mut amqp = amqp::provision()?;
    let mut nats = nats::provision()?;
    let mut redis = redis::provision()?;
    let mut mqtt = mqtt::provision()?;
    let mut env = std::mem::take(&mut kafka.env);
    env.append(&mut amqp.env);
    env.append(&mut nats.env);
    env.append(&mut redis.env);
    env.append(&mut mqtt.env);
    let stops: Vec<Box<dyn FnOnce()>> = [
        kafka.stop.take(),
        amqp.stop.take(),
        nats.stop.take(),
        redis.stop.take(),
        mqtt.stop.take(),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(Broker {
        env,
        stop: Some(Box::new(move || stops.into_iter().for_each(|stop| stop()))),
    })
}

/// Runs the tests of `targets`, in that order; of every target when `targets` is empty. Where
/// Kafka's tests need Tansu installed, its install starts first, in the background.
pub(crate) fn it(targets: &[Target]) -> Result<()> {
    let wanted = if targets.is_empty() {
        Target::value_variants()
    } else {
        targets
    };
    // Nodes an earlier run left when it was killed would hold memory and ports for good.
    if wanted
        .iter()
        .any(|t| matches!(t, Target::Amqp | Target::Cli))
    {
        amqp::reap_orphaned_nodes();
    }
    // Dropped at the end: an install nothing waited for (a run that failed first) is stopped.
    let _install = if wanted
        .iter()
        .any(|t| matches!(t, Target::Kafka | Target::Cli))
    {
        Some(kafka::InstallInBackground::start()?)
    } else {
        None
    };
    for target in wanted.iter().map(|t| t.suite()) {
        eprintln!("\n==> it {}: provisioning a broker", target.name);
        let broker = (target.provision)()?;
        // `--ignored` runs nothing, and passes, where no test is marked ignored (or none matches
        // a filter): each binary must have some to run.
        for test in target.tests {
            ignored_tests(target.package, test, None)?;
        }
        for (test, filter) in target.facade_tests {
            ignored_tests("herald", test, Some(filter))?;
        }
        let mut cmd = cargo();
        cmd.args(["test", "-p", target.package]);
        for test in target.tests {
            cmd.args(["--test", test]);
        }
        cmd.args(["--", "--ignored", "--test-threads=1"]);
        cmd.args(shown_skips());
        for (k, v) in &broker.env {
            cmd.env(k, v);
        }
        let mut result = run_within(&format!("it {}", target.name), &mut cmd, time_limit()?);
        for (test, filter) in target.facade_tests {
            if result.is_err() {
                break;
            }
            let mut cmd = cargo();
            cmd.args(["test", "-p", "herald", "--test", test, "--", "--ignored"])
                .args(["--test-threads=1", filter])
                .args(shown_skips())
                .envs(broker.env.iter().map(|(k, v)| (k, v)));
            result = run_within(
                &format!("it {}: herald --test {test} {filter}", target.name),
                &mut cmd,
                time_limit()?,
            );
        }
        for (example, feature) in target.examples {
            if result.is_err() {
                break;
            }
            result = run_within(
                &format!("it {}: example {example}", target.name),
                &mut example_command(example, feature, &broker),
                time_limit()?,
            );
        }
        drop(broker);
        result?;
    }
    Ok(())
}

/// `cargo run -p herald --example EXAMPLE --features FEATURE` with the broker's environment.
fn example_command(example: &str, feature: &str, broker: &Broker) -> std::process::Command {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "-p",
        "herald",
        "--example",
        example,
        "--features",
        feature,
    ]);
    for (k, v) in &broker.env {
        cmd.env(k, v);
    }
    cmd
}

/// How many tests `cargo test -p PACKAGE --test TEST -- --ignored [FILTER]` would run (listed,
/// not run: this builds the binary, which the run then reuses); none is an error.
fn ignored_tests(package: &str, test: &str, filter: Option<&str>) -> Result<usize> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-q",
        "-p",
        package,
        "--test",
        test,
        "--",
        "--ignored",
        "--list",
    ]);
    cmd.args(filter);
    let what = format!(
        "the real-broker tests of `{package} --test {test}`{}",
        filter
            .map(|f| format!(" matching `{f}`"))
            .unwrap_or_default()
    );
    eprintln!("\n==> listing {what}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| anyhow::anyhow!("could not list {what}: {e}"))?;
    if !out.status.success() {
        bail!("could not list {what} ({})", out.status);
    }
    let n = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count();
    if n == 0 {
        bail!(
            "{what}: none to run (`--ignored` runs only tests marked #[ignore], and would pass \
             having run nothing)"
        );
    }
    Ok(n)
}

/// With `HERALD_IT_ALLOW_SKIP=1` a test that cannot run here prints `SKIPPED: ...` and passes:
/// the test harness then shows what passing tests printed, so that every skip is in the
/// output rather than captured away.
fn shown_skips() -> &'static [&'static str] {
    if std::env::var("HERALD_IT_ALLOW_SKIP").as_deref() == Ok("1") {
        &["--show-output"]
    } else {
        &[]
    }
}

/// How long one target's tests may run: `HERALD_IT_TIMEOUT_SECS`, default 15 minutes (they take
/// two to three). Their binaries are built before, outside the limit, by [`ignored_tests`].
fn time_limit() -> Result<std::time::Duration> {
    match std::env::var("HERALD_IT_TIMEOUT_SECS") {
        Ok(v) => match v.parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(std::time::Duration::from_secs(secs)),
            _ => bail!("HERALD_IT_TIMEOUT_SECS must be a number of seconds above 0, got {v:?}"),
        },
        Err(_) => Ok(std::time::Duration::from_secs(15 * 60)),
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::Target;

    #[test]
    fn the_broker_examples_run_with_the_features_they_require() {
        let herald = std::fs::read_to_string(
            crate::process::project_root().join("crates/herald/Cargo.toml"),
        )
        .expect("crates/herald/Cargo.toml");
        for target in Target::value_variants() {
            for (example, feature) in target.suite().examples {
                let entry = format!(
                    "[[example]]\nname = \"{example}\"\nrequired-features = [\"{feature}\"]"
                );
                assert!(
                    herald.contains(&entry),
                    "crates/herald/Cargo.toml has no `{entry}`"
                );
            }
        }
    }

    #[test]
    fn every_target_is_logged_under_its_command_line_name() {
        for target in Target::value_variants() {
            let value = target.to_possible_value().expect("no target is skipped");
            assert_eq!(target.suite().name, value.get_name());
        }
    }
}
