//! A RabbitMQ cluster of a test's own: `n` [`OwnNode`]s of this machine's `rabbitmq-server`,
//! each on its own free ports and folders, joined into one cluster; every node stopped and its
//! folder removed on drop, whatever happened. The machine's shared RabbitMQ is never touched.
//!
//! Nodes are numbered from 0 (the cluster's first node, the one the others join). They share
//! the `rabbitmq` user's Erlang cookie (`rabbitmq-server` run as root switches to that user),
//! which is what lets them join.
//!
//! Every wait has a deadline; none is a fixed sleep.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use super::node::{cannot_run, free_ports, has_rabbitmq_server, OwnNode, NO_RABBITMQ_SERVER};

/// How long a node may take to boot (or come back) and be running in the cluster.
const BOOT: Duration = Duration::from_secs(90);
/// How long a stopped or killed node's VM may take to be gone and its port closed.
const DOWN: Duration = Duration::from_secs(60);

/// Why a cluster, or a node of it, is not what was asked for.
#[derive(Debug)]
pub(crate) enum ClusterError {
    /// This machine cannot run one: no `rabbitmq-server`. Tests fail on it unless
    /// `HERALD_IT_ALLOW_SKIP=1` (see [`RabbitCluster::start_or_skip`]).
    Unavailable(String),
    /// A node did not boot, join, stop or come back in time; the message says which and how,
    /// with the end of its log when there is one.
    Failed(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Unavailable(why) => write!(f, "no RabbitMQ cluster here: {why}"),
            ClusterError::Failed(why) => write!(f, "RabbitMQ cluster: {why}"),
        }
    }
}

impl std::error::Error for ClusterError {}

fn failed(why: String) -> ClusterError {
    ClusterError::Failed(why)
}

/// A RabbitMQ cluster of `n` nodes of our own on this machine, gone on drop.
pub(crate) struct RabbitCluster {
    nodes: Vec<OwnNode>,
    /// Which nodes should run: false from [`RabbitCluster::kill`] or [`RabbitCluster::stop`]
    /// until [`RabbitCluster::start_node`].
    up: Vec<bool>,
}

impl RabbitCluster {
    /// Starts `n` nodes and joins nodes 1.. to node 0; returns once every node answers AMQP and
    /// sees all `n` running in its cluster (about 25 s for three).
    pub(crate) async fn start(n: usize) -> Result<Self, ClusterError> {
        if n == 0 {
            return Err(failed("a cluster needs at least one node".into()));
        }
        if !has_rabbitmq_server() {
            return Err(ClusterError::Unavailable(NO_RABBITMQ_SERVER.into()));
        }
        let ports = free_ports(2 * n);
        // Built node by node: whatever fails below, drop stops what was started.
        let mut cluster = Self {
            nodes: Vec::with_capacity(n),
            up: Vec::with_capacity(n),
        };
        for (k, pair) in ports.chunks(2).enumerate() {
            let (port, dist) = (pair[0], pair[1]);
            let name = format!("herald-cluster-{}-{k}-{port}@localhost", std::process::id());
            let node = OwnNode::prepare(name, port, dist, |_| String::new()).map_err(failed)?;
            cluster.nodes.push(node);
            cluster.up.push(false);
        }
        // All booting at once; joined one after the other.
        for k in 0..n {
            cluster.nodes[k].launch().map_err(failed)?;
            cluster.up[k] = true;
        }
        for node in &cluster.nodes {
            node.wait_amqp(BOOT).await.map_err(failed)?;
        }
        let first = cluster.nodes[0].name().to_owned();
        for node in &cluster.nodes[1..] {
            for args in [
                &["stop_app"][..],
                &["join_cluster", first.as_str()],
                &["start_app"],
            ] {
                node.ctl_output(args)
                    .map_err(|e| failed(format!("{e}{}", node.log_tail())))?;
            }
        }
        for k in 0..n {
            cluster.wait_running(k).await?;
        }
        Ok(cluster)
    }

    /// [`RabbitCluster::start`] for `test`, with it.rs's rule when this machine has no
    /// `rabbitmq-server`: the test fails, saying so, unless `HERALD_IT_ALLOW_SKIP=1`, when this
    /// prints `SKIPPED: <test>: <why>` and gives `None` (the test returns). Any other failure
    /// fails the test.
    pub(crate) async fn start_or_skip(test: &str, n: usize) -> Option<Self> {
        match Self::start(n).await {
            Ok(cluster) => Some(cluster),
            Err(ClusterError::Unavailable(why)) => {
                cannot_run(test, &why);
                None
            }
            Err(e) => panic!("{test}: {e}"),
        }
    }

