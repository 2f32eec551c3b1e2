//! The systems under comparison, behind one interface: a job is described once ([`JobDef`]) and
//! each system runs it its own way (Keel: a YAML spec and `keel` verbs; Flink: the SQL of seed
//! 002 through its SQL client and REST API).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

use keel_bench::cluster::{Cluster, ClusterOptions};
use keel_bench::workload::JobKind;

/// How long a job may take to start, stop or finish.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// One job, as every system runs it.
#[derive(Debug, Clone)]
pub struct JobDef {
    /// Unique per run: the job's name, its consumer group and its transactional-id prefix.
    pub name: String,
    pub kind: JobKind,
    pub parallelism: u32,
    /// Exactly-once sink (Kafka transactions committed with the checkpoint); else at-least-once.
    pub exactly_once: bool,
    pub input: String,
    pub output: String,
    pub bootstrap: String,
}

/// A system that runs [`JobDef`]s.
pub trait Peer {
    /// Its name in the table (`Keel`, `Flink`, `Flink (heartbeat 1 s / 5 s)`).
    fn label(&self) -> String;
    /// Submits the job; returns once it runs.
    fn submit(&mut self, job: &JobDef) -> anyhow::Result<()>;
    /// Cancels the job; returns once it is gone.
    fn cancel(&mut self, job: &JobDef) -> anyhow::Result<()>;
    /// Process ids of the workers (TaskManagers), alive now.
    fn worker_pids(&self) -> Vec<u32>;
    /// Process id of the leading master (JobManager).
    fn leader_pid(&self) -> anyhow::Result<u32>;
    /// The process id of the worker running (the first subtask of) the job.
    fn worker_of(&self, job: &JobDef) -> anyhow::Result<u32>;
    /// SIGKILL to one of the system's processes (found with [`Peer::worker_of`] or
    /// [`Peer::leader_pid`] beforehand, so that the event is the kill alone).
    fn kill(&mut self, pid: u32) -> anyhow::Result<()>;
    /// Waits until a master other than `old_leader` leads and the job runs in full under it.
    fn wait_new_leader_running(&self, job: &JobDef, old_leader: u32) -> anyhow::Result<()>;
    /// Starts again whatever was killed and waits until it has joined the cluster.
    fn heal(&mut self) -> anyhow::Result<()>;
    /// Replaces the running `old` job by `new` the system's own way (Keel: `keel upgrade` or
    /// `keel rescale`, a handover; Flink: stop-with-savepoint, then the new job from it);
    /// returns once the new one runs.
    fn upgrade(&mut self, old: &JobDef, new: &JobDef) -> anyhow::Result<()>;
    /// Runs `rows` rows of generated data into a blackhole sink at parallelism 1 with 1 s
    /// checkpoints, to the end.
    fn datagen(&mut self, name: &str, rows: u64) -> anyhow::Result<()>;
}

/// The Keel job spec of a [`JobDef`]; `extra` are further options of its source
/// (`properties.queued.min.messages: 1000`, ...), for experiments.
pub fn keel_spec(job: &JobDef, version_note: Option<&str>, extra: &[(String, String)]) -> String {
    let (format, transform) = match job.kind {
        JobKind::PassThrough => ("csv", String::new()),
        JobKind::FilterProjection => {
            ("json", "    filter: \"age >= 18\"\n    select: [id, name]\n".to_string())
        }
    };
    let guarantee = if job.exactly_once {
        format!("    sink.delivery-guarantee: exactly-once\n    sink.transactional-id-prefix: {}\n", job.name)
    } else {
        "    sink.delivery-guarantee: at-least-once\n".to_string()
    };
    // An upgrade needs a changed spec; a client id is a change that does not alter the data.
    let mut client_id = version_note.map(|v| format!("    properties.client.id: {v}\n")).unwrap_or_default();
    for (k, v) in extra {
        client_id.push_str(&format!("    {k}: {v}\n"));
    }
    format!(
        "name: {name}\nparallelism: {p}\nconfig:\n  execution.checkpointing.interval: 1 s\nsources:\n  - name: src\n    \
         connector: kafka\n    topic: {input}\n    properties.bootstrap.servers: {bootstrap}\n    \
         properties.group.id: {name}\n    scan.startup.mode: earliest-offset\n    format: {format}\n{client_id}    \
         columns:\n      - {{name: id, type: INT}}\n      - {{name: name, type: STRING}}\n      - {{name: age, type: INT}}\n\
         sinks:\n  - name: sink\n    connector: kafka\n    from: src\n{transform}    topic: {output}\n    \
         properties.bootstrap.servers: {bootstrap}\n    format: {format}\n{guarantee}",
        name = job.name,
        p = job.parallelism,
        input = job.input,
        output = job.output,
        bootstrap = job.bootstrap,
    )
}

