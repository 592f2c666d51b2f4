//! Machines dying: workers killed with SIGKILL mid-trial, the coordinator killed and restarted.
//! Real processes, real training, short leases.

use std::time::Duration;

use sweep_proto::v1;

use super::util::*;
use super::{client, runtime};

/// One trial of 3 + 3 epochs, each a second or two on one CPU thread.
const SLOW_SPEC: &str = "\
name: kill
dataset: { kind: synthetic, classes: 4, train_per_class: 24, val_per_class: 4, image_size: 32, seed: 3 }
training:
  batch_size: 8
  augment: { hflip: true, rotation_deg: 5, shear_deg: 0, color_jitter: 0.1 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }]
  epoch_split: [[3, 3]]
retries: { max_attempts: 5 }
";

fn submit(url: &str, dir: &std::path::Path, yaml: &str) -> String {
    let spec = write(dir, "spec.yaml", yaml);
    let out = output(sweep().args(["submit", "--coordinator", url]).arg(&spec));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().last().unwrap().trim().to_string()
}

fn trial(url: &str, sweep: &str) -> v1::TrialDetail {
    trial_named(url, sweep, "t000")
}

fn trial_named(url: &str, sweep: &str, trial: &str) -> v1::TrialDetail {
    let rt = runtime();
    rt.block_on(async {
        client(url).await.get_trial(v1::GetTrialRequest { sweep_id: sweep.into(), trial_id: trial.into() }).await
    })
    .expect("get trial")
    .into_inner()
}

fn epochs(t: &v1::TrialDetail) -> Vec<u32> {
    t.metrics.iter().map(|m| m.epoch).collect()
}

/// Waits until trial t000 has at least `n` stored epochs; returns how many.
fn wait_epochs(url: &str, sweep: &str, n: usize, logs: &[&std::path::Path]) -> usize {
    wait_for(Duration::from_secs(240), &format!("{n} epochs stored"), || {
        let t = trial(url, sweep);
        let state = t.trial.as_ref().map(|s| s.state.clone()).unwrap_or_default();
        assert!(
            state != "failed",
            "trial failed: {t:?}\n{}",
            logs.iter().map(|l| std::fs::read_to_string(l).unwrap_or_default()).collect::<Vec<_>>().join("\n")
        );
        (t.metrics.len() >= n).then_some(t.metrics.len())
    })
}

fn kill9(p: &mut Proc) {
    p.child.kill().expect("SIGKILL");
    p.child.wait().expect("reaped");
}

