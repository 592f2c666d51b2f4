//! The breaks found by attacking `sweep` (issue 10), each reproduced with real processes: a
//! damaged or shared state directory, a bad spec against the fleet, a dataset no worker can
//! hold, slow connections against the probes, a coordinator that sends paths, names that steer
//! the terminal, and `sweep run` into a closed pipe.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sweep_proto::v1;

use super::util::*;

fn run(args: &[&str], url: &str) -> std::process::Output {
    output(sweep().args(args).env("SWEEP_COORDINATOR", url))
}

fn run_ok(args: &[&str], url: &str) -> String {
    let out = run(args, url);
    assert!(out.status.success(), "sweep {args:?} failed: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

fn submit(url: &str, dir: &Path, name: &str, yaml: &str) -> String {
    let spec = write(dir, name, yaml);
    run_ok(&["submit", spec.to_str().unwrap()], url).lines().last().unwrap().trim().to_string()
}

fn json(args: &[&str], url: &str) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    serde_json::from_str(&run_ok(&all, url)).expect("JSON output")
}

fn wait_state(url: &str, id: &str, timeout: Duration, logs: &[&Path]) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = json(&["status", id], url);
        let state = status["state"].as_str().unwrap_or_default().to_string();
        if matches!(state.as_str(), "completed" | "failed" | "cancelled") {
            return status;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect();
            panic!("sweep {id} still {state} after {timeout:?}: {status}\n{}", logs.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn kill9(p: &mut Proc) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

fn size(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// Starts `sweep coordinator` on `state` expecting it to refuse; returns what it said.
fn refused_start(state: &Path, extra: &[&str]) -> String {
    let out = output(
        sweep()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(extra)
            .stdin(Stdio::null()),
    );
    assert!(!out.status.success(), "the coordinator started on {}: {}", state.display(), stdout(&out));
    stderr(&out)
}

#[test]
fn a_damaged_state_directory_stops_the_coordinator_naming_the_file_and_keeping_the_log() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut coord, url) = coordinator(&state, &[]);
    let ids: Vec<String> = (0..3).map(|i| submit(&url, dir.path(), &format!("s{i}.yaml"), TINY_SPEC)).collect();
    // Killed: everything acknowledged is in the write-ahead log.
    kill9(&mut coord);
    let wal = state.join("sweep.db-wal");
    let logged = std::fs::read(&wal).expect("a write-ahead log after kill -9");
    assert!(!logged.is_empty());
    let db = std::fs::read(state.join("sweep.db")).unwrap();

    // The database is gone, the log is there: refused, naming both; the log untouched.
    std::fs::remove_file(state.join("sweep.db")).unwrap();
    let said = refused_start(&state, &[]);
    assert!(said.contains("sweep.db is missing") && said.contains("sweep.db-wal"), "{said}");
    assert_eq!(std::fs::read(&wal).unwrap(), logged, "the log was rewritten");
    assert!(!state.join("sweep.db").exists(), "an empty database was made in its place");
    // A database of 0 bytes beside it: refused too.
    std::fs::write(state.join("sweep.db"), b"").unwrap();
    let said = refused_start(&state, &[]);
    assert!(said.contains("is empty (0 bytes)") && said.contains("nothing was changed"), "{said}");
    assert_eq!(std::fs::read(&wal).unwrap(), logged);
    // `sweep run` on it refuses the same way.
    let spec = write(dir.path(), "run.yaml", TINY_SPEC);
    let out = output(sweep().args(["run", spec.to_str().unwrap(), "--workers", "1", "--state-dir"]).arg(&state));
    assert!(!out.status.success() && stderr(&out).contains("is empty (0 bytes)"), "{}", stderr(&out));

    // The database put back: every sweep is there.
    std::fs::write(state.join("sweep.db"), &db).unwrap();
    let (_coord, url) = coordinator(&state, &[]);
    let listed = json(&["list"], &url);
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| listed.contains(&id.as_str())), "{listed:?}");
    assert_history_clean(&state);

    // An unrelated database is never adopted.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let python = Command::new(venv_bin("python"))
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table notes(t)'); c.commit()")
        .arg(foreign.join("sweep.db"))
        .status()
        .unwrap();
    assert!(python.success());
    let before = std::fs::read(foreign.join("sweep.db")).unwrap();
    let said = refused_start(&foreign, &[]);
    assert!(said.contains("not a sweep state database") && said.contains("notes"), "{said}");
    assert_eq!(std::fs::read(foreign.join("sweep.db")).unwrap(), before);
}