    /// How many nodes the cluster has (running or not).
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Every node's URL, `amqp://guest:guest@127.0.0.1:PORT/%2f`, in node order (guest may only
    /// log in from localhost, which this is).
    pub(crate) fn urls(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.url(i)).collect()
    }

    /// Node `i`'s URL (see [`RabbitCluster::urls`]).
    pub(crate) fn url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port(i))
    }

    /// Node `i`'s AMQP port on 127.0.0.1.
    pub(crate) fn port(&self, i: usize) -> u16 {
        self.nodes[i].port()
    }

    /// Node `i`'s Erlang node name (`NAME@localhost`).
    pub(crate) fn node_name(&self, i: usize) -> &str {
        self.nodes[i].name()
    }

    /// `rabbitmqctl -n NODE ARGS` on node `i` (at most 60 s): its output.
    pub(crate) fn ctl(&self, i: usize, args: &[&str]) -> Result<String, ClusterError> {
        self.nodes[i].ctl_output(args).map_err(failed)
    }

    /// Kills node `i`'s VM with SIGKILL (its OS pid from its `RABBITMQ_PID_FILE`), as a crash
    /// would; returns once the VM is gone and its AMQP port closed. [`RabbitCluster::start_node`]
    /// brings it back with the same data.
    pub(crate) async fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        if !node.kill() {
            return Err(failed(format!(
                "node {i} ({}) has no running VM to kill",
                node.name()
            )));
        }
        self.up[i] = false;
        node.wait_down(DOWN).await.map_err(failed)
    }

    /// Stops node `i` gracefully (`rabbitmqctl stop`); returns once its VM is gone and its AMQP
    /// port closed.
    pub(crate) async fn stop(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        node.ctl_output(&["stop"]).map_err(failed)?;
        self.up[i] = false;
        node.wait_down(DOWN).await.map_err(failed)
    }

    /// Starts node `i` again after [`RabbitCluster::kill`] or [`RabbitCluster::stop`] (not
    /// `start`: [`RabbitCluster::start`] makes the cluster), with the same folders, so the same
    /// data and cluster membership; returns once it answers AMQP and is back in the
    /// cluster (see [`RabbitCluster::wait_running`]).
    pub(crate) async fn start_node(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        if node.vm_pid().is_some() {
            return Err(failed(format!(
                "node {i} ({}) is running already",
                node.name()
            )));
        }
        node.launch().map_err(failed)?;
        self.up[i] = true;
        self.wait_running(i).await
    }

    /// Waits (at most 90 s) until node `i` answers AMQP and is running in the cluster: the
    /// nodes running by its own account include every node that should be running.
    pub(crate) async fn wait_running(&self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        let deadline = Instant::now() + BOOT;
        node.wait_amqp(BOOT).await.map_err(failed)?;
        let expected: Vec<&str> = (0..self.len())
            .filter(|&k| self.up[k])
            .map(|k| self.node_name(k))
            .collect();
        loop {
            let seen = node.ctl_output(&["cluster_status", "--formatter", "json"]);
            let running = seen.as_deref().map(running_nodes);
            match &running {
                Ok(running) if expected.iter().all(|e| running.iter().any(|r| r == e)) => {
                    return Ok(());
                }
                _ if Instant::now() >= deadline => {
                    return Err(failed(format!(
                        "node {i} ({}) not running in the cluster within {} s: running nodes \
                         {running:?}, expected {expected:?}{}",
                        node.name(),
                        BOOT.as_secs(),
                        node.log_tail()
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// The `running_nodes` of `rabbitmqctl cluster_status --formatter json`.
fn running_nodes(status: &str) -> Vec<String> {
    const KEY: &str = "\"running_nodes\":[";
    let Some(start) = status.find(KEY).map(|at| at + KEY.len()) else {
        return Vec::new();
    };
    let list = &status[start..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    list.split(',')
        .map(|n| n.trim().trim_matches('"').to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

impl Drop for RabbitCluster {
    /// Stops every node at once (each as [`OwnNode`]'s drop does: `rabbitmqctl stop`, SIGKILL
    /// if need be) and removes its folder, also for nodes killed or never started.
    fn drop(&mut self) {
        let nodes = std::mem::take(&mut self.nodes);
        std::thread::scope(|s| {
            for node in nodes {
                s.spawn(move || drop(node));
            }
        });
    }
}
