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
    let rt = runtime();
    rt.block_on(async {
        client(url).await.get_trial(v1::GetTrialRequest { sweep_id: sweep.into(), trial_id: "t000".into() }).await
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
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let listen = format!("127.0.0.1:{}", free_port());
    let lease = ["--heartbeat-ttl", "3", "--lease-grace", "3"];
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

    // Two trials that need a weights file that is not there: each fails at once (permanent),
    // and after two failures in a row the worker is quarantined.
    let weights = dir.path().join("weights").join("resnet18-flowers.safetensors");
    let broken_spec =
        TINY_SPEC.replace("training:", &format!("model: {{ weights: {} }}\ntraining:", weights.display()));
    let broken = submit(&url, dir.path(), &broken_spec);
    let s = wait_state(&broken, "failed");
    for t in s["trials"].as_array().unwrap() {
        assert_eq!(t["state"], "failed");
        assert!(t["error"].as_str().unwrap().contains("resnet18-flowers.safetensors"), "{t}");
    }
    let workers = json(&["workers"]);
    let wa = &workers[0];
    assert_eq!(wa["state"], "quarantined", "{workers:#}");
    assert!(wa["note"].as_str().unwrap().contains("2 attempts failed in a row"), "{workers:#}");
    let table = stdout(&output(sweep().args(["workers", "--coordinator", &url])));
    assert!(table.contains("quarantined"), "{table}");

    // Fix the cause, retry: the trials are pending again, but not for the quarantined worker.
    std::fs::create_dir_all(weights.parent().unwrap()).unwrap();
    std::fs::copy(&trained, &weights).unwrap();
    let out = output(sweep().args(["retry", &broken, "--coordinator", &url]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("re-queued 2 trial(s): t000, t001"), "{}", stdout(&out));
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
    a.terminate();
    assert_history_clean(&dir.path().join("state"));
}
