//! A private RabbitMQ cluster on loopback for one test: three (or more)
//! nodes with their own names, AMQP and Erlang distribution ports, data,
//! logs and Erlang cookie, all under the test's folder
//! (`target/saga-rabbit/<namespace>/`), clustered with
//! `rabbitmqctl join_cluster`. The machine's own RabbitMQ is never touched:
//! the nodes share only `epmd` (where they register their names) and the
//! installed binaries, which are called directly
//! (`/usr/lib/rabbitmq/bin`: the `/usr/sbin` wrappers switch to the
//! `rabbitmq` user and its home, hence the shared cookie), with a clean
//! environment that shadows `/etc/rabbitmq/rabbitmq-env.conf`.
//!
//! Nodes are killed with SIGKILL (a crash, no goodbye to the cluster) and
//! restarted on their data, when they rejoin by themselves. Everything is
//! stopped and removed when the cluster is dropped.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::Command;

use crate::{cluster::free_port, processes::target_dir};

/// Where the installed RabbitMQ's own scripts are.
const BIN: &str = "/usr/lib/rabbitmq/bin";

/// Why the cluster could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    /// A file of a node could not be written.
    #[error("RabbitMQ cluster: cannot prepare {path}: {source}")]
    Prepare {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("RabbitMQ cluster: `{command}` on {node} failed: {output}")]
    Command {
        /// The command line (without the environment).
        command: String,
        /// The node it addressed.
        node: String,
        /// What it printed, or why it did not run.
        output: String,
    },
    /// A node's pid file is missing or unreadable.
    #[error("RabbitMQ cluster: node {node} has no readable pid file")]
    NoPid {
        /// The node.
        node: String,
    },
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct RabbitNode {
    /// Erlang node name, e.g. `t1a2b3c4d5e6f1@localhost`.
    pub name: String,
    /// Its AMQP port on 127.0.0.1.
    pub amqp_port: u16,
    /// Its Erlang distribution port.
    dist_port: u16,
    /// Its folder (config, data, logs, pid file).
    dir: PathBuf,
    /// Whether it was killed and not restarted.
    pub down: bool,
}

impl RabbitNode {
    /// Its AMQP address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.amqp_port))
    }

    /// Its AMQP URL for guest (allowed on loopback), with `heartbeat`.
    pub fn url(&self, heartbeat_secs: u16) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat={heartbeat_secs}",
            self.amqp_port
        )
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// A running private cluster (stopped and removed on drop).
#[derive(Debug)]
pub struct RabbitCluster {
    /// The nodes, in the order they were created (the first is the seed
    /// the others joined).
    pub nodes: Vec<RabbitNode>,
    /// The cluster's folder.
    dir: PathBuf,
    /// HOME of every node and CLI call (holds the private cookie).
    home: PathBuf,
}

