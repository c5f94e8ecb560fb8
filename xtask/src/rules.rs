//! The Prometheus alert rules in docs/operations: checked and unit-tested with `promtool`.
//!
//! promtool comes from `HERALD_PROMTOOL`, the `PATH` (a 2.x: the tests are written for its range
//! windows), or a copy cached in `target/tools`. When
//! there is none, it is taken out of Debian's `prometheus` package without installing the
//! package (`apt-get download` and `dpkg-deb -x`), so no Prometheus server is set up or started
//! on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::process::{apt_get, on_path, run};

/// `2.42.0` from `promtool, version 2.42.0 (branch: ...)`.
fn promtool_version(promtool: &Path) -> Option<String> {
    let out = Command::new(promtool).arg("--version").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .map(str::to_owned)
}

fn promtool(root: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HERALD_PROMTOOL") {
        return Ok(PathBuf::from(p));
    }
    if on_path("promtool") {
        let version = promtool_version(Path::new("promtool"));
        if version.as_deref().is_some_and(|v| v.starts_with("2.")) {
            return Ok(PathBuf::from("promtool"));
        }
        // Prometheus 3 evaluates range windows left-open, which moves the expected values of
        // tests written on window edges: the tests pin 2.x (Debian's, below).
        eprintln!(
            "rules: promtool on PATH is {} (the tests expect 2.x); using Debian's",
            version.as_deref().unwrap_or("of unknown version")
        );
    }
    let cached = root.join("target/tools/promtool");
    if cached.exists() {
        return Ok(cached);
    }
    if !on_path("apt-get") || !on_path("dpkg-deb") {
        bail!("promtool is needed to test docs/operations/alerts.yml: install Prometheus's promtool, or set HERALD_PROMTOOL to it");
    }
    eprintln!("rules: fetching promtool from Debian's prometheus package (not installing it)");
    let work = root.join("target/tools/prometheus-deb");
    let _stale = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let download = || apt_get(&["download", "-q", "prometheus"], Some(&work));
    if !download() {
        // A fresh machine may have no package lists yet.
        let _updated = apt_get(&["update", "-q"], None);
        if !download() {
            bail!("could not download Debian's prometheus package for promtool (apt-get download prometheus)");
        }
    }
    let deb = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    run(
        "unpack prometheus package",
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(work.join("root")),
    )?;
    std::fs::copy(work.join("root/usr/bin/promtool"), &cached)
        .context("the prometheus package holds no usr/bin/promtool")?;
    let _stale = std::fs::remove_dir_all(&work);
    Ok(cached)
}

/// `promtool check rules` and `promtool test rules` on docs/operations.
pub(crate) fn test(root: &Path) -> Result<()> {
    let promtool = promtool(root)?;
    let ops = root.join("docs/operations");
    run(
        "alert rules check",
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(ops.join("alerts.yml")),
    )?;
    run(
        "alert rules tests",
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(ops.join("alerts.test.yml")),
    )
}
