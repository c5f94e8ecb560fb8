//! A RabbitMQ node of a test's own, from this machine's `rabbitmq-server` (Debian's package):
//! its own node name, free ports, folders and config file; stopped and removed on drop. The
//! machine's shared RabbitMQ (5672, also used by CI) is never stopped or reconfigured.
//!
//! A test that cannot run here (no `rabbitmq-server`) fails, saying what is missing, unless
//! `HERALD_IT_ALLOW_SKIP=1`: see [`cannot_run`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tokio::time::Instant;

use super::wait_for;

/// Why a test needing a node of its own cannot run on a machine without `rabbitmq-server`.
pub(crate) const NO_RABBITMQ_SERVER: &str = "no rabbitmq-server on this machine to start a \
     RabbitMQ node of its own (the shared broker is never restarted or reconfigured)";

/// A free port on 127.0.0.1 (bound, then released).
pub(crate) fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports on 127.0.0.1, all bound at once (so none is handed out twice), then
/// released. Never in 35672–35682, where `rabbitmqctl` binds its own distribution port.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("a bound port").port();
        if !(35672..=35682).contains(&port) {
            held.push(listener);
        }
    }
    held.iter()
        .map(|l| l.local_addr().expect("a bound port").port())
        .collect()
}

/// `test` cannot run here (`why`): it fails, saying so, unless `HERALD_IT_ALLOW_SKIP=1`
/// allows skipping, when it prints `SKIPPED: <test>: <why>` and the caller returns. Never a
/// silent pass: a test that did not run must not look like one that did.
pub(crate) fn cannot_run(test: &str, why: &str) {
    if std::env::var("HERALD_IT_ALLOW_SKIP").as_deref() == Ok("1") {
        println!("SKIPPED: {test}: {why}");
    } else {
        panic!(
            "{test} cannot run: {why}. Install what is missing (Debian: `apt-get install \
             rabbitmq-server openssl`), or set HERALD_IT_ALLOW_SKIP=1 to skip this test, \
             reported as `SKIPPED: {test}: ...`"
        );
    }
}