#[test]
fn a_trial_whose_worker_is_killed_resumes_on_another_from_its_last_checkpoint_in_either_phase() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--heartbeat-ttl", "1", "--lease-grace", "1"]);
    let sweep = submit(&url, dir.path(), SLOW_SPEC);
    let log = |n: &str| dir.path().join(format!("{n}.log"));

    // Feature extraction: kill the worker once the first epoch is stored.
    let mut a = worker(&url, "a", dir.path());
    wait_epochs(&url, &sweep, 1, &[&log("a")]);
    kill9(&mut a);
    let at_first_kill = trial(&url, &sweep).metrics.len() as u32;
    assert!(at_first_kill < 3, "the first kill should land in feature extraction ({at_first_kill} epochs done)");

    // Fine-tuning: the next worker resumes, and is killed after the first fine-tuning epoch.
    let mut b = worker(&url, "b", dir.path());
    wait_epochs(&url, &sweep, 4, &[&log("a"), &log("b")]);
    kill9(&mut b);
    let at_second_kill = trial(&url, &sweep).metrics.len() as u32;
    assert!((4..6).contains(&at_second_kill), "the second kill should land in fine-tuning ({at_second_kill})");

    let _c = worker(&url, "c", dir.path());
    let done = wait_for(Duration::from_secs(240), "the trial to complete", || {
        let t = trial(&url, &sweep);
        (t.trial.as_ref().unwrap().state == "completed").then_some(t)
    });
    assert_eq!(epochs(&done), [1, 2, 3, 4, 5, 6], "every epoch once, in order");
    let attempts = &done.attempts;
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(attempts[0].state, "lost");
    assert_eq!(attempts[1].state, "lost");
    assert_eq!(attempts[2].state, "succeeded");
    // Each attempt continued exactly where the acknowledged epochs ended: at most the epoch in
    // progress was trained again.
    assert_eq!(attempts[0].resumed_from_epoch, 0);
    assert_eq!(attempts[1].resumed_from_epoch, at_first_kill, "{attempts:?}");
    assert_eq!(attempts[2].resumed_from_epoch, at_second_kill, "{attempts:?}");
    assert!(attempts.iter().all(|x| x.note.is_empty()), "{attempts:?}");
    // The epochs each attempt stored.
    let by = |id: u64| done.metrics.iter().filter(|m| m.attempt_id == id).map(|m| m.epoch).collect::<Vec<_>>();
    assert_eq!(by(attempts[0].attempt_id), (1..=at_first_kill).collect::<Vec<_>>());
    assert_eq!(by(attempts[1].attempt_id), (at_first_kill + 1..=at_second_kill).collect::<Vec<_>>());
    assert_eq!(by(attempts[2].attempt_id), (at_second_kill + 1..=6).collect::<Vec<_>>());
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn a_coordinator_killed_mid_sweep_comes_back_with_every_acknowledged_epoch_and_reattaches_the_running_trial() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let listen = format!("127.0.0.1:{}", free_port());
    // The worker stops its attempt when the coordinator has been unreachable for a whole TTL:
    // 6 s leaves the restart below (2 s down, then the start-up, slower when the whole suite
    // runs on two cores) well inside it.
    let lease = ["--heartbeat-ttl", "6", "--lease-grace", "3"];
    let (mut coord, url) = coordinator_at(&state, &listen, &lease);
    let sweep = submit(&url, dir.path(), SLOW_SPEC);
    let log = dir.path().join("w.log");
    let _w = worker(&url, "w", dir.path());
    wait_epochs(&url, &sweep, 2, &[&log]);
    let before = trial(&url, &sweep);
    kill9(&mut coord);

    // Down for a moment (the worker's reports wait and retry), then back on the same state.
    std::thread::sleep(Duration::from_secs(2));
    let (_coord, url2) = coordinator_at(&state, &listen, &lease);
    assert_eq!(url2, url);
    let after = trial(&url, &sweep);
    // Everything acknowledged before the kill is there, unchanged.
    assert!(after.metrics.len() >= before.metrics.len());
    assert_eq!(after.metrics[..before.metrics.len()], before.metrics[..], "acknowledged epochs changed");

    let done = wait_for(Duration::from_secs(240), "the trial to complete", || {
        let t = trial(&url, &sweep);
        let s = t.trial.as_ref().unwrap().state.clone();
        assert_ne!(s, "failed", "{t:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        (s == "completed").then_some(t)
    });
    // The running attempt was reattached, not re-run: one attempt, every epoch once.
    assert_eq!(done.attempts.len(), 1, "{:?}\n{}", done.attempts, std::fs::read_to_string(&log).unwrap_or_default());
    assert_eq!(done.attempts[0].state, "succeeded");
    assert_eq!(epochs(&done), [1, 2, 3, 4, 5, 6]);
    assert!(done.metrics.iter().all(|m| m.attempt_id == done.attempts[0].attempt_id));
    assert_history_clean(&state);
}

