//! Apache Flink as a [`Peer`]: a standalone session cluster (ZooKeeper HA with a standby
//! JobManager, two TaskManagers with two slots each) running the jobs as the SQL of seed 002.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

pub use keel_bench::flink::{install, FlinkHome};
use keel_bench::flink::{FlinkCluster, FlinkOptions};
use keel_bench::workload::JobKind;

use crate::peers::{JobDef, Peer, JOB_TIMEOUT};

/// The label of Flink with its own defaults.
pub const LABEL: &str = "Flink";

/// The SQL of a job: seed 002 Example 1 for the pass-through (its columns, CSV), the filter +
/// projection in JSON, with the bootstrap servers, group id, start offsets and delivery
/// guarantee filled in. `savepoint`: restore from it.
pub fn sql(job: &JobDef, savepoint: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!("SET 'pipeline.name' = '{}';\n", job.name));
    s.push_str(&format!("SET 'parallelism.default' = '{}';\n", job.parallelism));
    s.push_str("SET 'execution.checkpointing.interval' = '1s';\n");
    if let Some(path) = savepoint {
        s.push_str(&format!("SET 'execution.savepoint.path' = '{path}';\n"));
    }
    let format = match job.kind {
        JobKind::PassThrough => "csv",
        JobKind::FilterProjection => "json",
    };
    // Flink's Kafka sink asks for 1 h transactions, which a broker refuses with its default
    // `transaction.max.timeout.ms` (15 min): Flink's documentation tells users to lower it. 15
    // minutes is what Keel's sink uses by default.
    let guarantee = if job.exactly_once {
        format!(
            ",\n  'sink.delivery-guarantee' = 'exactly-once',\n  'sink.transactional-id-prefix' = '{}',\n  \
             'properties.transaction.timeout.ms' = '900000'",
            job.name
        )
    } else {
        ",\n  'sink.delivery-guarantee' = 'at-least-once'".to_string()
    };
    let (sink_columns, select) = match job.kind {
        JobKind::PassThrough => {
            ("  id INT,\n  name STRING,\n  age INT\n", "SELECT id, name, age FROM kafka_source")
        }
        JobKind::FilterProjection => {
            ("  id INT,\n  name STRING\n", "SELECT id, name FROM kafka_source WHERE age >= 18")
        }
    };
    s.push_str(&format!(
        "CREATE TEMPORARY TABLE kafka_source (\n  id INT,\n  name STRING,\n  age INT\n) WITH (\n  \
         'connector' = 'kafka',\n  'topic' = '{input}',\n  'properties.bootstrap.servers' = '{bootstrap}',\n  \
         'properties.group.id' = '{name}',\n  'scan.startup.mode' = 'earliest-offset',\n  'format' = '{format}'\n);\n\n",
        input = job.input,
        bootstrap = job.bootstrap,
        name = job.name,
    ));
    s.push_str(&format!(
        "CREATE TEMPORARY TABLE kafka_sink (\n{sink_columns}) WITH (\n  'connector' = 'kafka',\n  'topic' = '{output}',\n  \
         'properties.bootstrap.servers' = '{bootstrap}',\n  'properties.group.id' = '{name}',\n  'format' = '{format}'{guarantee}\n);\n\n",
        output = job.output,
        bootstrap = job.bootstrap,
        name = job.name,
    ));
    s.push_str(&format!("INSERT INTO kafka_sink {select};\n"));
    s
}

/// A Flink cluster and the ids of the jobs it runs.
pub struct FlinkPeer {
    cluster: FlinkCluster,
    label: String,
    /// job name -> Flink job id.
    jobs: std::collections::HashMap<String, String>,
}

impl FlinkPeer {
    /// ZooKeeper HA with a standby JobManager, two TaskManagers with two slots each; Flink's
    /// shipped settings, or `heartbeats` (interval, timeout) instead of Flink's 10 s / 50 s.
    pub fn start(
        home: &FlinkHome,
        dir: &Path,
        heartbeats: Option<(Duration, Duration)>,
    ) -> anyhow::Result<FlinkPeer> {
        let label = match heartbeats {
            None => LABEL.to_string(),
            Some((i, t)) => format!("{LABEL} (heartbeat {} s / {} s)", i.as_secs(), t.as_secs()),
        };
        let options = FlinkOptions {
            dir: dir.to_path_buf(),
            task_managers: 2,
            slots_per_tm: 2,
            standby_jobmanager: true,
            heartbeat: heartbeats,
            // With Keel's heartbeats, also a ZooKeeper session near Keel's etcd lease (3 s): 4 s
            // is the least the ZooKeeper server's tickTime of 2 s allows.
            extra_config: match heartbeats {
                None => Vec::new(),
                Some(_) => vec![("high-availability.zookeeper.client.session-timeout".into(), "4000".into())],
            },
        };
        let cluster = FlinkCluster::start(home, options).with_context(|| format!("starting {label}"))?;
        Ok(FlinkPeer { cluster, label, jobs: Default::default() })
    }