/// Whether `program` is installed here: on the `PATH`, or at `also`. Looked up, not run
/// (`rabbitmq-server` with an unknown argument may start a node).
pub(crate) fn on_this_machine(program: &str, also: &str) -> bool {
    Path::new(also).is_file()
        || std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Whether this machine has `rabbitmq-server` (and with it `rabbitmqctl`).
pub(crate) fn has_rabbitmq_server() -> bool {
    on_this_machine("rabbitmq-server", "/usr/sbin/rabbitmq-server")
}

/// A RabbitMQ node of our own, on free ports, stopped and removed on drop. The shared broker is
/// never touched.
pub(crate) struct OwnNode {
    name: String,
    port: u16,
    /// The node's folder: data, logs, config and pid file, and whatever a test puts there for
    /// the config to name.
    pub(crate) dir: PathBuf,
    env: Vec<(String, String)>,
}

impl OwnNode {
    /// Starts one for `test`, or `None` if this machine has no `rabbitmq-server` and
    /// `HERALD_IT_ALLOW_SKIP=1` (see [`cannot_run`]; without it, the test fails).
    pub(crate) async fn start(test: &str) -> Option<Self> {
        Self::start_with(test, |_| String::new()).await
    }

    /// As [`OwnNode::start`], with extra `rabbitmq.conf` lines made from the node's folder
    /// (where files the config names can be put first).
    pub(crate) async fn start_with(
        test: &str,
        extra: impl FnOnce(&Path) -> String,
    ) -> Option<Self> {
        if !has_rabbitmq_server() {
            cannot_run(test, NO_RABBITMQ_SERVER);
            return None;
        }
        let ports = free_ports(2);
        let (port, dist) = (ports[0], ports[1]);
        let name = format!("herald-it-{}-{port}", std::process::id());
        let node = Self::prepare(name, port, dist, extra).unwrap_or_else(|e| panic!("{e}"));
        node.boot().await;
        Some(node)
    }

    /// A node named `name` (`NAME` or `NAME@HOST`) listening for AMQP on 127.0.0.1:`port` and
    /// for other nodes and `rabbitmqctl` on `dist`: its folder and files made, not started yet
    /// ([`OwnNode::launch`]). `extra` gives more `rabbitmq.conf` lines, made from the folder.
    pub(crate) fn prepare(
        name: String,
        port: u16,
        dist: u16,
        extra: impl FnOnce(&Path) -> String,
    ) -> Result<Self, String> {
        let folder = name.split('@').next().unwrap_or(&name);
        let dir = std::env::temp_dir().join(folder);
        let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let env = vec![
            ("RABBITMQ_NODENAME".into(), name.clone()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
            ("RABBITMQ_MNESIA_BASE".into(), d("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), d("log")),
            ("RABBITMQ_PID_FILE".into(), d("node.pid")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE".into(), d("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE".into(), d("rabbitmq.conf")),
        ];
        // Made before the folder, so that a failure below still removes it (on drop).
        let node = Self {
            name,
            port,
            dir,
            env,
        };
        let dir = &node.dir;
        let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
        let _stale = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("mnesia")).map_err(|e| io("mkdir mnesia", e))?;
        std::fs::create_dir_all(dir.join("log")).map_err(|e| io("mkdir log", e))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n").map_err(|e| io("plugins file", e))?;
        // Our own config file: the machine's may pin the listener to the shared broker's port.
        let extra = extra(dir);
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{extra}"),
        )
        .map_err(|e| io("config file", e))?;
        let chowned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !chowned {
            return Err(format!("chown of {} to rabbitmq failed", dir.display()));
        }
        Ok(node)
    }

    /// The node's name, as given to [`OwnNode::prepare`].
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its AMQP port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2F", self.port)
    }

    /// `rabbitmq-server -detached`, not waiting for the node to answer.
    pub(crate) fn launch(&self) -> Result<(), String> {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .status()
            .map_err(|e| format!("running rabbitmq-server for {}: {e}", self.name))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "rabbitmq-server -detached for {}: {status}{}",
                self.name,
                self.log_tail()
            ))
        }
    }

    /// Whether an AMQP connection to the node opens within 5 s (a node still booting may
    /// accept TCP and not answer yet).
    pub(crate) async fn answers_amqp(&self) -> bool {
        let url = self.url();
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(&url, ConnectionProperties::default()),
        );
        if let Ok(Ok(c)) = attempt.await {
            let _closed =
                tokio::time::timeout(Duration::from_secs(5), c.close(200, "OK".into())).await;
            true
        } else {
            false
        }
    }

    /// Waits until the node answers AMQP, at most `within`.
    pub(crate) async fn wait_amqp(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if self.answers_amqp().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "own node {} did not accept AMQP within {} s (logs in {}){}",
                    self.name,
                    within.as_secs(),
                    self.dir.join("log").display(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(crate) async fn boot(&self) {
        self.launch().unwrap_or_else(|e| panic!("{e}"));
        self.wait_amqp(Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// `rabbitmqctl -n NODE ARGS`, given at most 60 s (its own `--timeout`): its output, or
    /// what went wrong.
    pub(crate) fn ctl_output(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.name, "--timeout", "60"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .map_err(|e| format!("running rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl -n {} {}: {}: {} {}",
                self.name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    /// `rabbitmqctl -n NODE ARGS`, given at most 60 s (its own `--timeout`): whether it worked.
    pub(crate) fn ctl(&self, args: &[&str]) -> bool {
        self.ctl_output(args).is_ok()
    }

    /// The OS pid of the node's VM, if it runs: the one in its pid file, else found among the
    /// processes. Only ever a `rabbit` VM started with this node's name (a stale pid file may
    /// name a pid reused by something else).
    pub(crate) fn vm_pid(&self) -> Option<u32> {
        let from_file = std::fs::read_to_string(self.dir.join("node.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .filter(|&pid| self.is_our_vm(pid));
        from_file.or_else(|| {
            std::fs::read_dir("/proc")
                .ok()?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .find(|&pid| self.is_our_vm(pid))
        })
    }

    /// Whether `pid` is a live (not zombie) RabbitMQ VM with this node's name.
    fn is_our_vm(&self, pid: u32) -> bool {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let Ok(cmdline) = std::fs::read(proc.join("cmdline")) else {
            return false;
        };
        let Ok(environ) = std::fs::read(proc.join("environ")) else {
            return false;
        };
        let zombie = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        let mut environ_entries = vec![0u8];
        environ_entries.extend_from_slice(&environ);
        let own_name = format!("\0RABBITMQ_NODENAME={}\0", self.name);
        !zombie
            && contains(&cmdline, b"\0rabbit\0boot\0")
            && contains(&environ_entries, own_name.as_bytes())
    }

    /// Kills the node's VM with SIGKILL if it runs (see [`OwnNode::vm_pid`]): whether there was
    /// one to kill.
    pub(crate) fn kill(&self) -> bool {
        let Some(pid) = self.vm_pid() else {
            return false;
        };
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether something accepts TCP on the node's AMQP port.
    pub(crate) fn port_open(&self) -> bool {
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        )
        .is_ok()
    }

    /// Waits until the node's VM is gone and its AMQP port closed, at most `within`.
    pub(crate) async fn wait_down(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while self.vm_pid().is_some() || self.port_open() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "own node {} still runs {} s after it was stopped",
                    self.name,
                    within.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The last lines of the node's log, to put in an error message (empty without a log).
    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&self.name) && n.ends_with(".log") && !n.contains("upgrade")
                })
            });
        let Some(text) = log.and_then(|p| std::fs::read_to_string(p).ok()) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        format!("\n--- last lines of {}'s log ---\n{tail}", self.name)
    }

    /// Stops the node (`rabbitmqctl stop`) and waits until its AMQP port is closed; [`OwnNode::boot`]
    /// starts it again.
    pub(crate) async fn stop(&self) {
        assert!(self.ctl(&["stop"]), "rabbitmqctl stop of own node");
        let port = self.port;
        wait_for(
            Duration::from_secs(30),
            "the stopped node to free its port",
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        )
        .await;
    }

    pub(crate) async fn restart(&self) {
        self.stop().await;
        self.boot().await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Drop for OwnNode {
    /// Stops the node (`rabbitmqctl stop`, SIGKILL if that fails or it lingers), waits for its
    /// VM to be gone, and removes its folder: also after a kill, or a start that failed halfway.
    fn drop(&mut self) {
        let gone_within = |within: Duration| {
            let deadline = std::time::Instant::now() + within;
            while self.vm_pid().is_some() {
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            true
        };
        if (self.vm_pid().is_some() || self.port_open()) && !self.ctl(&["stop"]) {
            self.kill();
        }
        if !gone_within(Duration::from_secs(30)) {
            self.kill();
            if !gone_within(Duration::from_secs(10)) {
                eprintln!(
                    "own node {} survived SIGKILL: {} is left",
                    self.name,
                    self.dir.display()
                );
                return;
            }
        }
        let _removed = std::fs::remove_dir_all(&self.dir);
    }
}