#[test]
fn one_coordinator_serves_a_state_directory_and_a_clean_stop_leaves_it_whole_in_sweep_db() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut coord, url) = coordinator(&state, &[]);
    let ids: Vec<String> = (0..3).map(|i| submit(&url, dir.path(), &format!("s{i}.yaml"), TINY_SPEC)).collect();

    // A second coordinator, and `sweep run`, on the same directory are refused, saying why.
    let said = refused_start(&state, &[]);
    assert!(said.contains("is in use by another coordinator") && said.contains("pid"), "{said}");
    let spec = write(dir.path(), "run.yaml", TINY_SPEC);
    let out = output(sweep().args(["run", spec.to_str().unwrap(), "--workers", "1", "--state-dir"]).arg(&state));
    assert!(!out.status.success() && stderr(&out).contains("in use by another coordinator"), "{}", stderr(&out));

    // A backup of the live state: consistent and checked.
    let copy = dir.path().join("backup.db");
    let out = output(sweep().args(["backup", "--state-dir"]).arg(&state).arg(&copy));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("0 violations in 3 sweeps, 6 trials"), "{}", stdout(&out));

    // SIGTERM: the log is checkpointed into sweep.db, which alone then holds everything.
    assert!(coord.terminate().success());
    assert_eq!(size(&state.join("sweep.db-wal")).unwrap_or(0), 0, "the log still holds state");
    for (what, file) in [("sweep.db alone", state.join("sweep.db")), ("the backup", copy)] {
        let alone = dir.path().join(what.replace(' ', "-"));
        std::fs::create_dir_all(&alone).unwrap();
        std::fs::copy(&file, alone.join("sweep.db")).unwrap();
        let out = output(sweep().args(["check-state", "--state-dir"]).arg(&alone));
        assert!(stdout(&out).contains("0 violations in 3 sweeps"), "{what}: {}", stdout(&out));
        let (_c, url) = coordinator(&alone, &[]);
        let listed = json(&["list"], &url);
        assert_eq!(listed.as_array().unwrap().len(), 3, "{what}");
        assert!(ids.iter().all(|id| listed.to_string().contains(id.as_str())));
    }
}

#[test]
fn a_bad_spec_fails_its_trials_without_quarantining_the_fleet() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coord, url) = coordinator(&state, &["--quarantine-after", "2"]);
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let _a = worker(&url, "a", dir.path());
    let _b = worker(&url, "b", dir.path());
    // Both registered before the bad sweep (on a loaded machine one may start late, and would
    // then be absent from the list below rather than active).
    wait_for(Duration::from_secs(60), "both workers registered", || {
        (json(&["workers"], &url).as_array().map_or(0, Vec::len) == 2).then_some(())
    });
    // A typo in the dataset root: every one of its 6 trials fails at once, permanently.
    let typo = "\
name: typo
dataset: { kind: image_folder, root: /data/flowerz, image_size: 32 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }, { strategy: exponential }]
  epoch_split: [[1, 1], [2, 1], [1, 2]]
