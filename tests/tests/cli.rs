//! The CLI against a running coordinator: snapshots of what each command prints, `watch` live
//! and over a coordinator restart, `plot`, `export`, the config file, completions.
//!
//! The sweeps here are run by [`scripted_worker`], whose metrics depend only on the trial and
//! the epoch, so the output is the same every run but for sweep ids and clocks, which the
//! snapshots redact.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::util::*;

/// 2 backbones × 1 strategy × 2 splits: 4 trials of 2 and 3 epochs.
const CLI_SPEC: &str = "\
name: cli
dataset: { kind: synthetic, classes: 3, train_per_class: 6, val_per_class: 4, image_size: 32, seed: 1 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }]
  epoch_split: [[1, 1], [2, 1]]
";

/// Sweep ids (`cli-` and four hex digits, widths kept) and elapsed-time stamps.
fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.add_filter(r"cli-[0-9a-f]{4}", "cli-XXXX");
    s.add_filter(r"\[\s*\d+[hms0-9]*\] ", "[T] ");
    s.add_filter(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT");
    s.set_prepend_module_to_snapshot(false);
    s
}

fn run_ok(args: &[&str], url: &str) -> String {
    let out = output(sweep().args(args).env("SWEEP_COORDINATOR", url));
    assert!(out.status.success(), "sweep {args:?} failed: {}", stderr(&out));
    stdout(&out)
}

fn submit(url: &str, dir: &Path) -> String {
    let spec = write(dir, "cli.yaml", CLI_SPEC);
    let out = run_ok(&["submit", spec.to_str().unwrap()], url);
    out.lines().last().unwrap().trim().to_string()
}

