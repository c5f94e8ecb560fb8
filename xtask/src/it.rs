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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
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
    // Every binary the suites run, built once with the workspace's features: the binaries
    // `cargo test --workspace` built (in CI, the step before), not built again per package.
    let built = Built::workspace()?;
    // Found before any broker starts: a missing binary fails the run at once.
    let mut suites = Vec::new();
    for target in wanted.iter().map(|t| t.suite()) {
        let mut runs = Vec::new();
        for test in target.tests {
            runs.push((built.get(target.package, "test", test)?, None));
        }
        for (test, filter) in target.facade_tests {
            runs.push((built.get("herald", "test", test)?, Some(*filter)));
        }
        let examples = target
            .examples
            .iter()
            .map(|(example, feature)| {
                built
                    .get("herald", "example", example)
                    .with_context(|| format!("(the example requires herald's feature `{feature}`)"))
            })
            .collect::<Result<Vec<_>>>()?;
        suites.push((target, runs, examples));
    }
    for (target, runs, examples) in suites {
        eprintln!("\n==> it {}: provisioning a broker", target.name);
        let broker = (target.provision)()?;
        // `--ignored` runs nothing, and passes, where no test is marked ignored (or none matches
        // a filter): each binary must have some to run.
        let mut result = runs
            .iter()
            .try_for_each(|(bin, filter)| ignored_tests(bin, *filter).map(drop));
        for (bin, filter) in &runs {
            if result.is_err() {
                break;
            }
            let mut cmd = bin.command(&broker);
            cmd.args(["--ignored", "--test-threads=1"])
                .args(shown_skips())
                .args(*filter);
            result = run_within(
                &format!("it {}: {}", target.name, bin.what(*filter)),
                &mut cmd,
                time_limit()?,
            );
        }
        for bin in examples {
            if result.is_err() {
                break;
            }
            result = run_within(
                &format!("it {}: {}", target.name, bin.what(None)),
                &mut bin.command(&broker),
                time_limit()?,
            );
        }
        drop(broker);
        result?;
    }
    Ok(())
}

/// A test or example executable of the workspace, as `cargo test --workspace` builds it.
#[derive(Debug, Clone)]
struct Bin {
    package: String,
    /// `test` or `example`.
    kind: String,
    name: String,
    exe: PathBuf,
    /// Its package's folder: cargo runs a test there, and so does this.
    dir: PathBuf,
}

impl Bin {
    /// The executable, run in its package's folder with the broker's environment.
    fn command(&self, broker: &Broker) -> Command {
        let mut cmd = self.bare();
        cmd.envs(broker.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The executable in its package's folder, with `CARGO_MANIFEST_DIR` its package's, as
    /// `cargo test` runs it; the package variables of xtask's own run (`cargo run -p xtask`)
    /// are not passed on.
    fn bare(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.current_dir(&self.dir)
            .env("CARGO_MANIFEST_DIR", &self.dir);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || matches!(
                    &*name,
                    "CARGO_CRATE_NAME" | "CARGO_MANIFEST_PATH" | "CARGO_PRIMARY_PACKAGE"
                )
            {
                cmd.env_remove(&*name);
            }
        }
        cmd
    }

    /// How the step is named in the log: `PACKAGE --test NAME [matching FILTER]`.
    fn what(&self, filter: Option<&str>) -> String {
        format!(
            "{} --{} {}{}",
            self.package,
            self.kind,
            self.name,
            filter
                .map(|f| format!(" matching `{f}`"))
                .unwrap_or_default()
        )
    }
}

/// The workspace's test and example executables.
struct Built {
    bins: Vec<Bin>,
}

impl Built {
    /// `cargo test --workspace --no-run`: builds what is not built yet (nothing, after `cargo
    /// test --workspace`) and names every test and example executable. Selected with `-p`, a
    /// package's tests would be built again with only that package's features (36 s for
    /// herald-amqp's, 61 s for the facade's on an Intel Xeon of two cores).
    fn workspace() -> Result<Self> {
        let what = "cargo test --workspace --no-run";
        eprintln!("\n==> the real-broker tests' binaries: {what}");
        let meta = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
        let meta: serde_json::Value = serde_json::from_slice(&meta)?;
        let names: HashMap<String, String> = meta["packages"]
            .as_array()
            .context("cargo metadata: no packages")?
            .iter()
            .filter_map(|p| {
                Some((
                    p["manifest_path"].as_str()?.to_owned(),
                    p["name"].as_str()?.to_owned(),
                ))
            })
            .collect();
        let out = output(cargo().args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]))?;
        Ok(Self {
            bins: bins_of(&out, &names)?,
        })
    }

    /// `package`'s executable `name` of `kind` (`test`, `example`).
    fn get(&self, package: &str, kind: &str, name: &str) -> Result<&Bin> {
        self.bins
            .iter()
            .find(|b| b.package == package && b.kind == kind && b.name == name)
            .with_context(|| {
                format!("`cargo test --workspace` built no {kind} `{name}` of {package}")
            })
    }
}

