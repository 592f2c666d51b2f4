//! End-to-end tests with real processes: `sweep` (CLI and coordinator) and `sweep-worker`.

mod browser;
mod cli;
mod dashboard;
mod integrity;
mod kill;
mod security;
mod stages;
mod util;

use std::time::Duration;

use serde_json::Value;
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use util::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

async fn client(url: &str) -> SweepServiceClient<tonic::transport::Channel> {
    SweepServiceClient::connect(url.to_string()).await.expect("connect to coordinator")
}

#[test]
fn validate_rejects_every_kind_of_bad_spec_with_file_line_and_column() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let good = TINY_SPEC;
    let cases: Vec<(&str, String, &str)> = vec![
        ("syntax", good.replace("classes: 3,", "classes: 3,,"), ":2:"),
        ("unknown-key", format!("{good}colour: red\n"), ":12:1: unknown field `colour`"),
        ("wrong-type", good.replace("batch_size: 8", "batch_size: eight"), ":4:15: training.batch_size: invalid type"),
        (
            "empty-list",
            good.replace("backbone: [resnet18]", "backbone: []"),
            ":7:3: grid.backbone: must list at least one",
        ),
        ("zero-epochs", good.replace("[[1, 1], [2, 1]]", "[[1, 1], [2, 0]]"), ":10:29: grid.epoch_split[1][1]"),
        ("negative-lr", good.replace("head_lr: 1.0e-3", "head_lr: -1.0e-3"), ":9:41: grid.lr_decay[0].head_lr"),
        ("zero-batch", good.replace("batch_size: 8", "batch_size: 0"), ":4:15: training.batch_size"),
        (
            "unknown-backbone",
            good.replace("[resnet18]", "[resnet19]"),
            "unknown backbone `resnet19`; valid: resnet18, resnet34",
        ),
        ("unknown-strategy", good.replace("strategy: exponential", "strategy: cosine"), "unknown strategy `cosine`"),
        ("empty-file", String::new(), ":1:1: the spec is empty"),
        ("missing-field", good.replace("name: tiny\n", ""), "missing field `name`"),
    ];
    for (name, text, want) in &cases {
        let path = write(dir.path(), &format!("{name}.yaml"), text);
        let out = output(sweep().arg("validate").arg(&path));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(&format!("{}", path.display())), "{name}: no file name in {err}");
        assert!(err.contains(want), "{name}: `{want}` not in {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: one message, got {err}");
    }
    // Over the trial limit.
    let path = write(dir.path(), "big.yaml", good);
    let out = output(sweep().arg("validate").arg(&path).args(["--max-trials", "1"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("2 trials") && stderr(&out).contains("limit of 1"), "{}", stderr(&out));
    // A file that does not exist.
    let out = output(sweep().args(["validate", "/no/such/spec.yaml"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read spec /no/such/spec.yaml"), "{}", stderr(&out));
}

#[test]
fn validate_lists_the_trials_of_the_shipped_specs() {
    let _bound = sweep_tests::bound(300);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps");
    let out = output(sweep().args(["validate", &format!("{root}/flowers102.yaml"), "--output", "json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["trial_count"], 18);
    assert_eq!(v["trials"][0]["trial"], "t000");
    assert_eq!(v["trials"][0]["backbone"], "vgg16_bn");
    assert_eq!(v["trials"][0]["epoch_split"], serde_json::json!([16, 8]));
    let out = output(sweep().args(["validate", &format!("{root}/quickstart.yaml")]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("t007"), "{}", stdout(&out));
}

#[test]
fn plan_prints_the_stage_tree_and_what_sharing_saves() {
    let _bound = sweep_tests::bound(300);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // Run from the repository's root, so the snapshot names the spec as a user would.
    let out = output(sweep().current_dir(root).args(["plan", "sweeps/flowers102.yaml"]));
    assert!(out.status.success(), "{}", stderr(&out));
    insta::assert_snapshot!("plan_flowers102", stdout(&out));
    let out = output(sweep().current_dir(root).args(["plan", "sweeps/flowers102.yaml", "--output", "json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["trial_count"], 18);
    assert_eq!(v["epochs"]["naive"]["feature_extraction"], 216);
    assert_eq!(v["epochs"]["shared"]["feature_extraction"], 48, "16 distinct epochs per backbone");
    assert_eq!(v["stages"].as_array().map(Vec::len), Some(27));
    assert_eq!(v["stages"][0]["trials"].as_array().map(Vec::len), Some(6));
    assert_eq!(v["stages"][0]["key"].as_str().map(str::len), Some(64));
    assert_eq!(v["trials"][0]["stages"], serde_json::json!(["s00", "s01", "s02", "s03"]));
    let secs = v["device_seconds"].as_array().unwrap();
    assert_eq!(secs.len(), 6, "3 backbones × 2 phases");
    assert!(secs.iter().all(|c| c["shared"].as_f64().unwrap() <= c["naive"].as_f64().unwrap()));
    assert_eq!(v["feature_cache"], serde_json::json!([]), "the recipe augments feature extraction");
    // BatchNorm frozen and feature extraction unaugmented: the feature cache serves it, and
    // each stage runs the backbone once (efficientnet_b0's stochastic depth excepted).
    let dir = tempfile::tempdir().unwrap();
    let cached = dir.path().join("cached.yaml");
    std::fs::write(
        &cached,
        "name: cached\ndataset: { kind: synthetic, classes: 3 }\n\
         training: { freeze_bn_stats: true, feature_extraction: { augment: false } }\n\
         grid:\n  backbone: [resnet50, efficientnet_b0]\n  lr_decay: [{ strategy: linear, head_lr: 1.0e-4, final_lr: 1.0e-7 }]\n\
         \x20 epoch_split: [[16, 8], [8, 16]]\n",
    )
    .unwrap();
    let out = output(sweep().args(["plan", &cached.display().to_string(), "--output", "json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["feature_cache"], serde_json::json!(["resnet50"]));
    let cost = |b: &str, phase: &str, column: &str| {
        let secs = v["device_seconds"].as_array().unwrap();
        secs.iter().find(|c| c["backbone"] == b && c["phase"] == phase).unwrap()[column].as_f64().unwrap()
    };
    let fe = |b: &str| cost(b, "feature_extraction", "naive");
    let ft = |b: &str| cost(b, "fine_tuning", "naive");
    // Per trial (naive), its 16 or 8 feature-extraction epochs cost one forward pass each; 24
    // fine-tuning epochs 24 × 3 passes over the training images (plus validation).
    assert!(ft("resnet50") > 24.0 * fe("resnet50") / 2.0, "{v}");
    // Shared: t000 runs epochs 1–8 (shared with t001) and goes on with 9–16 in the same
    // attempt, whose cache serves them: one pass in all, half of the naive two.
    let shared = cost("resnet50", "feature_extraction", "shared");
    assert!((shared - fe("resnet50") / 2.0).abs() < 1e-9 * shared, "{v}");
    // Uncached, every epoch runs the backbone: 24 feature-extraction epochs naive, 16 shared.
    let shared = cost("efficientnet_b0", "feature_extraction", "shared");
    assert!((shared - fe("efficientnet_b0") * 16.0 / 24.0).abs() < 1e-9 * shared, "{v}");
    let out = output(sweep().args(["plan", &cached.display().to_string()]));
    assert!(
        stdout(&out).contains(
            "Feature extraction of resnet50 runs the backbone in the first feature-extraction epoch of each attempt"
        ),
        "{}",
        stdout(&out)
    );
    // Data parallel: the replicas share out the cache's pass, so it serves them too.
    let text = std::fs::read_to_string(&cached).unwrap();
    assert!(text.starts_with("name: cached\n"));
    std::fs::write(&cached, text.replace("name: cached\n", "name: cached\nresources: { gpus_per_trial: 2 }\n"))
        .unwrap();
    let out = output(sweep().args(["plan", &cached.display().to_string(), "--output", "json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let dp: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(dp["feature_cache"], serde_json::json!(["resnet50"]), "{dp}");
    // Bad input: a throughput that is no number of TFLOP/s, a missing spec.
    let out = output(sweep().current_dir(root).args(["plan", "sweeps/flowers102.yaml", "--tflops", "0"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--tflops must be a positive number"), "{}", stderr(&out));
    let out = output(sweep().args(["plan", "/no/such/spec.yaml"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read spec /no/such/spec.yaml"), "{}", stderr(&out));
}

#[test]
fn real_processes_complete_a_sweep_and_the_leaderboard_comes_back_over_grpc() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = write(dir.path(), "tiny.yaml", TINY_SPEC);
    let (mut coord, url) = coordinator(&state, &[]);
    let _worker = worker(&url, "e2e-1", dir.path());

    let out = output(sweep().args(["submit", "--coordinator", &url]).arg(&spec));
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).lines().last().unwrap().trim().to_string();
    assert!(id.starts_with("tiny-"), "last line is the id: {}", stdout(&out));

    let rt = runtime();
    let status = wait_for(Duration::from_secs(240), "the sweep to complete", || {
        let s = rt
            .block_on(async { client(&url).await.get_sweep(v1::GetSweepRequest { sweep_id: id.clone() }).await })
            .unwrap()
            .into_inner();
        let state = s.sweep.as_ref().unwrap().state.clone();
        assert!(
            state != "failed",
            "sweep failed: {s:?}\nworker log:\n{}",
            std::fs::read_to_string(dir.path().join("e2e-1.log")).unwrap_or_default()
        );
        (state == "completed").then_some(s)
    });
    assert_eq!(status.trials.len(), 2);
    assert!(status.trials.iter().all(|t| t.epochs_done == t.fe_epochs + t.ft_epochs));

    // The leaderboard over gRPC, computed from stored metrics.
    let board = rt
        .block_on(async {
            client(&url).await.get_leaderboard(v1::GetLeaderboardRequest { sweep_id: id.clone() }).await
        })
        .unwrap()
        .into_inner();
    assert_eq!(board.entries.len(), 2);
    for (i, e) in board.entries.iter().enumerate() {
        assert_eq!(e.rank as usize, i + 1);
        assert_eq!(e.state, "completed");
        assert!(e.fe_val_accuracy.is_some() && e.best_val_accuracy.is_some(), "{e:?}");
        assert_eq!(e.best_epoch, Some(e.fe_epochs + 1), "one fine-tuning epoch");
        assert!(e.parameters > 11_000_000, "resnet18 with a 3-class head: {}", e.parameters);
        assert!(e.wall_seconds > 0.0);
    }
    assert!(board.entries[0].best_val_accuracy >= board.entries[1].best_val_accuracy);
    // Per-epoch metrics of one trial.
    let trial = rt
        .block_on(async {
            client(&url).await.get_trial(v1::GetTrialRequest { sweep_id: id.clone(), trial_id: "t001".into() }).await
        })
        .unwrap()
        .into_inner();
    let phases: Vec<_> = trial.metrics.iter().map(|m| (m.epoch, m.phase.as_str())).collect();
    assert_eq!(phases, vec![(1, "feature_extraction"), (2, "feature_extraction"), (3, "fine_tuning")]);

    // The CLI's stable JSON.
    let out = output(sweep().args(["leaderboard", &id, "--coordinator", &url, "--output", "json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let first = &json[0];
    for key in
        ["trial", "backbone", "lr_decay", "epoch_split", "state", "fe_val_accuracy", "best_val_accuracy", "best_epoch"]
    {
        assert!(first.get(key).is_some(), "leaderboard json lacks `{key}`: {first}");
    }
    assert_eq!(first["lr_decay"]["strategy"], "exponential");
    // Its checkpoints are where the leaderboard says, with their metadata beside them.
    let best = first["checkpoints"]["best"]["uri"].as_str().expect("a best checkpoint");
    assert!(best.starts_with(&dir.path().join("artifacts").display().to_string()), "{best}");
    assert!(std::path::Path::new(best).is_file(), "{best}");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(std::path::Path::new(best).with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(meta["trial"], first["trial"]);
    assert_eq!(meta["epoch"], first["checkpoints"]["best"]["epoch"]);
    let last = first["checkpoints"]["last"]["epoch"].as_u64().unwrap();
    assert_eq!(last, first["epoch_split"][0].as_u64().unwrap() + 1, "the last checkpoint holds the last epoch");
    let out = output(sweep().args(["status", &id, "--coordinator", &url, "--output", "json"]));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["id"], id.as_str());
    assert_eq!(json["state"], "completed");
    assert_eq!(json["counts"]["completed"], 2);
    assert_eq!(json["counts"]["pending"], 0);

    // A bad spec over the wire: INVALID_ARGUMENT naming line and column.
    let err = rt
        .block_on(async {
            client(&url)
                .await
                .submit_sweep(v1::SubmitSweepRequest {
                    spec_yaml: TINY_SPEC.replace("[resnet18]", "[nope]"),
                    source: "wire.yaml".into(),
                    ..Default::default()
                })
                .await
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("wire.yaml:7:14: grid.backbone[0]: unknown backbone `nope`"),
        "{}",
        err.message()
    );
    // Unknown ids.
    let err = rt
        .block_on(async { client(&url).await.get_sweep(v1::GetSweepRequest { sweep_id: "nope".into() }).await })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Restart the coordinator on the same state: everything is still there.
    let before = stdout(&output(sweep().args(["leaderboard", &id, "--coordinator", &url, "--output", "json"])));
    assert!(coord.terminate().success());
    let (_coord, url2) = coordinator(&state, &[]);
    let after = stdout(&output(sweep().args(["leaderboard", &id, "--coordinator", &url2, "--output", "json"])));
    let strip = |s: &str| -> Value { serde_json::from_str(s).unwrap() };
    assert_eq!(strip(&before), strip(&after));
    assert_history_clean(&state);
}

#[test]
fn sweep_run_finishes_with_a_leaderboard_and_leaves_a_readable_state_dir() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = write(dir.path(), "tiny.yaml", TINY_SPEC);
    let out =
        output(sweep().arg("run").arg(&spec).args(["--workers", "2", "--threads", "1", "--state-dir"]).arg(&state));
    assert!(out.status.success(), "stdout:\n{}\nstderr:\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("leaderboard of tiny-"), "{text}");
    assert!(text.contains("t000") && text.contains("t001"), "{text}");
    assert!(stderr(&out).contains("completed"), "{}", stderr(&out));
    // Both workers were stopped.
    let logs: Vec<_> = std::fs::read_dir(state.join("logs")).unwrap().collect();
    assert_eq!(logs.len(), 2);

    let (_coord, url) = coordinator(&state, &[]);
    let out = output(sweep().args(["list", "--coordinator", &url, "--output", "json"]));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert_eq!(json[0]["state"], "completed");
    assert_eq!(json[0]["counts"]["completed"], 2);
    assert_history_clean(&state);
}

#[test]
fn pretraining_shows_in_the_progress_and_the_finished_run_reads_from_its_state_dir() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let spec = TINY_SPEC.replace("epoch_split: [[1, 1], [2, 1]]", "epoch_split: [[1, 1]]")
        + "pretrain:\n  dataset: { kind: synthetic, classes: 4, train_per_class: 4, val_per_class: 2, image_size: 32, seed: 5 }\n  epochs: 2\n";
    let spec = write(dir.path(), "pre.yaml", &spec);
    let out = output(
        sweep()
            .arg("run")
            .arg(&spec)
            .args(["--workers", "1", "--threads", "1", "--tag", "pretrained", "--note", "own weights", "--state-dir"])
            .arg(&state),
    );
    assert!(out.status.success(), "stdout:\n{}\nstderr:\n{}", stdout(&out), stderr(&out));
    // The progress says what happens before the first epoch: pretraining, epoch by epoch.
    let progress = stderr(&out);
    for step in
        ["pretraining resnet18: 0/2 epochs", "pretraining resnet18: 1/2 epochs", "pretraining resnet18: 2/2 epochs"]
    {
        assert!(progress.contains(step), "{step} missing from\n{progress}");
    }
    // Read afterwards without a coordinator: the tag, the note, the trial's events.
    let list = stdout(&output(sweep().args(["list", "--tag", "pretrained", "-o", "json", "--state-dir"]).arg(&state)));
    let json: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(json[0]["note"], "own weights");
    let id = json[0]["id"].as_str().unwrap().to_string();
    let status = stdout(&output(sweep().args(["status", &id, "--state-dir"]).arg(&state)));
    assert!(status.contains("tags: pretrained") && status.contains("1/1 completed"), "{status}");
    assert_history_clean(&state);
}

#[test]
fn client_commands_without_a_coordinator_say_how_to_start_one() {
    let _bound = sweep_tests::bound(300);
    let out = output(sweep().args(["list", "--coordinator", "http://127.0.0.1:9"]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot reach the coordinator at http://127.0.0.1:9"), "{err}");
    assert!(err.contains("sweep coordinator"), "{err}");
    let out = output(sweep().args(["list", "--coordinator", "not a url"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a coordinator URL"), "{}", stderr(&out));
}

/// A spec of `trials` tiny trials (epoch splits 1+1, 1+2, …), each needing `devices` devices.
fn placement_spec(name: &str, trials: u32, devices: u32) -> String {
    let splits: Vec<String> = (1..=trials).map(|i| format!("[1, {i}]")).collect();
    format!(
        "name: {name}
dataset: {{ kind: synthetic, classes: 3, train_per_class: 6, val_per_class: 4, image_size: 32, seed: 1 }}
training: {{ batch_size: 4 }}
resources: {{ gpus_per_trial: {devices} }}
sharing: off
grid:
  backbone: [resnet18]
  lr_decay: [{{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }}]
  epoch_split: [{}]
",
        splits.join(", ")
    )
}

fn submit(url: &str, dir: &std::path::Path, file: &str, yaml: &str) -> String {
    let spec = write(dir, file, yaml);
    let out = output(sweep().args(["submit", "--coordinator", url]).arg(&spec));
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).lines().last().unwrap().trim().to_string()
}

fn status_json(url: &str, id: &str) -> Value {
    let out = output(sweep().args(["status", id, "--coordinator", url, "--output", "json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn wait_completed(url: &str, id: &str, dir: &std::path::Path, logs: &[&str]) -> Value {
    wait_for(Duration::from_secs(300), &format!("sweep {id} to complete"), || {
        let s = status_json(url, id);
        if s["state"] == "failed" {
            let logs: Vec<String> = logs
                .iter()
                .map(|l| std::fs::read_to_string(dir.join(format!("{l}.log"))).unwrap_or_default())
                .collect();
            panic!("sweep failed: {s:#}\nworker logs:\n{}", logs.join("\n"));
        }
        (s["state"] == "completed").then_some(s)
    })
}

#[test]
fn trials_run_on_disjoint_devices_and_a_trial_too_large_for_every_worker_is_unschedulable_until_one_fits() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    // A worker with two CPU slots (a fake two-device machine).
    let _two = worker_with(&url, "two", dir.path(), &["--devices", "cpu:0,cpu:1"]);
    let workers = wait_for(Duration::from_secs(30), "the worker to register", || {
        let out = output(sweep().args(["workers", "--coordinator", &url, "--output", "json"]));
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        (v.as_array().unwrap().len() == 1).then_some(v)
    });
    let ids: Vec<&str> = workers[0]["devices"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["cpu:0", "cpu:1"]);

    // Two one-device trials run at once, one per slot.
    let one = submit(&url, dir.path(), "one.yaml", &placement_spec("one", 2, 1));
    let s = wait_completed(&url, &one, dir.path(), &["two"]);
    let trials = s["trials"].as_array().unwrap();
    let devices: Vec<&Value> = trials.iter().map(|t| &t["devices"]).collect();
    assert_eq!(devices.len(), 2);
    assert!(devices.iter().all(|d| d.as_array().unwrap().len() == 1), "{devices:?}");
    assert_ne!(devices[0], devices[1], "the two trials share a device: {s:#}");
    let span = |t: &Value| (t["started_at_ms"].as_i64().unwrap(), t["finished_at_ms"].as_i64().unwrap());
    let ((a0, a1), (b0, b1)) = (span(&trials[0]), span(&trials[1]));
    assert!(a0 < b1 && b0 < a1, "the trials did not overlap in time: {s:#}");

    // A two-device trial trains data-parallel over both slots.
    let pair = submit(&url, dir.path(), "pair.yaml", &placement_spec("pair", 1, 2));
    let s = wait_completed(&url, &pair, dir.path(), &["two"]);
    assert_eq!(s["trials"][0]["devices"], serde_json::json!(["cpu:0", "cpu:1"]), "{s:#}");
    let board = output(sweep().args(["leaderboard", &pair, "--coordinator", &url, "--output", "json"]));
    let board: Value = serde_json::from_str(&stdout(&board)).unwrap();
    assert!(board[0]["best_val_accuracy"].as_f64().is_some(), "{board:#}");

    // Three devices: no registered worker can ever hold it — said, not waited on silently.
    let big = submit(&url, dir.path(), "big.yaml", &placement_spec("big", 1, 3));
    let s = status_json(&url, &big);
    assert_eq!(s["counts"]["unschedulable"], 1, "{s:#}");
    let t = &s["trials"][0];
    assert_eq!(t["state"], "unschedulable");
    let reason = t["error"].as_str().unwrap();
    assert!(reason.contains("needs 3 devices") && reason.contains("has 2"), "{reason}");
    let table = stdout(&output(sweep().args(["status", &big, "--coordinator", &url])));
    assert!(table.contains("1 unschedulable") && table.contains("needs 3 devices"), "{table}");

    // A worker large enough registers: the trial becomes schedulable and runs there.
    let _three = worker_with(&url, "three", dir.path(), &["--devices", "cpu:0,cpu:1,cpu:2"]);
    let s = wait_completed(&url, &big, dir.path(), &["two", "three"]);
    let t = &s["trials"][0];
    assert_eq!(t["devices"], serde_json::json!(["cpu:0", "cpu:1", "cpu:2"]), "{s:#}");
    assert!(t["error"].is_null(), "{s:#}");
    let out = output(sweep().args(["workers", "--coordinator", &url, "--output", "json"]));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let by_name = |n: &str| v.as_array().unwrap().iter().find(|w| w["name"] == n).unwrap()["worker"].clone();
    assert_eq!(t["worker"], by_name("three"));
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn worker_device_lists_and_the_allreduce_check_from_the_command_line() {
    let _bound = sweep_tests::bound(300);
    let worker = || std::process::Command::new(bin("sweep-worker"));
    let out = output(worker().args(["--devices", "cpu:0,cpu:1", "--list-devices"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let ids: Vec<&str> = text.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(ids, ["cpu:0", "cpu:1"]);
    for (list, says) in [
        ("gpu:0", "device `gpu:0` is not one of `cpu`, `cpu:N`, `cuda:N`"),
        ("cpu:0,cpu:0", "device `cpu:0` is listed twice"),
        ("cuda:7", "device `cuda:7` does not exist"),
    ] {
        let out = output(worker().args(["--devices", list, "--list-devices"]));
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&format!("--devices {list}: {says}")), "{}", stderr(&out));
    }
    // The in-process backend through the training code path: exact, with the ids as given.
    let out = output(worker().args([
        "allreduce-check",
        "--devices",
        "cpu:0,cpu:1,cpu:2",
        "--repetitions",
        "2",
        "-o",
        "json",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (r["backend"].as_str(), r["world_size"].as_u64(), r["ok"].as_bool()),
        (Some("cpu"), Some(3), Some(true))
    );
    assert_eq!(r["devices"], serde_json::json!(["cpu:0", "cpu:1", "cpu:2"]));
    assert!(r["buckets"].as_u64().unwrap() >= 2, "{r}");
    // No CUDA here: a clear error, not a panic.
    if !std::path::Path::new("/dev/nvidia0").exists() {
        let out = output(worker().args(["allreduce-check"]));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("no CUDA device"), "{}", stderr(&out));
    }
}