";
    let bad = submit(&url, dir.path(), "typo.yaml", typo);
    let status = wait_state(&url, &bad, Duration::from_secs(120), &[&logs[0], &logs[1]]);
    assert_eq!(status["state"], "failed");
    assert!(
        status["trials"].as_array().unwrap().iter().all(|t| t["error"].as_str().unwrap().contains("/data/flowerz"))
    );
    // Nothing about the workers: both stay active and run the next sweep.
    let workers = json(&["workers"], &url);
    let states: Vec<&str> = workers.as_array().unwrap().iter().map(|w| w["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["active", "active"], "{workers}");
    let good = submit(&url, dir.path(), "good.yaml", TINY_SPEC);
    let status = wait_state(&url, &good, Duration::from_secs(240), &[&logs[0], &logs[1]]);
    assert_eq!(status["state"], "completed");
    assert_history_clean(&state);
}

#[test]
fn a_dataset_too_large_for_a_worker_fails_its_trial_and_the_worker_lives_on() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coord, url) = coordinator(&state, &["--quarantine-after", "1"]);
    // `validate` (and so submit) refuses what no worker could hold.
    let huge = TINY_SPEC.replace("classes: 3, train_per_class: 6", "classes: 100000, train_per_class: 1000000");
    let spec = write(dir.path(), "huge.yaml", &huge);
    let out = run(&["validate", spec.to_str().unwrap()], &url);
    assert!(!out.status.success() && stderr(&out).contains("GiB of every worker's memory"), "{}", stderr(&out));
    let out = run(&["submit", spec.to_str().unwrap()], &url);
    assert!(!out.status.success() && stderr(&out).contains("huge.yaml:2:"), "{}", stderr(&out));

    // One that passes but is more than this worker may hold (1 MiB here): the trial fails
    // permanently with what it needs; the worker neither dies nor is quarantined.
    let log = dir.path().join("small.log");
    let artifacts = dir.path().join("artifacts");
    let mut w = worker_in(
        &url,
        "small",
        dir.path(),
        artifacts.to_str().unwrap(),
        &dir.path().join("cache"),
        &["--memory-limit", "1M"],
        &[],
    );
    let big = TINY_SPEC
        .replace(
            "classes: 3, train_per_class: 6, val_per_class: 4",
            "classes: 10, train_per_class: 40, val_per_class: 10",
        )
        .replace("epoch_split: [[1, 1], [2, 1]]", "epoch_split: [[1, 1]]");
    let id = submit(&url, dir.path(), "big.yaml", &big);
    let status = wait_state(&url, &id, Duration::from_secs(60), &[&log]);
    let error = status["trials"][0]["error"].as_str().unwrap().to_string();
    assert_eq!(status["trials"][0]["state"], "failed");
    assert!(error.contains("1.5 MiB") && error.contains("this worker has 1.0 MiB"), "{error}");
    assert!(w.child.try_wait().unwrap().is_none(), "the worker died");
    let small = TINY_SPEC
        .replace("classes: 3, train_per_class: 6, val_per_class: 4", "classes: 2, train_per_class: 4, val_per_class: 2")
        .replace("epoch_split: [[1, 1], [2, 1]]", "epoch_split: [[1, 1]]");
    let id = submit(&url, dir.path(), "small.yaml", &small);
    assert_eq!(wait_state(&url, &id, Duration::from_secs(120), &[&log])["state"], "completed");
    assert_eq!(json(&["workers"], &url)[0]["state"], "active");
    assert_history_clean(&state);
}

/// Opens `n` connections to `addr` that never finish a request (half of them send half a line).
fn slowloris(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .map(|i| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            if i % 2 == 0 {
                let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ");
            }
            c
        })
        .collect()
}

/// `GET /healthz` answered within two seconds.
fn probe(addr: &str) {
    let started = Instant::now();
    let (status, body) = http_get(addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "the probe took {:?}", started.elapsed());
}

#[test]
fn idle_connections_never_starve_the_health_probes_of_coordinator_and_worker() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--metrics-listen", &metrics]);
    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let artifacts = dir.path().join("artifacts");
    let _w = worker_in(
        &url,
        "w",
        dir.path(),
        artifacts.to_str().unwrap(),
        &dir.path().join("cache"),
        &["--metrics-listen", &worker_metrics],
        &[],
    );
    wait_for(Duration::from_secs(60), "the worker's metrics port", || {
        std::net::TcpStream::connect(&worker_metrics).ok()
    });
    for addr in [&metrics, &worker_metrics] {
        probe(addr);
        // More idle connections than the endpoint serves at once, and more than once over.
        let held = slowloris(addr, 200);
        for _ in 0..5 {
            probe(addr);
        }
        let more = slowloris(addr, 200);
        probe(addr);
        drop((held, more));
    }
}

#[test]
fn names_and_messages_that_would_steer_a_terminal_are_printed_escaped() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    let id = submit(&url, dir.path(), "tiny.yaml", TINY_SPEC);
    // A worker named with escapes (colour, a window title, a bidi override) fails a trial
    // with a message full of them.
    let evil = "\u{1b}[31mred\u{1b}]0;pwned\u{7}\u{202e}";
    let mut w = TestWorker::register(&url, evil, evil, evil);
    let a = w.acquire(1000).unwrap();
    w.fail(a.attempt_id, v1::ErrorClass::Permanent, &format!("boom {evil}\nsecond line"));
    for args in [vec!["workers"], vec!["status", &id], vec!["trial", &id, a.trial_id.as_str()]] {
        let out = run_ok(&args, &url);
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}') && !out.contains('\u{202e}'), "{args:?}: {out:?}");
        assert!(out.contains("\\x1b[31m") || out.contains("\\x1b]0;"), "{args:?} shows the escapes: {out}");
    }
    // JSON keeps the exact text (escaped the JSON way).
    let workers = json(&["workers"], &url);
    assert_eq!(workers[0]["name"], evil);
    // An error message quoting a name the user typed is escaped too.
    let out = run(&["status", "\u{1b}[2Jnope"], &url);
    assert!(!stderr(&out).contains('\u{1b}') && stderr(&out).contains("\\x1b[2Jnope"), "{}", stderr(&out));
}