/// The executables in cargo's JSON messages `out`, their packages named by manifest path in
/// `names`.
fn bins_of(out: &[u8], names: &HashMap<String, String>) -> Result<Vec<Bin>> {
    let mut bins = Vec::new();
    // Cargo passes on what a compiler plugin prints as lines of their own: not its messages.
    for line in out.split(|b| *b == b'\n').filter(|l| l.starts_with(b"{")) {
        let m: serde_json::Value = serde_json::from_slice(line)
            .with_context(|| format!("a message of cargo's: {}", String::from_utf8_lossy(line)))?;
        if m["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(exe), Some(manifest), Some(kind), Some(name)) = (
            m["executable"].as_str(),
            m["manifest_path"].as_str(),
            m["target"]["kind"][0].as_str(),
            m["target"]["name"].as_str(),
        ) else {
            continue;
        };
        let package = names
            .get(manifest)
            .with_context(|| format!("cargo named no package at {manifest}"))?;
        bins.push(Bin {
            package: package.clone(),
            kind: kind.to_owned(),
            name: name.to_owned(),
            exe: PathBuf::from(exe),
            dir: Path::new(manifest)
                .parent()
                .context("a manifest's folder")?
                .to_owned(),
        });
    }
    Ok(bins)
}

/// The standard output of `cmd`, its errors shown; an error when it fails.
fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {}", crate::process::shown(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({})", crate::process::shown(cmd), out.status);
    }
    Ok(out.stdout)
}

/// How many ignored tests `bin` has (matching `filter`); none is an error.
fn ignored_tests(bin: &Bin, filter: Option<&str>) -> Result<usize> {
    let what = format!("the real-broker tests of {}", bin.what(filter));
    eprintln!("\n==> listing {what}");
    let mut cmd = bin.bare();
    cmd.args(["--ignored", "--list"]).args(filter);
    let n = String::from_utf8_lossy(&output(&mut cmd)?)
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
/// two to three). Their binaries are built before, outside the limit, by [`Built::workspace`].
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
    fn executables_are_read_from_cargo_s_messages_with_their_package_and_folder() {
        let names = std::collections::HashMap::from([(
            "/w/crates/herald-redis/Cargo.toml".to_owned(),
            "herald-redis".to_owned(),
        )]);
        let out = concat!(
            r#"{"reason":"compiler-artifact","manifest_path":"/w/crates/herald-redis/Cargo.toml","target":{"kind":["lib"],"name":"herald_redis"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","manifest_path":"/w/crates/herald-redis/Cargo.toml","target":{"kind":["test"],"name":"it"},"executable":"/w/target/debug/deps/it-0123"}"#,
            "\n",
            "a line a proc macro printed\n",
            r#"{"reason":"compiler-artifact","manifest_path":"/w/crates/herald-redis/Cargo.toml","target":{"kind":["example"],"name":"demo"},"executable":"/w/target/debug/examples/demo"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
            "\n",
        );
        let bins = super::bins_of(out.as_bytes(), &names).expect("parsed");
        assert_eq!(bins.len(), 2, "{bins:?}");
        assert_eq!(
            (bins[1].kind.as_str(), bins[1].name.as_str()),
            ("example", "demo")
        );
        let bin = &bins[0];
        assert_eq!(
            (bin.package.as_str(), bin.kind.as_str(), bin.name.as_str()),
            ("herald-redis", "test", "it")
        );
        assert_eq!(
            bin.exe,
            std::path::Path::new("/w/target/debug/deps/it-0123")
        );
        assert_eq!(bin.dir, std::path::Path::new("/w/crates/herald-redis"));
        assert_eq!(bin.what(Some("x_")), "herald-redis --test it matching `x_`");
        // A package cargo did not name is an error, not a test left out.
        let unknown = out.replace("herald-redis/Cargo.toml", "other/Cargo.toml");
        assert!(super::bins_of(unknown.as_bytes(), &names).is_err());
    }

    #[test]
    fn every_target_is_logged_under_its_command_line_name() {
        for target in Target::value_variants() {
            let value = target.to_possible_value().expect("no target is skipped");
            assert_eq!(target.suite().name, value.get_name());
        }
    }
}