#[test]
fn a_broken_worker_is_quarantined_and_retry_requeues_the_failed_trials_for_a_healthy_one() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--quarantine-after", "2"]);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = output(sweep().args(args).args(["--coordinator", &url, "--output", "json"]));
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let wait_state = |id: &str, want: &str| {
        wait_for(Duration::from_secs(240), &format!("sweep {id} to be {want}"), || {
            let s = json(&["status", id]);
            (s["state"] == want).then_some(s)
        })
    };
    // A first sweep gives us a weights file (a trained checkpoint).
    let mut a = worker(&url, "a", dir.path());
    let warm = submit(&url, dir.path(), &TINY_SPEC.replace("[[1, 1], [2, 1]]", "[[1, 1]]"));
    wait_state(&warm, "completed");
    let board = json(&["leaderboard", &warm]);
    let trained = board[0]["checkpoints"]["best"]["uri"].as_str().unwrap().to_string();

    // Two trials that need a weights file that is not there: each fails at once, permanently:
    // the spec's fault, not the worker's, so the worker is not quarantined for it.
    let weights = dir.path().join("weights").join("resnet18-flowers.safetensors");
    let broken_spec =
        TINY_SPEC.replace("training:", &format!("model: {{ weights: {} }}\ntraining:", weights.display()));
    let broken = submit(&url, dir.path(), &broken_spec);
    let s = wait_state(&broken, "failed");
    for t in s["trials"].as_array().unwrap() {
        assert_eq!(t["state"], "failed");
        assert!(t["error"].as_str().unwrap().contains("resnet18-flowers.safetensors"), "{t}");
    }
    assert_eq!(json(&["workers"])[0]["state"], "active", "a bad spec quarantined a worker");
    a.terminate();

    // A worker whose attempts keep failing for reasons of its own (a device that errors):
    // after two in a row it is quarantined, with the reason.
    let flaky = submit(&url, dir.path(), &format!("{}sharing: off\n", TINY_SPEC.replace("name: tiny", "name: flaky")));
    let bad = failing_worker(&url, "bad", 2, "CUDA error: an illegal memory access was encountered");
    let workers = json(&["workers"]);
    let wb = workers.as_array().unwrap().iter().find(|w| w["worker"] == bad.as_str()).unwrap().clone();
    assert_eq!(wb["state"], "quarantined", "{workers:#}");
    assert!(wb["note"].as_str().unwrap().contains("2 attempts failed in a row"), "{workers:#}");
    assert!(wb["note"].as_str().unwrap().contains("illegal memory access"), "{workers:#}");
    let table = stdout(&output(sweep().args(["workers", "--coordinator", &url])));
    assert!(table.contains("quarantined"), "{table}");

    // Fix the cause, retry: the trials are pending again, but not for the quarantined worker.
    std::fs::create_dir_all(weights.parent().unwrap()).unwrap();
    std::fs::copy(&trained, &weights).unwrap();
    let out = output(sweep().args(["retry", &broken, "--coordinator", &url]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("re-queued 2 trial(s): t000, t001"), "{}", stdout(&out));
    let out = output(sweep().args(["retry", &flaky, "--coordinator", &url]));
    assert!(out.status.success() && stdout(&out).contains("re-queued 1 trial(s): t000"), "{}", stdout(&out));
    std::thread::sleep(Duration::from_secs(3));
    let s = json(&["status", &broken]);
    assert_eq!(s["counts"]["pending"], 2, "{s:#}");
    // Retrying what is not failed is refused, with the reason.
    let out = output(sweep().args(["retry", &broken, "--trial", "t000", "--coordinator", &url]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("t000") && stderr(&out).contains("only failed trials"), "{}", stderr(&out));

    let _b = worker(&url, "b", dir.path());
    let s = wait_state(&broken, "completed");
    let b_id = json(&["workers"]).as_array().unwrap().iter().find(|w| w["name"] == "b").unwrap()["worker"].clone();
    for t in s["trials"].as_array().unwrap() {
        assert_eq!(t["worker"], b_id, "{t}");
        assert_eq!(t["attempts"], 2, "{t}");
    }
    let s = wait_state(&flaky, "completed");
    assert!(s["trials"].as_array().unwrap().iter().all(|t| t["worker"] == b_id), "{s:#}");
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn a_partitioned_worker_stops_its_attempt_and_its_stale_writes_are_refused_when_it_comes_back() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--heartbeat-ttl", "2", "--lease-grace", "2"]);
    let sweep = submit(&url, dir.path(), SLOW_SPEC);
    let proxy = Proxy::start(&url);
    let log_a = dir.path().join("a.log");
    let _a = worker(&proxy.url, "a", dir.path());
    wait_epochs(&url, &sweep, 1, &[&log_a]);
    let before = trial(&url, &sweep);
    let stale = before.attempts[0].clone();
    let rt = runtime();
    let workers = rt
        .block_on(async { client(&url).await.list_workers(v1::ListWorkersRequest::default()).await })
        .unwrap()
        .into_inner()
        .workers;
    let (old_id, old_incarnation) = (workers[0].worker_id.clone(), workers[0].incarnation);

    // Partition past TTL + grace: the worker stops its own attempt, the coordinator ends its
    // lease and re-queues the trial.
    proxy.set_cut(true);
    let lost = wait_for(Duration::from_secs(60), "the lease to end", || {
        let t = trial(&url, &sweep);
        (t.attempts[0].state == "lost").then_some(t)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log_a).unwrap().contains("stopping running attempts") {
        let log = std::fs::read_to_string(&log_a).unwrap();
        assert!(std::time::Instant::now() < deadline, "the worker did not stop its attempt:\n{log}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Nothing it trained after the partition was stored.
    let stored_by_a = lost.metrics.iter().filter(|m| m.attempt_id == stale.attempt_id).count();

    // Another worker resumes the trial; then the partition heals.
    let log_b = dir.path().join("b.log");
    let _b = worker(&url, "b", dir.path());
    let n = trial(&url, &sweep).metrics.len();
    wait_epochs(&url, &sweep, n + 1, &[&log_a, &log_b]);
    proxy.set_cut(false);

    // Writes in the name of the lost lease and attempt, by anyone who does not hold the worker's
    // session (the worker's own, with it, are fenced: the store and wire tests show that), are
    // refused and change nothing.
    let forged = "0".repeat(64);
    let (report, heartbeat, finish) = rt.block_on(async {
        let mut w = sweep_proto::v1::worker_service_client::WorkerServiceClient::connect(url.clone()).await.unwrap();
        let metrics = v1::EpochMetrics { epoch: 2, phase: "feature_extraction".into(), ..Default::default() };
        let report = w
            .report_epoch(v1::ReportEpochRequest {
                attempt_id: stale.attempt_id,
                metrics: Some(metrics),
                worker_id: old_id.clone(),
                session: forged.clone(),
                ..Default::default()
            })
            .await;
        let heartbeat = w
            .heartbeat(v1::HeartbeatRequest {
                worker_id: old_id.clone(),
                incarnation: old_incarnation,
                running_attempt_ids: vec![stale.attempt_id],
                session: forged.clone(),
            })
            .await;
        let finish = w
            .finish_attempt(v1::FinishAttemptRequest {
                attempt_id: stale.attempt_id,
                outcome: v1::Outcome::Succeeded as i32,
                worker_id: old_id.clone(),
                session: String::new(),
                ..Default::default()
            })
            .await;
        (report, heartbeat, finish)
    });
    for (what, r, code) in [
        ("report", report.err(), tonic::Code::PermissionDenied),
        ("heartbeat", heartbeat.err(), tonic::Code::PermissionDenied),
        ("finish", finish.err(), tonic::Code::FailedPrecondition),
    ] {
        let s = r.unwrap_or_else(|| panic!("a stale {what} was accepted"));
        assert_eq!(s.code(), code, "{what}: {s:?}");
    }
    // The worker comes back as a new registration and may take new work.
    wait_for(Duration::from_secs(60), "the partitioned worker to register again", || {
        let w = rt
            .block_on(async { client(&url).await.list_workers(v1::ListWorkersRequest::default()).await })
            .unwrap()
            .into_inner()
            .workers;
        w.iter().any(|x| x.name == "a" && x.state == "active" && x.worker_id != old_id).then_some(())
    });

    let done = wait_for(Duration::from_secs(240), "the trial to complete", || {
        let t = trial(&url, &sweep);
        (t.trial.as_ref().unwrap().state == "completed").then_some(t)
    });
    assert_eq!(epochs(&done), [1, 2, 3, 4, 5, 6]);
    let kept = done.metrics.iter().filter(|m| m.attempt_id == stale.attempt_id).count();
    assert!(kept <= stored_by_a, "the lost attempt stored more after its lease ended");
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn cancel_stops_a_running_attempt_at_its_next_heartbeat() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--heartbeat-ttl", "3"]);
    let id = submit(&url, dir.path(), &SLOW_SPEC.replace("[[3, 3]]", "[[3, 30]]"));
    let log = dir.path().join("w.log");
    let _w = worker(&url, "w", dir.path());
    wait_epochs(&url, &id, 1, &[&log]);
    let out = output(sweep().args(["cancel", &id, "--coordinator", &url]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("asked workers to stop 1 running"), "{}", stdout(&out));
    let t = wait_for(Duration::from_secs(60), "the attempt to stop", || {
        let t = trial(&url, &id);
        (t.trial.as_ref().unwrap().state == "cancelled").then_some(t)
    });
    // Stopped long before its 33 epochs; the worker is free again.
    assert!(t.metrics.len() < 10, "{} epochs ran", t.metrics.len());
    assert_eq!(t.attempts[0].state, "cancelled", "{:?}", t.attempts);
    assert!(std::fs::read_to_string(&log).unwrap().contains("attempt finished"));
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn with_an_s3_artifact_store_a_killed_workers_trial_resumes_on_a_worker_that_shares_no_filesystem_with_it() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), "sweep-artifacts");
    let store = "s3://sweep-artifacts/runs/one";
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--heartbeat-ttl", "1", "--lease-grace", "1"]);
    let sweep = submit(&url, dir.path(), SLOW_SPEC);
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    // Each worker has its own local directories: the store is all they share.
    let start = |name: &str| worker_in(&url, name, dir.path(), store, &dir.path().join(name), &[], &s3.env());

    let mut a = start("a");
    wait_epochs(&url, &sweep, 4, &[&log("a")]);
    kill9(&mut a);
    let at_kill = trial(&url, &sweep).metrics.len() as u32;
    assert!((4..6).contains(&at_kill), "the kill should land in fine-tuning ({at_kill} epochs done)");

    let _b = start("b");
    let done = wait_for(Duration::from_secs(240), "the trial to complete", || {
        let t = trial(&url, &sweep);
        let s = t.trial.as_ref().unwrap().state.clone();
        assert_ne!(s, "failed", "{t:?}\n{}", std::fs::read_to_string(log("b")).unwrap_or_default());
        (s == "completed").then_some(t)
    });
    assert_eq!(epochs(&done), [1, 2, 3, 4, 5, 6]);
    let attempts = &done.attempts;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[1].resumed_from_epoch, at_kill, "{attempts:?}");
    assert!(attempts[1].note.is_empty(), "the resume point from S3 verified: {attempts:?}");

    // The references are S3 URLs, and a client that is not ours finds the objects there.
    let prefix = format!("runs/one/{sweep}/t000/");
    let best = done.best_checkpoint.as_ref().expect("a best checkpoint");
    assert!(best.uri.starts_with(&format!("s3://sweep-artifacts/{prefix}")), "{}", best.uri);
    let objects = s3.objects();
    let names: Vec<&str> = objects.iter().filter_map(|(k, _)| k.strip_prefix(&prefix)).collect();
    assert_eq!(
        names,
        [
            "best.json",
            "best.safetensors",
            "last.json",
            "last.safetensors",
            "state-e0005.json",
            "state-e0005.safetensors",
            "state-e0006.json",
            "state-e0006.safetensors"
        ],
        "{objects:?}"
    );
    let size = |name: &str| objects.iter().find(|(k, _)| k == &format!("{prefix}{name}")).unwrap().1;
    assert_eq!(size("best.safetensors"), best.bytes);
    assert!(size("state-e0006.safetensors") > size("last.safetensors"), "a resume point holds the optimizer too");
    // The worker that finished left no local copies behind (only the lock of its scratch
    // folder, which says the folder is in use while it runs).
    let scratch = dir.path().join("b/scratch");
    let left: Vec<_> = walk(&scratch).into_iter().filter(|p| !p.ends_with(".lock")).collect();
    assert!(left.is_empty(), "{left:?}");
    assert_history_clean(&dir.path().join("state"));
}

/// Every file below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { found.extend(walk(&p)) } else { found.push(p) }
    }
    found
}