/// The worker processes whose command line mentions `marker` (a path unique to a test).
fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("sweep-worker") && cmdline.contains(marker) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn sweep_run_into_a_closed_pipe_leaves_no_worker_behind() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("piped-state");
    let spec = write(dir.path(), "tiny.yaml", TINY_SPEC);
    // `sweep run … 2>&1 | head -n 1`: the reader goes away after one line.
    let mut child = sweep()
        .args(["run", spec.to_str().unwrap(), "--workers", "2", "--state-dir"])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = state.display().to_string();
    let mut first = String::new();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    reader.read_line(&mut first).unwrap();
    assert!(first.contains("trials of `tiny`"), "{first}");
    wait_for(Duration::from_secs(30), "the workers to start", || (processes_with(&marker).len() == 2).then_some(()));
    drop(reader);
    drop(child.stdout.take());
    // The next line it writes hits the closed pipe: it ends, and its workers with it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "sweep run did not end on a closed pipe");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    wait_for(Duration::from_secs(30), "the workers of the ended `sweep run` to exit", || {
        processes_with(&marker).is_empty().then_some(())
    });
    // Killed outright (SIGKILL, no chance to clean up): the workers still go.
    let mut child = sweep()
        .args(["run", spec.to_str().unwrap(), "--workers", "1", "--state-dir"])
        .arg(dir.path().join("killed-state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = dir.path().join("killed-state").display().to_string();
    wait_for(Duration::from_secs(30), "the worker to start", || (processes_with(&marker).len() == 1).then_some(()));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(Duration::from_secs(30), "the worker of the killed `sweep run` to exit", || {
        processes_with(&marker).is_empty().then_some(())
    });
}

// ---------------------------------------------------------------------------------------------
// A coordinator that lies
// ---------------------------------------------------------------------------------------------

/// What the rogue coordinator heard back.
#[derive(Default)]
struct Heard {
    reports: Vec<v1::ReportEpochRequest>,
    finishes: Vec<v1::FinishAttemptRequest>,
}

/// A WorkerService that hands out assignments whose ids are paths.
struct Rogue {
    queue: Mutex<Vec<v1::Assignment>>,
    heard: Arc<Mutex<Heard>>,
}

#[tonic::async_trait]
impl v1::worker_service_server::WorkerService for Rogue {
    async fn register(
        &self,
        _r: tonic::Request<v1::RegisterRequest>,
    ) -> Result<tonic::Response<v1::RegisterResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::RegisterResponse {
            worker_id: "w1".into(),
            incarnation: 1,
            heartbeat_ttl_ms: 10_000,
            session: "ab".repeat(32),
        }))
    }
    async fn heartbeat(
        &self,
        _r: tonic::Request<v1::HeartbeatRequest>,
    ) -> Result<tonic::Response<v1::HeartbeatResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::HeartbeatResponse::default()))
    }
    async fn acquire_trial(
        &self,
        _r: tonic::Request<v1::AcquireTrialRequest>,
    ) -> Result<tonic::Response<v1::AcquireTrialResponse>, tonic::Status> {
        let next = self.queue.lock().unwrap().pop();
        if next.is_none() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(tonic::Response::new(v1::AcquireTrialResponse { assignment: next }))
    }
    async fn report_epoch(
        &self,
        r: tonic::Request<v1::ReportEpochRequest>,
    ) -> Result<tonic::Response<v1::ReportEpochResponse>, tonic::Status> {
        self.heard.lock().unwrap().reports.push(r.into_inner());
        Ok(tonic::Response::new(v1::ReportEpochResponse::default()))
    }
    async fn finish_attempt(
        &self,
        r: tonic::Request<v1::FinishAttemptRequest>,
    ) -> Result<tonic::Response<v1::FinishAttemptResponse>, tonic::Status> {
        self.heard.lock().unwrap().finishes.push(r.into_inner());
        Ok(tonic::Response::new(v1::FinishAttemptResponse {}))
    }
    async fn report_progress(
        &self,
        _r: tonic::Request<v1::ReportProgressRequest>,
    ) -> Result<tonic::Response<v1::ReportProgressResponse>, tonic::Status> {
        Ok(tonic::Response::new(v1::ReportProgressResponse::default()))
    }
}

fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(all_files(&p));
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn ids_from_a_rogue_coordinator_never_become_paths_on_the_worker() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let artifacts = dir.path().join("store").join("artifacts");
    // What the worker would have removed or written through `../..` (its scratch folder and
    // its store are two and one levels below).
    let victims = [cache.join("victim-t000-a1"), dir.path().join("store").join("victim"), dir.path().join("victim")];
    for v in &victims {
        std::fs::create_dir_all(v).unwrap();
        std::fs::write(v.join("precious.txt"), b"keep me").unwrap();
    }
    let spec = TINY_SPEC.replace("epoch_split: [[1, 1], [2, 1]]", "epoch_split: [[1, 1]]");
    let assignment = |attempt_id: u64, sweep_id: &str, trial_id: &str| v1::Assignment {
        attempt_id,
        sweep_id: sweep_id.into(),
        trial_id: trial_id.into(),
        trial_index: 0,
        spec_yaml: spec.clone(),
        backbone: "resnet18".into(),
        lr_decay: Some(v1::LrDecay { strategy: "exponential".into(), head_lr: 1e-3, factor: 3.0, final_lr: 0.0 }),
        fe_epochs: 1,
        ft_epochs: 1,
        attempt_number: 1,
        devices: vec!["cpu:0".into()],
        resume: None,
        sharing: true,
    };
    let heard = Arc::new(Mutex::new(Heard::default()));
    let rogue = Rogue {
        // Popped from the end: the bad sweep id first, then the bad trial id.
        queue: Mutex::new(vec![assignment(2, "ok-0001", "../../victim"), assignment(1, "../../victim", "t000")]),
        heard: heard.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("http://{addr}");
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(v1::worker_service_server::WorkerServiceServer::new(rogue))
            .serve(addr),
    );
    let log = dir.path().join("w.log");
    let _w = worker_in(&url, "w", dir.path(), artifacts.to_str().unwrap(), &cache, &[], &[]);
    let finishes = wait_for(Duration::from_secs(60), "both attempts to be finished", || {
        let h = heard.lock().unwrap();
        (h.finishes.len() == 2).then(|| h.finishes.clone())
    });
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    for f in &finishes {
        assert_eq!(f.outcome, v1::Outcome::Failed as i32, "{f:?}\n{log}");
        assert_eq!(f.error_class, v1::ErrorClass::Permanent as i32, "{f:?}");
        assert!(f.message.contains("which are not ids") && f.message.contains("nothing was written"), "{}", f.message);
    }
    assert!(heard.lock().unwrap().reports.is_empty(), "it trained and reported");
    for v in &victims {
        assert_eq!(std::fs::read(v.join("precious.txt")).unwrap(), b"keep me", "{} was touched", v.display());
    }
    // Nothing was written outside the store and the cache.
    let outside: Vec<PathBuf> = all_files(dir.path())
        .into_iter()
        .filter(|p| !p.starts_with(&artifacts) && !p.starts_with(&cache) && !p.ends_with("w.log"))
        .filter(|p| !victims.iter().any(|v| p.starts_with(v)) && p.file_name().is_some_and(|n| n != "store"))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
}