/// Keel: etcd, one ResourceManager, two JobManagers (leader and standby), two TaskManagers
/// with two slots each, all of Keel's defaults.
pub struct KeelPeer {
    pub cluster: Cluster,
    dir: PathBuf,
    /// The version note of each job's current spec (changed by every upgrade).
    versions: std::collections::HashMap<String, u32>,
    /// Further source options for every job (`--keel-source-option`).
    pub source_options: Vec<(String, String)>,
}

impl KeelPeer {
    pub fn start(keel: &Path, etcd: &Path, dir: &Path) -> anyhow::Result<KeelPeer> {
        let options = ClusterOptions {
            jobmanagers: 2,
            task_managers: 2,
            slots: 2,
            etcd: Some(etcd.to_path_buf()),
            extra: Vec::new(),
        };
        let cluster = Cluster::start_with(keel, dir, &options)?;
        Ok(KeelPeer {
            cluster,
            dir: dir.to_path_buf(),
            versions: Default::default(),
            source_options: Vec::new(),
        })
    }

    fn write_spec(&self, name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn wait_state(&self, job: &str, want: &[&str], timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let status = self.cluster.status(job);
            if let Ok(s) = &status {
                let state = s["job"]["state"].as_str().unwrap_or_default();
                if want.contains(&state) {
                    return Ok(s.clone());
                }
                if state == "failed" {
                    bail!("job {job} failed: {}", s["status_message"]);
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("job {job} was not {want:?} within {timeout:?}: {status:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every task of the job runs.
    fn wait_all_running(&self, job: &str, tasks: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + JOB_TIMEOUT;
        loop {
            let s = self.wait_state(job, &["running"], JOB_TIMEOUT)?;
            let running = s["tasks"]
                .as_array()
                .map(|t| t.iter().filter(|t| t["state"] == "running").count())
                .unwrap_or_default();
            if running >= tasks {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("job {job}: {running} of {tasks} tasks running after {JOB_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn keel_ok(&self, args: &[&str]) -> anyhow::Result<()> {
        self.cluster.keel_json(args).map(|_| ())
    }
}

impl Peer for KeelPeer {
    fn label(&self) -> String {
        "Keel".into()
    }

    fn submit(&mut self, job: &JobDef) -> anyhow::Result<()> {
        let spec = self.write_spec(&job.name, &keel_spec(job, None, &self.source_options))?;
        self.cluster.run(&spec)?;
        self.versions.insert(job.name.clone(), 1);
        self.wait_all_running(&job.name, job.parallelism as usize)
    }

    fn cancel(&mut self, job: &JobDef) -> anyhow::Result<()> {
        self.cluster.cancel(&job.name)
    }

    fn worker_pids(&self) -> Vec<u32> {
        self.cluster.pids("tm")
    }

    fn leader_pid(&self) -> anyhow::Result<u32> {
        self.cluster.pid_of(&self.cluster.jobmanager_leader()?)
    }

    fn worker_of(&self, job: &JobDef) -> anyhow::Result<u32> {
        let tms = self.cluster.taskmanagers_of(&job.name)?;
        let victim = tms.first().ok_or_else(|| anyhow!("no TaskManager runs a task of {}", job.name))?;
        self.cluster.pid_of(victim)
    }

    fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        self.cluster.kill_pid(pid)
    }

    fn wait_new_leader_running(&self, job: &JobDef, old_leader: u32) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + JOB_TIMEOUT;
        loop {
            let leader = self.leader_pid().ok();
            if leader.is_some_and(|l| l != old_leader) {
                let s = self.cluster.status(&job.name)?;
                let running = s["tasks"]
                    .as_array()
                    .map(|t| t.iter().filter(|t| t["state"] == "running").count())
                    .unwrap_or_default();
                if s["job"]["state"] == "running" && running >= job.parallelism as usize {
                    return Ok(());
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("no new JobManager leader ran {} within {JOB_TIMEOUT:?}", job.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn heal(&mut self) -> anyhow::Result<()> {
        self.cluster.restart_exited()?;
        let want = self.cluster.pids("tm").len();
        let deadline = std::time::Instant::now() + JOB_TIMEOUT;
        loop {
            let c = self.cluster.keel_json(&["cluster"]);
            let registered = c.as_ref().ok().and_then(|c| c["taskmanagers"].as_array().map(Vec::len));
            let leader = c.as_ref().ok().and_then(|c| c["jobmanager"]["leader"].as_str().map(str::to_string));
            if registered == Some(want) && leader.is_some_and(|l| !l.is_empty()) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the cluster did not show {want} TaskManagers and a leader within {JOB_TIMEOUT:?}: {c:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn upgrade(&mut self, old: &JobDef, new: &JobDef) -> anyhow::Result<()> {
        let version = self.versions.get(&old.name).copied().unwrap_or(1) + 1;
        if new.parallelism != old.parallelism && new.kind == old.kind && new.output == old.output {
            let p = new.parallelism.to_string();
            self.keel_ok(&["rescale", "--parallelism", &p, &old.name])?;
        } else {
            let note = format!("{}-v{version}", new.name);
            let spec = self.write_spec(
                &format!("{}-v{version}", new.name),
                &keel_spec(new, Some(&note), &self.source_options),
            )?;
            let path = spec.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", spec.display()))?;
            self.keel_ok(&["upgrade", &old.name, path])?;
        }
        self.versions.insert(new.name.clone(), version);
        self.wait_all_running(&new.name, new.parallelism as usize)
    }

    fn datagen(&mut self, name: &str, rows: u64) -> anyhow::Result<()> {
        let yaml = format!(
            "name: {name}\nparallelism: 1\nconfig:\n  execution.checkpointing.interval: 1 s\nsources:\n  - name: gen\n    \
             connector: datagen\n    rows-per-second: 1000000000\n    number-of-rows: {rows}\nsinks:\n  - name: out\n    \
             connector: blackhole\n    from: gen\n"
        );
        let spec = self.write_spec(name, &yaml)?;
        self.cluster.run(&spec)?;
        self.wait_state(name, &["finished"], JOB_TIMEOUT)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: JobKind, exactly_once: bool) -> JobDef {
        JobDef {
            name: "j1".into(),
            kind,
            parallelism: 2,
            exactly_once,
            input: "in".into(),
            output: "out".into(),
            bootstrap: "127.0.0.1:9092".into(),
        }
    }

    /// The specs the benchmark submits pass Keel's own spec validation (so a run does not
    /// fail on a typo after minutes of set-up), and say what the job does.
    #[test]
    fn keel_specs_parse_and_say_what_the_job_does() {
        for kind in JobKind::ALL {
            for eos in [false, true] {
                for note in [None, Some("v2")] {
                    let extra = [("properties.queued.min.messages".to_string(), "1000".to_string())];
                    let yaml = keel_spec(&job(kind, eos), note, &extra);
                    let spec = keel_spec::JobSpec::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
                    assert_eq!(spec.parallelism, 2, "{yaml}");
                    assert_eq!(spec.sinks[0].filter.is_some(), kind == JobKind::FilterProjection, "{yaml}");
                    assert!(yaml.contains(if eos { "exactly-once" } else { "at-least-once" }), "{yaml}");
                }
            }
        }
    }
}
