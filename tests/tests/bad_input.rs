//! Bad input gets a clear error that names the problem.

use std::time::{Duration, Instant};

use keel_proto::pb;
use keel_proto::pb::job_manager_client::JobManagerClient;
use keel_proto::KeelError;
use keel_tests::{free_port, keel_bin, Ha, Sandbox};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// An invalid spec is refused by the client with the field named, and by the JobManager with a
/// typed `InvalidSpec` error naming the field (for clients that skip local validation); nothing
/// is stored.
#[test]
fn invalid_spec_names_the_field() -> anyhow::Result<()> {
    let mut sb = Sandbox::new("bad-spec", Ha::Local, &[])?;
    sb.start("resourcemanager", "rm", &[])?;
    sb.start("jobmanager", "jm", &[])?;
    let spec = "name: broken\nparallelism: 0\nsources:\n  - name: n\n    connector: datagen\nsinks:\n  - name: o\n    connector: blackhole\n";
    let path = sb.write_spec("broken", spec)?;
    let out = sb.keel(&["run", path.to_str().unwrap_or_default()])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("parallelism"), "{}", stderr_of(&out));

    let jm = sb.proc("jm").address.clone();
    let rt = tokio::runtime::Runtime::new()?;
    let bad_option = "name: broken\nsources:\n  - name: n\n    connector: datagen\n    rows-per-secnd: 5\nsinks:\n  - name: o\n    connector: blackhole\n";
    let err = rt.block_on(async {
        let mut c = JobManagerClient::new(keel_client::channel(&jm)?);
        let req = pb::SubmitJobRequest { spec_yaml: bad_option.into(), ..Default::default() };
        match c.submit_job(req).await {
            Ok(_) => anyhow::bail!("an invalid spec was accepted"),
            Err(s) => Ok(KeelError::from_status(&s, &jm)),
        }
    })?;
    match err {
        KeelError::InvalidSpec { field, .. } => assert!(field.contains("rows-per-secnd"), "field {field}"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    let list = sb.keel_json(&["list"])?;
    assert_eq!(list.as_array().map(|a| a.len()), Some(0), "nothing stored");
    Ok(())
}

/// An unknown configuration key is an error naming it, from a file, a flag or the environment.
#[test]
fn unknown_config_key_is_named() -> anyhow::Result<()> {
    let sb = Sandbox::new("bad-config", Ha::Local, &[])?;
    let out = sb.keel(&["--set", "heartbeat.intervall=1s", "cluster"])?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("heartbeat.intervall"), "{}", stderr_of(&out));

    let file = sb.dir.join("typo.yaml");
    std::fs::write(&file, "taskmanager.numberOfTaskSlot: 4\n")?;
    let out =
        std::process::Command::new(keel_bin()).arg("--config").arg(&file).arg("taskmanager").output()?;
    assert!(!out.status.success(), "a role must not start with an unknown key");
    assert!(stderr_of(&out).contains("taskmanager.numberOfTaskSlot"), "{}", stderr_of(&out));

    let out = std::process::Command::new(keel_bin())
        .arg("--config")
        .arg(&sb.config)
        .arg("list")
        .env("KEEL_SLOT_REQUEST_TIMOUT", "1s")
        .output()?;
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("KEEL_SLOT_REQUEST_TIMOUT"), "{}", stderr_of(&out));
    Ok(())
}

/// A role pointed at an etcd that does not answer fails within the connect timeout with an
/// error naming the endpoint; so does a client verb.
#[test]
fn unreachable_etcd_is_named() -> anyhow::Result<()> {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let sb = Sandbox::new(
        "bad-etcd",
        Ha::Etcd(endpoint.clone()),
        &[("high-availability.etcd.connect-timeout", "2 s")],
    )?;
    for verb in [&["jobmanager"][..], &["list"][..]] {
        let started = Instant::now();
        let out = sb.keel(verb)?;
        assert!(!out.status.success(), "{verb:?} must fail");
        assert!(stderr_of(&out).contains(&endpoint), "{verb:?}: {}", stderr_of(&out));
        assert!(started.elapsed() < Duration::from_secs(30), "{verb:?} must not hang");
    }
    Ok(())
}

/// With no cluster running, a client verb fails with an error naming the address it tried.
#[test]
fn unreachable_cluster_names_the_address() -> anyhow::Result<()> {
    let sb = Sandbox::new("no-cluster", Ha::Local, &[])?;
    let out = sb.keel(&["list"])?;
    assert!(!out.status.success());
    let text = std::fs::read_to_string(&sb.config)?;
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("jobmanager.rpc.port: "))
        .map(|p| p.trim_matches('"').to_string())
        .unwrap_or_default();
    let err = stderr_of(&out);
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("cannot reach"), "{err}");
    Ok(())
}