impl RabbitCluster {
    /// Starts `size` nodes named after `namespace` and clusters them.
    /// Takes some 15-20 s on two cores.
    pub async fn start(namespace: &str, size: usize) -> Result<Self, RabbitError> {
        let dir = target_dir().join("saga-rabbit").join(namespace);
        let home = dir.join("home");
        let _ = std::fs::remove_dir_all(&dir);
        let prepare = |path: &Path, result: std::io::Result<()>| {
            result.map_err(|source| RabbitError::Prepare {
                path: path.to_owned(),
                source,
            })
        };
        prepare(&home, std::fs::create_dir_all(&home))?;
        let cookie = home.join(".erlang.cookie");
        prepare(
            &cookie,
            std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string()),
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            prepare(
                &cookie,
                std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400)),
            )?;
        }
        let mut nodes = Vec::with_capacity(size);
        for i in 1..=size {
            let node = RabbitNode {
                name: format!("{namespace}n{i}@localhost"),
                amqp_port: free_port(),
                dist_port: free_port(),
                dir: dir.join(format!("n{i}")),
                down: false,
            };
            for sub in ["etc", "data", "log"] {
                let path = node.dir.join(sub);
                prepare(&path, std::fs::create_dir_all(&path))?;
            }
            let files = [
                ("etc/rabbitmq-env.conf", String::new()),
                ("etc/enabled_plugins", "[].\n".to_owned()),
                (
                    "etc/rabbitmq.conf",
                    format!(
                        "listeners.tcp.1 = 127.0.0.1:{}\n\
                         loopback_users.guest = true\n\
                         disk_free_limit.absolute = 50MB\n\
                         vm_memory_high_watermark.absolute = 1GiB\n\
                         log.file.level = info\n\
                         log.console = false\n",
                        node.amqp_port
                    ),
                ),
            ];
            for (file, text) in files {
                let path = node.dir.join(file);
                prepare(&path, std::fs::write(&path, text))?;
            }
            nodes.push(node);
        }
        let cluster = Self { nodes, dir, home };
        let started = Instant::now();
        // The nodes boot in parallel, then join the first one by one.
        let boots: Vec<_> = (0..size).map(|i| cluster.boot(i)).collect();
        for result in futures::future::join_all(boots).await {
            result?;
        }
        let seed = cluster.nodes[0].name.clone();
        for i in 1..size {
            cluster.ctl(i, &["stop_app"]).await?;
            cluster.ctl(i, &["join_cluster", &seed]).await?;
            cluster.ctl(i, &["start_app"]).await?;
            cluster
                .ctl(i, &["await_startup", "--timeout", "120"])
                .await?;
        }
        tracing::info!(nodes = size, took = ?started.elapsed(), "private RabbitMQ cluster formed");
        Ok(cluster)
    }

    /// Every node's AMQP URL, comma-separated, starting with node `first`
    /// (so that services can be spread over the nodes).
    pub fn url_list(&self, first: usize, heartbeat_secs: u16) -> String {
        let count = self.nodes.len();
        (0..count)
            .map(|k| self.nodes[(first + k) % count].url(heartbeat_secs))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node that is up.
    pub fn live_node(&self) -> Option<usize> {
        self.nodes.iter().position(|n| !n.down)
    }

    /// SIGKILL of node `i` (its Erlang VM): a crash, no goodbye.
    pub fn kill(&mut self, i: usize) -> Result<(), RabbitError> {
        let node = &mut self.nodes[i];
        let pid = node.pid().ok_or_else(|| RabbitError::NoPid {
            node: node.name.clone(),
        })?;
        signal(pid, "-KILL");
        node.down = true;
        tracing::info!(node = %node.name, pid, "RabbitMQ node killed");
        Ok(())
    }

    /// Starts node `i` again on its data; it rejoins the cluster by itself.
    pub async fn restart(&mut self, i: usize) -> Result<(), RabbitError> {
        let _ = std::fs::remove_file(self.nodes[i].pid_file());
        self.boot(i).await?;
        self.nodes[i].down = false;
        Ok(())
    }

    /// The node leading quorum queue `queue`, as a live node sees it.
    pub async fn leader_of(&self, queue: &str) -> Result<Option<usize>, RabbitError> {
        let Some(asked) = self.live_node() else {
            return Ok(None);
        };
        let output = self
            .ctl(
                asked,
                &["list_queues", "name", "leader", "--formatter", "json"],
            )
            .await?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(output.trim()).unwrap_or_default();
        let leader = rows
            .iter()
            .find(|row| row["name"] == queue)
            .and_then(|row| row["leader"].as_str())
            .map(str::to_owned);
        Ok(leader.and_then(|leader| self.nodes.iter().position(|n| n.name == leader)))
    }

    /// Every queue with its type, leader, members and online members, as a
    /// live node prints them (for diagnostics).
    pub async fn queues(&self) -> String {
        let Some(asked) = self.live_node() else {
            return "no live node".into();
        };
        self.ctl(
            asked,
            &[
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "online",
                "messages",
            ],
        )
        .await
        .unwrap_or_else(|e| e.to_string())
    }

    /// How many nodes node `asked` sees running.
    pub async fn running_nodes(&self, asked: usize) -> Result<usize, RabbitError> {
        let output = self
            .ctl(asked, &["cluster_status", "--formatter", "json"])
            .await?;
        let status: serde_json::Value = serde_json::from_str(output.trim()).unwrap_or_default();
        Ok(status["running_nodes"].as_array().map_or(0, Vec::len))
    }

    /// Launches node `i` detached and waits until it has booted.
    async fn boot(&self, i: usize) -> Result<(), RabbitError> {
        let node = &self.nodes[i];
        let launcher = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("log/launcher.out"))
            .map_err(|source| RabbitError::Prepare {
                path: node.dir.join("log/launcher.out"),
                source,
            })?;
        let status = self
            .command(i, "rabbitmq-server")
            .arg("-detached")
            .stdout(Stdio::from(launcher.try_clone().expect("log file")))
            .stderr(Stdio::from(launcher))
            .status()
            .await
            .map_err(|e| self.failed(i, "rabbitmq-server -detached", e.to_string()))?;
        if !status.success() {
            return Err(self.failed(i, "rabbitmq-server -detached", status.to_string()));
        }
        // `wait` waits for the pid file, then for the boot to finish.
        let pid_file = node.pid_file().display().to_string();
        self.ctl(i, &["wait", &pid_file, "--timeout", "120"])
            .await?;
        Ok(())
    }

    /// `rabbitmqctl -n <node i> -q <args>`; its standard output.
    async fn ctl(&self, i: usize, args: &[&str]) -> Result<String, RabbitError> {
        let output = self
            .command(i, "rabbitmqctl")
            .arg("-n")
            .arg(&self.nodes[i].name)
            .arg("-q")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| self.failed(i, &args.join(" "), e.to_string()))?;
        if !output.status.success() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            return Err(self.failed(i, &args.join(" "), text));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn failed(&self, i: usize, command: &str, output: String) -> RabbitError {
        RabbitError::Command {
            command: command.to_owned(),
            node: self.nodes[i].name.clone(),
            output,
        }
    }

    /// A command of the installed RabbitMQ in node `i`'s clean environment.
    fn command(&self, i: usize, program: &str) -> Command {
        let node = &self.nodes[i];
        let mut command = Command::new(Path::new(BIN).join(program));
        command
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("HOME", &self.home)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env(
                "RABBITMQ_CONF_ENV_FILE",
                node.dir.join("etc/rabbitmq-env.conf"),
            )
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("etc/rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("etc/enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("data"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.pid_file())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .kill_on_drop(true);
        command
    }

    /// The cluster's folder (logs of every node under `n<i>/log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RabbitCluster {
    /// Kills every node's VM (no clean stop: the data is thrown away) and
    /// waits, bounded, until they are gone; then removes the folder.
    fn drop(&mut self) {
        let pids: Vec<i32> = self.nodes.iter().filter_map(RabbitNode::pid).collect();
        for pid in &pids {
            signal(*pid, "-KILL");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && pids.iter().any(|pid| signal(*pid, "-0")) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if std::env::var_os("SAGA_KEEP_RABBIT").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `kill <signal> <pid>` (the VMs are detached: not children of this
/// process); whether it succeeded (for `-0`: whether the process exists).
fn signal(pid: i32, signal: &str) -> bool {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
