//! `keel-chaos`: the long chaos run (see docs/chaos.md).
//!
//! ```sh
//! cargo build -p keel && cargo run -p keel-tests --bin keel-chaos -- --seed 42 --duration 10m
//! cargo run -p keel-tests --bin keel-chaos -- --seed 42 --duration 10m --mode exactly-once
//! cargo run -p keel-tests --bin keel-chaos -- --seed 42 --duration 5m --ha raft   # raft HA store
//! cargo run -p keel-tests --bin keel-chaos -- --seed 42 --faults 20 --list   # the schedule only
//! ```
//!
//! Prints the seed first (a run without `--seed` draws one), every fault as it is injected,
//! and the report at the end; exits with 1 when a guarantee was broken, 2 on bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use keel_tests::chaos::schedule::{schedule, FaultKind};
use keel_tests::chaos::{run, Options};
use keel_tests::Backend;

const USAGE: &str =
    "usage: keel-chaos [--seed N] [--duration 10m | --faults N] [--mode at-least-once|exactly-once] [--ha etcd|raft]
                  [--kinds kill-tm,kill-jm-leader,...] [--rate RECORDS_PER_S] [--no-network]
                  [--recovery-timeout 90s] [--checkpoint-interval 500ms] [--lease-ttl 3s] [--no-etcd-pre-vote] [--keel PATH] [--keep] [--list]";

fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad duration {text:?} (like 90s, 10m, 1h)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" | "min" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration unit in {text:?} (ms, s, m, h)")),
    }
}

fn parse(args: &[String]) -> Result<(Options, bool), String> {
    let mut opts = Options { faults: None, ..Options::default() };
    let mut seed = None;
    let mut list = false;
    let mut rate = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seed" => seed = Some(value("--seed")?.parse::<u64>().map_err(|e| format!("--seed: {e}"))?),
            "--duration" => opts.duration = Some(parse_duration(&value("--duration")?)?),
            "--faults" => {
                opts.faults = Some(value("--faults")?.parse().map_err(|e| format!("--faults: {e}"))?)
            }
            "--mode" => opts.mode = value("--mode")?.parse()?,
            "--ha" => {
                opts.ha = match value("--ha")?.as_str() {
                    "etcd" => Backend::Etcd,
                    "raft" => Backend::Raft,
                    other => return Err(format!("--ha: unknown backend {other:?}; etcd or raft")),
                }
            }
            "--kinds" => {
                opts.kinds = value("--kinds")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--rate" => rate = Some(value("--rate")?.parse().map_err(|e| format!("--rate: {e}"))?),
            "--no-network" => opts.network = false,
            "--recovery-timeout" => opts.recovery_timeout = parse_duration(&value("--recovery-timeout")?)?,
            "--keel" => opts.keel = Some(PathBuf::from(value("--keel")?)),
            "--checkpoint-interval" => {
                opts.checkpoint_interval = parse_duration(&value("--checkpoint-interval")?)?
            }
            "--lease-ttl" => opts.lease_ttl = parse_duration(&value("--lease-ttl")?)?,
            "--keep" => opts.keep = true,
            "--etcd-pre-vote" => opts.etcd_pre_vote = true,
            "--no-etcd-pre-vote" => opts.etcd_pre_vote = false,
            "--list" => list = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    opts.rate = rate.unwrap_or(opts.rate);
    if opts.duration.is_none() && opts.faults.is_none() {
        opts.duration = Some(Duration::from_secs(600));
    }
    opts.seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000)
            .unwrap_or(1)
    });
    if opts.keel.is_none() && std::env::var_os("KEEL_BIN").is_none() {
        // target/<profile>/keel-chaos -> target/<profile>/keel
        if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) {
            let keel = dir.join("keel");
            if !keel.exists() {
                return Err(format!(
                    "{} does not exist: build it first (cargo build -p keel), or pass --keel",
                    keel.display()
                ));
            }
            opts.keel = Some(keel);
        }
    }
    Ok((opts, list))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KEEL_CHAOS_LOG")
                .unwrap_or_else(|_| "warn,rdkafka=off,librdkafka=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (opts, list) = match parse(&args) {
        Ok(x) => x,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("keel-chaos: {e}");
            }
            eprintln!("{USAGE}");
            eprintln!(
                "fault kinds: {}",
                FaultKind::EVERY.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            );
            eprintln!(
                "default kinds: all but pause-ha-member on --ha etcd (as before it existed), all on --ha raft; \
                 kill-ha-member and partition-ha-member are other names of restart-etcd and partition-etcd-member"
            );
            return ExitCode::from(2);
        }
    };
    println!("keel-chaos: seed {}", opts.seed);
    // Ctrl-C or SIGTERM: kill what the run started and remove its namespaces, then exit.
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("keel-chaos: interrupted; stopping every process of the run");
        keel_tests::chaos::cluster::kill_started();
        keel_tests::chaos::net::remove_all();
        std::process::exit(130);
    });
    if list {
        for f in schedule(opts.seed, &opts.schedule_kinds(), opts.faults.unwrap_or(30)) {
            println!("{f}");
        }
        return ExitCode::SUCCESS;
    }
    match run(&opts) {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                println!("keel-chaos: FAILED; replay with: {}", report.replay);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("keel-chaos: the run could not be made: {e:#}");
            eprintln!("replay with: {}", opts.replay_command());
            ExitCode::from(1)
        }
    }
}