#[test]
fn a_worker_whose_artifact_store_does_not_answer_stops_at_start_up_saying_why() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), "exists");
    let run = |artifacts: &str| {
        output(
            std::process::Command::new(bin("sweep-worker"))
                .args(["--coordinator", "http://127.0.0.1:9", "--artifacts", artifacts, "--cache-dir"])
                .arg(dir.path().join("cache"))
                .envs(s3.env()),
        )
    };
    let out = run("s3://no-such-bucket/p");
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("s3://no-such-bucket/p") && e.contains("NoSuchBucket"), "{e}");
    let out = run("gs://bucket");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("scheme `gs` is not supported"), "{}", stderr(&out));
    let file = write(dir.path(), "a-file", "x");
    let out = run(file.join("sub").to_str().unwrap());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot create"), "{}", stderr(&out));
}

/// Two strategies × `[3, 1]`, `[3, 2]`: feature extraction (epochs 1–3) is one stage for all
/// four trials; fine-tuning epoch 4 one per strategy, shared by both splits; epoch 5 each
/// `[3, 2]` alone. 18 epochs in all, 7 distinct.
const SHARED_SPEC: &str = "\
name: shared-kill
dataset: { kind: synthetic, classes: 4, train_per_class: 24, val_per_class: 4, image_size: 32, seed: 3 }
training:
  batch_size: 8
  augment: { hflip: true, rotation_deg: 5, shear_deg: 0, color_jitter: 0.1 }