#[test]
fn every_report_command_prints_what_the_snapshots_show() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, url) = coordinator(&dir.path().join("state"), &[]);
    let id = submit(&url, dir.path());
    assert_eq!(scripted_worker(&url, "w", 10).len(), 4);

    let s = settings();
    s.bind(|| {
        insta::assert_snapshot!("status", run_ok(&["status", &id], &url));
        insta::assert_snapshot!("leaderboard", run_ok(&["leaderboard", &id], &url));
        insta::assert_snapshot!("leaderboard_by_backbone", run_ok(&["leaderboard", &id, "--by", "backbone"], &url));
        insta::assert_snapshot!("leaderboard_csv", run_ok(&["leaderboard", &id, "--output", "csv"], &url));
        insta::assert_snapshot!(
            "leaderboard_by_backbone_csv",
            run_ok(&["leaderboard", &id, "--by", "backbone", "-o", "csv"], &url)
        );
        insta::assert_snapshot!("trial", run_ok(&["trial", &id, "t003"], &url));
        insta::assert_snapshot!("export_csv", run_ok(&["export", &id, "-o", "csv"], &url));
        // A sweep that has ended: watch shows where it stands and exits at once.
        insta::assert_snapshot!("watch_ended", run_ok(&["watch", &id], &url));
    });

    // JSON forms parse and agree with the tables.
    let v: serde_json::Value =
        serde_json::from_str(&run_ok(&["leaderboard", &id, "--by", "backbone", "-o", "json"], &url)).unwrap();
    assert_eq!(v[0]["backbone"], "resnet50");
    assert_eq!(v[0]["trials"], 2);
    assert_eq!(v[0]["wall_seconds"], 20.0);
    let export: serde_json::Value = serde_json::from_str(&run_ok(&["export", &id, "--output", "json"], &url)).unwrap();
    // The older flag names still work.
    assert_eq!(run_ok(&["export", &id, "--format", "json"], &url), run_ok(&["export", &id, "-o", "json"], &url));
    let epochs: usize =
        export["trials"].as_array().unwrap().iter().map(|t| t["metrics"].as_array().unwrap().len()).sum();
    assert_eq!(epochs, 2 + 3 + 2 + 3);
    // -f writes the file and says so on stderr, not stdout (--out, its older name, too).
    for flag in ["-f", "--out"] {
        let file = dir.path().join(format!("epochs{flag}.csv"));
        let out = output(sweep().args(["export", &id, flag]).arg(&file).env("SWEEP_COORDINATOR", &url));
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).is_empty());
        assert!(stderr(&out).contains("wrote 10 epochs of 4 trials"), "{}", stderr(&out));
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 11);
    }
    // `sweep best`: the top trial's best checkpoint path, alone; its entry as JSON.
    let board: serde_json::Value = serde_json::from_str(&run_ok(&["leaderboard", &id, "-o", "json"], &url)).unwrap();
    let best = run_ok(&["best", &id], &url);
    assert_eq!(best.trim_end(), board[0]["checkpoints"]["best"]["uri"].as_str().unwrap());
    let entry: serde_json::Value = serde_json::from_str(&run_ok(&["best", &id, "-o", "json"], &url)).unwrap();
    assert_eq!(entry, board[0]);
    // A trial's attempts are numbered from 1 within it (the id is the coordinator's).
    let t003: serde_json::Value = serde_json::from_str(&run_ok(&["trial", &id, "t003", "-o", "json"], &url)).unwrap();
    assert_eq!(t003["attempts"][0]["number"], 1);

    // `--state-dir`: the read commands read the state directory itself (a snapshot, here while
    // its coordinator runs), with the same output, and write nothing there.
    let state = dir.path().join("state");
    let files = |d: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let before = files(&state);
    let local = |args: &[&str]| {
        let out =
            output(sweep().args(args).arg("--state-dir").arg(&state).env("SWEEP_COORDINATOR", "http://127.0.0.1:9"));
        assert!(out.status.success(), "sweep {args:?} --state-dir failed: {}", stderr(&out));
        stdout(&out)
    };
    for args in [
        &["status", &id][..],
        &["status", &id, "-o", "json"],
        &["leaderboard", &id, "-o", "json"],
        &["leaderboard", &id, "--by", "backbone"],
        &["trial", &id, "t003", "-o", "json"],
        &["best", &id],
        &["export", &id, "-o", "csv"],
    ] {
        assert_eq!(local(args), run_ok(args, &url), "{args:?}");
    }
    assert!(local(&["list"]).contains(&id));
    // The resolved spec (defaults filled in) of the stored sweep, and of the file offline: the
    // same spec as the one submitted, every field written out.
    let resolved = local(&["status", &id, "--spec"]);
    assert_eq!(resolved, run_ok(&["status", &id, "--spec"], &url));
    let submitted = sweep_core::spec::parse(CLI_SPEC).unwrap();
    assert_eq!(sweep_core::spec::parse(&resolved).unwrap(), submitted, "{resolved}");
    assert!(resolved.contains("batch_size:") && resolved.contains("max_attempts:"), "{resolved}");
    let spec_file = dir.path().join("cli.yaml");
    let offline = run_ok(&["validate", spec_file.to_str().unwrap(), "--resolved"], &url);
    assert_eq!(offline, resolved);
    let table = run_ok(&["validate", spec_file.to_str().unwrap()], &url);
    assert!(table.contains("every default filled in") && table.contains(resolved.trim_end()), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&run_ok(&["status", &id, "--spec", "-o", "json"], &url)).unwrap();
    assert_eq!(json["submitted_spec"], CLI_SPEC);
    assert_eq!(json["resolved_spec"].as_str().unwrap(), resolved);
    assert_eq!(files(&state), before, "a read with --state-dir left files in the state directory");
    // A directory that is not there, or is no state directory, is an error naming it.
    for bad in [dir.path().join("missing"), dir.path().to_path_buf()] {
        let out = output(sweep().args(["status", &id, "--state-dir"]).arg(&bad));
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&bad.display().to_string()), "{}", stderr(&out));
    }

    // Two sweeps in one leaderboard: the same spec again (complete at once: every stage is
    // the first's), ranked together, each row naming its sweep.
    let again = submit(&url, dir.path());
    let both: serde_json::Value =
        serde_json::from_str(&run_ok(&["leaderboard", &id, &again, "-o", "json"], &url)).unwrap();
    let rows = both.as_array().unwrap();
    assert_eq!(rows.len(), 8);
    assert_eq!(rows.iter().filter(|r| r["sweep"] == id.as_str()).count(), 4);
    assert_eq!(rows.iter().map(|r| r["rank"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    // Equal trials tie; the first sweep given comes first.
    assert_eq!((rows[0]["sweep"].as_str(), rows[1]["sweep"].as_str()), (Some(id.as_str()), Some(again.as_str())));
    assert_eq!(rows[0]["best_val_accuracy"], rows[1]["best_val_accuracy"]);
    let table = run_ok(&["leaderboard", &id, &again], &url);
    assert!(table.contains(" SWEEP ") && table.contains(&again), "{table}");
    let csv = run_ok(&["leaderboard", &id, &again, "-o", "csv"], &url);
    assert!(csv.starts_with("rank,trial,") && csv.lines().next().unwrap().ends_with(",sweep"), "{csv}");
    assert_eq!(csv.lines().count(), 9, "{csv}");
    let out = output(sweep().args(["leaderboard", &id, &id]).env("SWEEP_COORDINATOR", &url));
    assert!(!out.status.success() && stderr(&out).contains("given twice"), "{}", stderr(&out));

    // Tags and notes: given at submission, changed later, shown by list and status, found by
    // `list --tag`; a bad one is refused before anything is sent, and changes nothing.
    let spec_path = dir.path().join("cli.yaml");
    let tagged = run_ok(
        &["submit", spec_path.to_str().unwrap(), "--tag", "baseline", "--tag", "cpu", "--note", "a first try"],
        &url,
    );
    let tagged = tagged.lines().last().unwrap().trim().to_string();
    let list = run_ok(&["list", "--tag", "baseline"], &url);
    assert!(list.contains(&tagged) && !list.contains(&id) && list.contains("baseline,cpu"), "{list}");
    assert!(run_ok(&["status", &tagged], &url).contains("tags: baseline, cpu\nnote: a first try"));
    let changed = run_ok(&["tag", &tagged, "--add", "resnet", "--remove", "cpu"], &url);
    assert!(changed.contains("tags: baseline, resnet"), "{changed}");
    run_ok(&["note", &tagged, "two\nlines"], &url);
    let json: serde_json::Value = serde_json::from_str(&run_ok(&["list", "-o", "json"], &url)).unwrap();
    let row = json.as_array().unwrap().iter().find(|s| s["id"] == tagged.as_str()).unwrap().clone();
    assert_eq!(
        (row["tags"].clone(), row["note"].clone()),
        (serde_json::json!(["baseline", "resnet"]), serde_json::json!("two\nlines"))
    );
    for bad in [
        &["tag", &tagged, "--add", "two words"][..],
        &["tag", &tagged],
        &["list", "--tag", "a;b"],
        &["note", &tagged, "\u{7}"],
    ] {
        let out = output(sweep().args(bad).env("SWEEP_COORDINATOR", &url));
        assert!(!out.status.success(), "{bad:?}");
        assert!(!stderr(&out).is_empty(), "{bad:?}");
    }
    assert!(run_ok(&["status", &tagged], &url).contains("tags: baseline, resnet\nnote: two\n      lines"));

    // A format a command does not have is refused by the parser, naming the choices.
    let out = output(sweep().args(["status", &id, "--output", "csv"]).env("SWEEP_COORDINATOR", &url));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("possible values: table, json"), "{}", stderr(&out));
    // Unknown sweeps are errors that say so.
    for cmd in [&["watch", "nope"][..], &["export", "nope"], &["plot", "nope", "--out", "x"]] {
        let out = output(sweep().args(cmd).env("SWEEP_COORDINATOR", &url));
        assert!(!out.status.success(), "{cmd:?}");
        assert!(stderr(&out).contains("nope"), "{cmd:?}: {}", stderr(&out));
    }
    // A stopped coordinator's directory (no write-ahead log left): read as it is, nothing
    // created beside the database.
    assert!(coord.terminate().success());
    let stopped = files(&state);
    assert_eq!(local(&["best", &id]), best);
    assert_eq!(files(&state), stopped, "a read with --state-dir left files in a quiet state directory");
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn a_trial_paused_then_stopped_early_shows_in_status_leaderboard_trial_and_watch() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    // The scripted worker runs t000 (2+3): at fine-tuning epoch 1 (rung 1, eta 2) it records
    // 0.30 + 0.08 × 3 = 0.54 and, alone there, pauses. Then t001 (1+3) reaches the rung at
    // epoch 2 with 0.30 + 0.16 + 0.01 = 0.47: t000 is the top 1 of 2, promoted, and with both
    // there the rung closes: t001 is stopped after epoch 2 of 4. t000 then runs on from its
    // resume point at the rung.
    let spec = write(
        dir.path(),
        "asha.yaml",
        &(CLI_SPEC
            .replace("backbone: [resnet18, resnet50]", "backbone: [resnet18]")
            .replace("epoch_split: [[1, 1], [2, 1]]", "epoch_split: [[2, 3], [1, 3]]")
            .replace("name: cli", "name: cli-asha")
            + "early_stopping: { strategy: asha, eta: 2 }\n"),
    );
    let id = run_ok(&["submit", spec.to_str().unwrap()], &url).lines().last().unwrap().trim().to_string();
    assert_eq!(scripted_worker(&url, "w", 10), vec!["t000", "t001", "t000"]);

    let status = run_ok(&["status", &id], &url);
    assert!(status.contains("1/2 completed, 1 stopped"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&run_ok(&["status", &id, "-o", "json"], &url)).unwrap();
    assert_eq!(json["state"], "completed");
    assert_eq!(json["counts"]["stopped"], 1);
    let board: serde_json::Value = serde_json::from_str(&run_ok(&["leaderboard", &id, "-o", "json"], &url)).unwrap();
    assert_eq!(board[1]["trial"], "t001");
    assert_eq!(board[1]["state"], "stopped");
    let trial = run_ok(&["trial", &id, "t001"], &url);
    assert!(trial.contains("stopped by ASHA at fine-tuning epoch 1"), "{trial}");
    let watch = run_ok(&["watch", &id], &url);
    assert!(watch.contains("1 stopped"), "{watch}");
    let t000 = run_ok(&["trial", &id, "t000"], &url);
    assert!(t000.contains("— completed") && t000.contains("paused at epoch 3 (an ASHA rung)"), "{t000}");
    assert_history_clean(&dir.path().join("state"));
}

/// PNG width and height from the IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn plot_writes_a_figure_per_trial_and_one_per_backbone() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    let id = submit(&url, dir.path());
    // Before any epoch there is nothing to draw.
    let out = output(sweep().args(["plot", &id, "--out"]).arg(dir.path().join("p")).env("SWEEP_COORDINATOR", &url));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no finished epochs yet"), "{}", stderr(&out));
    scripted_worker(&url, "w", 10);
    let plots = dir.path().join("plots");
    let listed = run_ok(&["plot", &id, "--out", plots.to_str().unwrap()], &url);
    let files: Vec<&str> = listed.lines().collect();
    assert_eq!(files.len(), 5, "{listed}");
    for t in ["t000", "t001", "t002", "t003"] {
        assert_eq!(png_size(&plots.join(format!("{t}.png"))), (1200, 480));
    }
    let (w, h) = png_size(&plots.join("backbones.png"));
    assert!(w >= 640 && h == 560, "{w}x{h}");
}

#[test]
fn watch_follows_a_sweep_to_its_end_across_a_coordinator_restart() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let listen = format!("127.0.0.1:{}", free_port());
    let (mut coord, url) = coordinator_at(&state, &listen, &["--heartbeat-ttl", "2", "--lease-grace", "2"]);
    let id = submit(&url, dir.path());
    let log = dir.path().join("watch.log");
    let mut watch = Command::new(bin("sweep"))
        .args(["watch", &id, "--coordinator", &url])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let seen = |what: &str| std::fs::read_to_string(&log).unwrap_or_default().contains(what);
    wait_for(Duration::from_secs(20), "watch to connect", || seen("following sweep").then_some(()));
    assert_eq!(scripted_worker(&url, "a", 2).len(), 2);
    wait_for(Duration::from_secs(20), "watch to show the first two trials", || {
        seen("[2/4 completed, 2 pending]").then_some(())
    });
    coord.child.kill().unwrap();
    coord.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (_coord, url2) = coordinator_at(&state, &listen, &["--heartbeat-ttl", "2", "--lease-grace", "2"]);
    assert_eq!(url2, url);
    assert_eq!(scripted_worker(&url, "b", 10).len(), 2);
    let status = wait_for(Duration::from_secs(60), "watch to exit", || watch.try_wait().unwrap());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("reconnect"), "{text}");
    // Every epoch of every trial exactly once, though the stream broke in between.
    for (t, n) in [("t000", 2), ("t001", 3), ("t002", 2), ("t003", 3)] {
        for e in 1..=n {
            let line = format!("{t}  epoch {e}/{n} ");
            assert_eq!(text.matches(&line).count(), 1, "{line:?} in\n{text}");
        }
    }
    assert!(text.trim_end().ends_with("completed: 4/4 completed"), "{text}");
}

