//! Running commands for the other modules: the workspace root, `cargo`, commands run with and
//! without a time limit and logged without the values of their environment, and the two probes
//! of the machine (`on_path`, `apt_get`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root: where every command runs.
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set (relative to the current
/// folder, as cargo reads it), else the workspace's `target`. Binaries that xtask builds and
/// then runs (the `herald` command, the delaying proxy) are found there.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| root.to_path_buf());
    target_dir_from(root, std::env::var_os("CARGO_TARGET_DIR"), &cwd)
}

fn target_dir_from(root: &Path, set: Option<std::ffi::OsString>, cwd: &Path) -> PathBuf {
    match set {
        Some(dir) if !dir.is_empty() => cwd.join(dir),
        _ => root.join("target"),
    }
}

/// Whether `program` is on the PATH.
pub(crate) fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `apt-get ARGS` without questions, in `dir` if given; whether it succeeded.
pub(crate) fn apt_get(args: &[&str], dir: Option<&Path>) -> bool {
    let mut cmd = Command::new("apt-get");
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.status().is_ok_and(|s| s.success())
}

/// The cargo that runs xtask (`$CARGO`), else `cargo` from the PATH.
pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs `cmd`, logged as `what`; an error when it cannot start or does not succeed.
pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("\n==> {what}: {}", shown(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// As [`run`], but a command still running after `limit` is killed with everything it
/// started (cargo, the test binary, the brokers the tests spawned) and counts as failed: a hung
/// test must end the run with a clear error, not hold CI until its own time limit.
pub(crate) fn run_within(what: &str, cmd: &mut Command, limit: Duration) -> Result<()> {
    eprintln!(
        "\n==> {what} (time limit {} s): {}",
        limit.as_secs(),
        shown(cmd)
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start {what}"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{what} failed ({status})");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            kill_tree(&mut child);
            bail!(
                "{what} was still running after {} s and was killed (the test printed last \
                 above without a result is the one that hung; if the machine is just slow, \
                 `cargo xtask it` takes a longer limit from HERALD_IT_TIMEOUT_SECS, while \
                 `cargo xtask ci`'s own steps have fixed ones)",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills `child` and every process below it (cargo's compilers or test binaries, the brokers
/// the tests spawned), then reaps it. The tree is stopped first (`SIGSTOP`, from the top down,
/// looking again until no new process turns up), so that nothing in it starts another process
/// between the look and the kill; then everything found is killed.
pub(crate) fn kill_tree(child: &mut std::process::Child) {
    let signal = |sig: &str, pid: u32| {
        // Already gone is fine: the signal is only for what still runs.
        let _gone = Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    };
    let mut pids = vec![child.id()];
    signal("-STOP", child.id());
    for _look in 0..5 {
        let new: Vec<u32> = descendants(child.id())
            .into_iter()
            .filter(|p| !pids.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for &pid in &new {
            signal("-STOP", pid);
        }
        pids.extend(new);
    }
    for &pid in &pids {
        signal("-KILL", pid);
    }
    let _reaped = child.wait();
}

/// Every process below `pid` (children, their children, ...), from /proc; empty where there is
/// no /proc. Daemons that left the tree (a detached broker) are not included.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses, so split after
        // the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((child, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parent_of {
            if ppid == p && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}

/// A command as it may appear in a log: program and arguments, and the names of the environment
/// variables it sets but never their values (`HERALD_AMQP_URL` can hold a password); those it
/// removes are not named.
pub(crate) fn shown(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, _) in cmd.get_envs().filter(|(_, value)| value.is_some()) {
        s.push_str(&format!("{}=<set> ", key.to_string_lossy()));
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    #[test]
    fn built_binaries_are_looked_for_where_cargo_target_dir_puts_them() {
        let (root, cwd) = (Path::new("/w"), Path::new("/w/crates"));
        let at = |set: Option<&str>| super::target_dir_from(root, set.map(Into::into), cwd);
        assert_eq!(at(None), Path::new("/w/target"));
        assert_eq!(at(Some("")), Path::new("/w/target"), "empty is unset");
        assert_eq!(at(Some("/tmp/t")), Path::new("/tmp/t"));
        assert_eq!(
            at(Some("t2")),
            Path::new("/w/crates/t2"),
            "relative to the current folder"
        );
    }

    #[test]
    fn a_command_past_its_time_limit_is_killed_with_its_children() {
        let pid_file = std::env::temp_dir().join(format!("xtask-watchdog-{}", std::process::id()));
        let start = Instant::now();
        // A shell with a child of its own, as cargo runs the test binary.
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("sleep 30 & echo $! > {}; wait", pid_file.display()));
        let err = super::run_within("sleepy", &mut cmd, Duration::from_secs(1))
            .expect_err("past its limit");
        assert!(err.to_string().contains("still running after 1 s"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).expect("the shell wrote its child's pid");
        let _removed = std::fs::remove_file(&pid_file);
        // Gone, or a zombie waiting for init to reap it: not running. A SIGKILL takes effect
        // when the kernel next schedules the process, so give it a moment (a deadline, not a
        // guess: the loop ends as soon as it is down).
        let running = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()));
            stat.is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!running(), "the child {} outlived the watchdog", pid.trim());
        let mut ok = std::process::Command::new("true");
        super::run_within("quick", &mut ok, Duration::from_secs(20)).expect("within its limit");
    }

    #[test]
    fn logged_commands_never_show_environment_values() {
        let mut cmd = std::process::Command::new("cargo");
        cmd.arg("test")
            .env("HERALD_AMQP_URL", "amqp://app:s3cret@rabbit/%2f");
        let line = super::shown(&cmd);
        assert!(!line.contains("s3cret"), "{line}");
        assert!(
            line.contains("HERALD_AMQP_URL=<set>") && line.ends_with("cargo test"),
            "{line}"
        );
    }
}