grid:
  backbone: [resnet18]
  lr_decay:
    - { strategy: exponential, head_lr: 1.0e-3, factor: 3 }
    - { strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-5 }
  epoch_split: [[3, 1], [3, 2]]
retries: { max_attempts: 5 }
";

#[test]
fn a_worker_killed_inside_a_shared_stage_resumes_it_once_and_every_trial_through_it_completes_once() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--heartbeat-ttl", "1", "--lease-grace", "1"]);
    let id = submit(&url, dir.path(), SHARED_SPEC);
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let detail = |trial: &str| trial_named(&url, &id, trial);

    // Kill the worker inside the shared feature extraction: t000 (whose epochs 1–3 t001, the
    // longest trial of the stage, computes) has its first epoch.
    let mut a = worker(&url, "a", dir.path());
    wait_epochs(&url, &id, 1, &[&log("a")]);
    kill9(&mut a);
    let at_kill = detail("t001").metrics.len() as u32;
    assert!((1..3).contains(&at_kill), "the kill should land inside the shared stage ({at_kill} epochs done)");

    let _b = worker(&url, "b", dir.path());
    let status = wait_for(Duration::from_secs(240), "the sweep to complete", || {
        let out = output(sweep().args(["status", &id, "--coordinator", &url, "--output", "json"]));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_ne!(v["state"], "failed", "{v:#}\n{}", std::fs::read_to_string(log("b")).unwrap_or_default());
        (v["state"] == "completed").then_some(v)
    });
    assert!(status["trials"].as_array().unwrap().iter().all(|t| t["state"] == "completed"), "{status:#}");

    let trials: Vec<v1::TrialDetail> = ["t000", "t001", "t002", "t003"].iter().map(|t| detail(t)).collect();
    // The stage resumed once: its runner t001 was lost once, then its next attempt continued
    // after the acknowledged epochs; nobody else ran feature extraction.
    let runner = &trials[1].attempts;
    assert_eq!(runner.len(), 2, "{runner:?}");
    assert_eq!((runner[0].state.as_str(), runner[1].state.as_str()), ("lost", "succeeded"));
    assert_eq!(runner[1].resumed_from_epoch, at_kill, "{runner:?}");
    // Every trial holds every epoch once; epochs 1–3 of all four are the runner's computation.
    let fe: Vec<u64> = trials[1].metrics.iter().take(3).map(|m| m.attempt_id).collect();
    for t in &trials {
        let summary = t.trial.as_ref().unwrap();
        let total = summary.fe_epochs + summary.ft_epochs;
        assert_eq!(epochs(t), (1..=total).collect::<Vec<_>>(), "{}", summary.trial_id);
        let own: Vec<u64> = t.metrics.iter().take(3).map(|m| m.attempt_id).collect();
        assert_eq!(own, fe, "{}: feature extraction computed once, for all", summary.trial_id);
    }
    // The [3, 1] trials never ran: their fine-tuning epoch was their [3, 2] sibling's.
    assert!(trials[0].attempts.is_empty() && trials[2].attempts.is_empty());
    assert_eq!(trials[3].attempts.len(), 1);
    // 7 distinct epochs were computed and stored (the one in progress at the kill was not
    // stored by the lost attempt).
    let computed: std::collections::HashSet<(u64, u32)> =
        trials.iter().flat_map(|t| t.metrics.iter().map(|m| (m.attempt_id, m.epoch))).collect();
    assert_eq!(computed.len(), 7, "{computed:?}");
    assert_history_clean(&dir.path().join("state"));
}