    fn id(&self, job: &JobDef) -> anyhow::Result<String> {
        self.jobs.get(&job.name).cloned().ok_or_else(|| anyhow!("{} runs no job {}", self.label, job.name))
    }
}

impl Peer for FlinkPeer {
    fn label(&self) -> String {
        self.label.clone()
    }

    fn submit(&mut self, job: &JobDef) -> anyhow::Result<()> {
        let id = self.cluster.submit_sql(&sql(job, None))?;
        self.jobs.insert(job.name.clone(), id);
        Ok(())
    }

    fn cancel(&mut self, job: &JobDef) -> anyhow::Result<()> {
        let id = self.id(job)?;
        self.cluster.cancel(&id)?;
        self.jobs.remove(&job.name);
        Ok(())
    }

    fn worker_pids(&self) -> Vec<u32> {
        self.cluster.taskmanager_pids()
    }

    fn leader_pid(&self) -> anyhow::Result<u32> {
        self.cluster.leader_jobmanager_pid()
    }

    fn worker_of(&self, job: &JobDef) -> anyhow::Result<u32> {
        let id = self.id(job)?;
        let pids = self.cluster.taskmanagers_of_job(&id)?;
        pids.first().copied().ok_or_else(|| anyhow!("no TaskManager runs job {id}"))
    }

    fn kill(&mut self, pid: u32) -> anyhow::Result<()> {
        self.cluster.kill(pid)
    }

    fn wait_new_leader_running(&self, job: &JobDef, old_leader: u32) -> anyhow::Result<()> {
        let id = self.id(job)?;
        let deadline = std::time::Instant::now() + JOB_TIMEOUT;
        loop {
            let leader = self.cluster.leader_jobmanager_pid().ok();
            if leader.is_some_and(|l| l != old_leader) && self.cluster.all_running(&id).unwrap_or(false) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("no new JobManager leader ran job {id} within {JOB_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn heal(&mut self) -> anyhow::Result<()> {
        self.cluster.replace_killed()
    }

    fn upgrade(&mut self, old: &JobDef, new: &JobDef) -> anyhow::Result<()> {
        let id = self.id(old)?;
        let savepoint = self.cluster.stop_with_savepoint(&id)?;
        self.jobs.remove(&old.name);
        let id = self.cluster.submit_sql(&sql(new, Some(&savepoint)))?;
        self.jobs.insert(new.name.clone(), id);
        Ok(())
    }

    fn datagen(&mut self, name: &str, rows: u64) -> anyhow::Result<()> {
        let sql = format!(
            "SET 'pipeline.name' = '{name}';\nSET 'parallelism.default' = '1';\n\
             SET 'execution.checkpointing.interval' = '1s';\n\
             CREATE TEMPORARY TABLE gen (id BIGINT) WITH (\n  'connector' = 'datagen',\n  \
             'number-of-rows' = '{rows}',\n  'rows-per-second' = '1000000000',\n  'fields.id.kind' = 'random'\n);\n\
             CREATE TEMPORARY TABLE sink (id BIGINT) WITH ('connector' = 'blackhole');\n\
             INSERT INTO sink SELECT id FROM gen;\n"
        );
        let id = self.cluster.submit_sql(&sql)?;
        self.cluster.wait_state(&id, "FINISHED", JOB_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sql_is_seed_002s_example_with_the_blanks_filled() {
        let job = JobDef {
            name: "j".into(),
            kind: JobKind::PassThrough,
            parallelism: 2,
            exactly_once: true,
            input: "source".into(),
            output: "sink".into(),
            bootstrap: "127.0.0.1:9092".into(),
        };
        let s = sql(&job, Some("file:///sp"));
        assert!(s.contains("INSERT INTO kafka_sink SELECT id, name, age FROM kafka_source;"), "{s}");
        assert!(s.contains("'format' = 'csv'") && s.contains("'topic' = 'source'"), "{s}");
        assert!(s.contains("'sink.delivery-guarantee' = 'exactly-once'"), "{s}");
        assert!(s.contains("SET 'execution.savepoint.path' = 'file:///sp';"), "{s}");
        assert!(s.contains("SET 'parallelism.default' = '2';"), "{s}");
        let f = sql(&JobDef { kind: JobKind::FilterProjection, exactly_once: false, ..job }, None);
        assert!(f.contains("WHERE age >= 18") && f.contains("'format' = 'json'"), "{f}");
        assert!(!f.contains("savepoint"), "{f}");
    }
}