#[test]
fn many_workers_with_many_long_named_devices_still_list_in_pages() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    // 60 registrations of 1,024 devices with 200-character names: about 17 MB of workers, far
    // over what one reply may carry (a single reply made `sweep workers` fail for good).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = v1::worker_service_client::WorkerServiceClient::connect(url.clone()).await.unwrap();
        for i in 0..60 {
            let devices = (0..1024)
                .map(|d| v1::Device {
                    id: format!("cuda:{d}"),
                    kind: "cuda".into(),
                    name: format!("{i:03}{}", "n".repeat(197)),
                    memory_bytes: 80 << 30,
                })
                .collect();
            let name = format!("big-{i:02}-{}", "x".repeat(300));
            c.register(v1::RegisterRequest { name, devices, version: "v".repeat(1000) }).await.unwrap();
        }
    });
    // One reply holds a bounded page (it held all of them: at 240 such workers, more than any
    // client decodes), and says where to go on.
    let page = rt.block_on(async {
        let c = v1::sweep_service_client::SweepServiceClient::connect(url.clone()).await.unwrap();
        c.max_decoding_message_size(usize::MAX)
            .list_workers(v1::ListWorkersRequest::default())
            .await
            .unwrap()
            .into_inner()
    });
    use prost::Message;
    assert!(page.encoded_len() < 3 << 20, "one reply of {} bytes", page.encoded_len());
    assert!(!page.next_page_token.is_empty() && page.workers.len() < 60, "{} workers", page.workers.len());
    let workers = json(&["workers"], &url);
    let workers = workers.as_array().unwrap();
    assert_eq!(workers.len(), 60);
    assert!(workers.iter().all(|w| w["devices"].as_array().unwrap().len() == 1024));
    assert!(workers.iter().all(|w| w["name"].as_str().unwrap().chars().count() <= 200), "names are cut");
    let table = run_ok(&["workers"], &url);
    assert!(table.lines().count() >= 60);
    // `sweep list` pages too.
    for i in 0..3 {
        submit(&url, dir.path(), &format!("s{i}.yaml"), TINY_SPEC);
    }
    assert_eq!(json(&["list"], &url).as_array().unwrap().len(), 3);
    assert_eq!(json(&["list", "--limit", "2"], &url).as_array().unwrap().len(), 2);
}

#[test]
fn absurd_metrics_are_refused_and_plotting_never_spins_on_what_an_older_state_holds() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut coord, url) = coordinator(&state, &[]);
    let id = submit(&url, dir.path(), "tiny.yaml", TINY_SPEC);
    assert_eq!(scripted_worker(&url, "w", 10).len(), 2);
    // On the wire: an infinite or absurd loss is refused. (`sharing: off`: the same spec would
    // otherwise start from what the first sweep stored, and be complete at once.)
    let other = submit(&url, dir.path(), "other.yaml", &format!("{TINY_SPEC}sharing: off\n"));
    let mut w = TestWorker::register(&url, "w2", "t", "t");
    let a = w.acquire(1000).unwrap();
    let refused: Vec<tonic::Code> = [(f64::INFINITY, 1.0), (1.7e308, 1.0), (0.5, f64::INFINITY)]
        .into_iter()
        .map(|(train_loss, seconds)| {
            let m = v1::EpochMetrics {
                epoch: 1,
                phase: "feature_extraction".into(),
                train_loss,
                val_loss: 0.5,
                seconds,
                ..Default::default()
            };
            w.report(a.attempt_id, m)
        })
        .collect();
    assert_eq!(refused, [tonic::Code::InvalidArgument; 3]);
    assert_eq!(json(&["trial", &other, "t000"], &url)["metrics"].as_array().unwrap().len(), 0);

    // A state written before reports were checked holds such values: every command still
    // answers, and `plot` returns (it spun forever on an infinite axis).
    assert!(coord.terminate().success());
    let python = Command::new(venv_bin("python"))
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute('update metrics set train_loss = 1.7e308, val_loss = 9e999 where epoch = 1'); \
             c.execute('update metrics set val_accuracy = 9e999 where epoch = 2'); c.commit()",
        )
        .arg(state.join("sweep.db"))
        .status()
        .unwrap();
    assert!(python.success());
    let (_coord, url) = coordinator(&state, &[]);
    let plots = dir.path().join("plots");
    let mut plot = sweep()
        .args(["plot", &id, "--out"])
        .arg(&plots)
        .env("SWEEP_COORDINATOR", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = plot.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = plot.kill();
            panic!("sweep plot did not return on stored infinite values");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success());
    for f in ["t000.png", "t001.png", "backbones.png"] {
        assert!(size(&plots.join(f)).unwrap_or(0) > 1000, "{f}");
    }
    for args in [vec!["status", id.as_str()], vec!["leaderboard", id.as_str()], vec!["export", id.as_str()]] {
        run_ok(&args, &url);
    }
    // And check-state says what is wrong with it.
    let out = output(sweep().args(["check-state", "--state-dir"]).arg(&state));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("metric-values") && stdout(&out).contains("train_loss 1.7e308"), "{}", stdout(&out));
}