#[test]
fn on_a_terminal_watch_draws_progress_bars_and_submit_watch_follows_what_it_submitted() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    let spec = write(dir.path(), "cli.yaml", CLI_SPEC);
    // `script` gives the command a pseudo-terminal and records what it drew.
    let typescript = dir.path().join("tty.log");
    let command = format!("{} submit {} --watch --coordinator {url}", bin("sweep").display(), spec.display());
    let mut tty = Command::new("script")
        .args(["-qfec", &command])
        .arg(&typescript)
        .env("COLUMNS", "140")
        .stdout(Stdio::null())
        .spawn()
        .expect("script(1) from util-linux");
    let id = wait_for(Duration::from_secs(20), "the sweep to be submitted", || {
        let text = std::fs::read_to_string(&typescript).unwrap_or_default();
        text.split_whitespace().find(|w| w.starts_with("cli-")).map(str::to_string)
    });
    scripted_worker(&url, "w", 10);
    let status = wait_for(Duration::from_secs(60), "submit --watch to exit", || tty.try_wait().unwrap());
    let drawn = std::fs::read_to_string(&typescript).unwrap();
    assert!(status.success(), "{drawn}");
    assert!(drawn.contains(&format!("sweep {id} ·")), "the header: {drawn}");
    assert!(drawn.contains("epochs"), "the sweep's bar: {drawn}");
    assert!(drawn.contains("\u{1b}["), "terminal control sequences: {drawn}");
    assert!(drawn.contains(&format!("sweep {id} completed: 4/4 completed")), "{drawn}");
}

#[test]
fn settings_come_from_flags_then_the_environment_then_the_config_file() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    let id = submit(&url, dir.path());
    let config = write(dir.path(), "config.toml", &format!("coordinator = \"{url}\"\noutput = \"json\"\n"));
    let bad = "http://127.0.0.1:9";
    let list = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = sweep();
        c.arg("list").args(extra).env_remove("SWEEP_COORDINATOR").env_remove("SWEEP_OUTPUT");
        for (k, v) in env {
            c.env(k, v);
        }
        output(&mut c)
    };
    let cfg = config.to_str().unwrap();
    // The file alone: its coordinator, its output format.
    let out = list(&["--config", cfg], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    // $SWEEP_CONFIG finds it too; the environment beats it; a flag beats the environment.
    let out = list(&[], &[("SWEEP_CONFIG", cfg), ("SWEEP_OUTPUT", "table")]);
    assert!(stdout(&out).contains("SWEEP") && stdout(&out).contains(&id), "{}", stdout(&out));
    let out = list(&[], &[("SWEEP_CONFIG", cfg), ("SWEEP_COORDINATOR", bad)]);
    assert!(!out.status.success() && stderr(&out).contains("127.0.0.1:9"), "{}", stderr(&out));
    let out = list(&["--coordinator", &url], &[("SWEEP_CONFIG", cfg), ("SWEEP_COORDINATOR", bad)]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Mistakes in the file stop the command before it does anything, naming file, line, key.
    let typo = write(dir.path(), "typo.toml", "output = \"json\"\ncoordnator = \"x\"\n");
    let out = list(&["--config", typo.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(e.contains("typo.toml:2:1") && e.contains("unknown key `coordnator`"), "{e}");
    let out = list(&["--config", dir.path().join("missing.toml").to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
}

#[test]
fn completions_and_help_examples() {
    let _bound = sweep_tests::bound(300);
    let out = output(sweep().args(["completions", "bash"]));
    assert!(out.status.success());
    let bash = stdout(&out);
    assert!(bash.contains("complete -F") && bash.contains("leaderboard") && bash.contains("--by"), "{bash}");
    let zsh = stdout(&output(sweep().args(["completions", "zsh"])));
    assert!(zsh.starts_with("#compdef sweep"), "{zsh}");
    assert!(stdout(&output(sweep().args(["completions", "fish"]))).contains("complete -c sweep"));
    let out = output(sweep().args(["completions", "tcsh"]));
    assert!(!out.status.success() && stderr(&out).contains("possible values"), "{}", stderr(&out));
    for cmd in ["watch", "leaderboard", "export", "plot", "completions"] {
        let help = stdout(&output(sweep().args([cmd, "--help"])));
        assert!(help.contains("Example"), "sweep {cmd} --help has no examples:\n{help}");
    }
    // A closed pipe ends a printing command quietly, as SIGPIPE would (`sweep … | head`):
    // `validate` of a spec of 2,000 trials prints about twice what a pipe holds (64 KiB).
    let dir = tempfile::tempdir().unwrap();
    let lrs: Vec<String> =
        (1..=200).map(|i| format!("    - {{ strategy: exponential, head_lr: {i}.0e-4, factor: 3 }}")).collect();
    let big = CLI_SPEC
        .replace(
            "  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }]\n",
            &format!("  lr_decay:\n{}\n", lrs.join("\n")),
        )
        .replace("[[1, 1], [2, 1]]", "[[1, 1], [2, 1], [3, 1], [1, 2], [2, 2]]");
    let spec = write(dir.path(), "big.yaml", &big);
    let out = output(Command::new("bash").args([
        "-c",
        &format!("set -o pipefail; {} validate {} | head -n 1 >/dev/null", bin("sweep").display(), spec.display()),
    ]));
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "no panic message: {}", stderr(&out));
    let help = stdout(&output(sweep().arg("--help")));
    for word in ["submit", "watch", "leaderboard", "export", "plot", "completions", "config"] {
        assert!(help.contains(word), "sweep --help does not mention {word}:\n{help}");
    }
}

#[test]
fn check_state_prints_violations_and_exits_1_and_2_for_an_unreadable_state() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coord, url) = coordinator(&state, &[]);
    submit(&url, dir.path());
    assert_eq!(scripted_worker(&url, "w", 10).len(), 4);
    let check = |extra: &[&str]| output(sweep().args(["check-state", "--state-dir"]).arg(&state).args(extra));
    let out = check(&[]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("0 violations in 1 sweeps, 4 trials, 4 attempts"), "{}", stdout(&out));

    // One violation whatever the clock did: an attempt holds its own device twice.
    let python = Command::new(venv_bin("python"))
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute(\"update attempts set devices = 'cpu:0,cpu:0' where id = (select min(id) from attempts)\"); c.commit()",
        )
        .arg(state.join("sweep.db"))
        .status()
        .unwrap();
    assert!(python.success());
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("1 violation in") && stdout(&out).contains("device-overlap: worker w1"),
        "{}",
        stdout(&out)
    );
    let out = check(&["--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["violations"][0]["rule"], "device-overlap");
    assert_eq!(json["attempts"], 4);

    let out = output(sweep().args(["check-state", "--state-dir", "/no/such/dir"]));
    assert_eq!(out.status.code(), Some(2), "an unreadable state is neither clean nor broken");
    assert!(stderr(&out).contains("/no/such/dir/sweep.db"));
    assert!(!Path::new("/no/such/dir").exists());
}
