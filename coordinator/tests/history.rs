//! The history checker: silent on states the store writes, and each deliberately broken
//! invariant is reported under its rule. The states are broken with SQL, so these tests are the
//! SQLite backend's (the checker itself reads a snapshot through `StateReader`).

use std::path::Path;

use rusqlite::{Connection, params};
use sweep_coordinator::history::{self, Report};
use sweep_coordinator::store::{Caller, ReportExtras, SqliteStore, Store};
use sweep_core::leaderboard::{EpochMetrics, Phase};
use sweep_core::records::{Assignment, Device, Outcome};
use sweep_core::spec;

const SPEC: &str = "\
name: History
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 1]]
retries: { max_attempts: 3 }
";

const ONE: &str = "\
name: One
dataset: { kind: synthetic, classes: 3 }
grid: { backbone: [resnet18], lr_decay: [{ strategy: linear }], epoch_split: [[1, 2]] }
";

fn devices(ids: &[&str]) -> Vec<Device> {
    ids.iter().map(|id| Device { id: id.to_string(), kind: "cpu".into(), ..Default::default() }).collect()
}

fn metrics(epoch: u32, fe: u32) -> EpochMetrics {
    EpochMetrics {
        epoch,
        phase: Phase::of_epoch(epoch, fe),
        train_loss: 1.0,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.5,
        seconds: 0.1,
    }
}

fn register(store: &mut impl Store, name: &str, devices: &[Device]) -> (Caller, u64) {
    let r = store.register(name, devices, "test", "").unwrap();
    (Caller { worker_id: r.worker_id, session: r.session, owner: String::new() }, r.incarnation)
}

fn report(store: &mut impl Store, w: &Caller, a: &Assignment, epoch: u32) {
    store.report_epoch(w, a.attempt_id, &metrics(epoch, a.fe_epochs), &ReportExtras::default()).unwrap();
}

fn finish(store: &mut impl Store, w: &Caller, a: &Assignment, outcome: Outcome) {
    store.finish_attempt(w, a.attempt_id, outcome, "x", 1.0).unwrap();
}

/// Attempt ids of the clean state.
struct Ids {
    /// Sweep `history-…`: t000 failed once (a1, epoch 1), then completed (a3, resuming at
    /// epoch 2); t001 completed by a2, on the worker's other device while a1 ran.
    sweep: String,
    a1: u64,
    a2: u64,
    a3: u64,
    /// Sweep `one-…`: its trial's first attempt was lost with its worker; the second runs.
    running: u64,
}

/// A state with every kind of history the store writes: concurrent attempts on disjoint
/// devices, a retried trial that resumes, a lost lease, a trial running now.
/// A clock one millisecond further on at every reading: each write of [`clean_state`] has a
/// time of its own, so attempts that ran side by side overlap however fast the test runs (in
/// one millisecond of wall clock, a1's end and a2's start were the same instant).
#[derive(Debug)]
struct Ticking(std::sync::atomic::AtomicI64);

impl sweep_coordinator::clock::Clock for Ticking {
    fn now_ms(&self) -> i64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
}

fn clean_state(dir: &Path) -> Ids {
    let clock = std::sync::Arc::new(Ticking(std::sync::atomic::AtomicI64::new(1_700_000_000_000)));
    let mut store = SqliteStore::open_with_clock(dir, clock).unwrap();
    let sweep = store.submit(SPEC, "h.yaml", &spec::parse(SPEC).unwrap()).unwrap().sweep_id;
    let (w1, i1) = register(&mut store, "w1", &devices(&["cpu:0", "cpu:1"]));
    let a1 = store.acquire(&w1, i1).unwrap().unwrap();
    let a2 = store.acquire(&w1, i1).unwrap().unwrap();
    assert_eq!((a1.trial_id.as_str(), a2.trial_id.as_str()), ("t000", "t001"));
    assert_ne!(a1.devices, a2.devices);
    report(&mut store, &w1, &a1, 1);
    finish(&mut store, &w1, &a1, Outcome::Failed { permanent: false });
    report(&mut store, &w1, &a2, 1);
    report(&mut store, &w1, &a2, 2);
    finish(&mut store, &w1, &a2, Outcome::Succeeded);
    let a3 = store.acquire(&w1, i1).unwrap().unwrap();
    assert_eq!(a3.trial_id, "t000");
    report(&mut store, &w1, &a3, 2);
    finish(&mut store, &w1, &a3, Outcome::Succeeded);

    store.submit(ONE, "one.yaml", &spec::parse(ONE).unwrap()).unwrap();
    let (w2, i2) = register(&mut store, "w2", &devices(&["cpu:0"]));
    let lost = store.acquire(&w2, i2).unwrap().unwrap();
    report(&mut store, &w2, &lost, 1);
    store.expire_workers(i64::MAX).unwrap();
    let (w3, i3) = register(&mut store, "w3", &devices(&["cpu:0"]));
    let running = store.acquire(&w3, i3).unwrap().unwrap();
    report(&mut store, &w3, &running, 2);
    Ids { sweep, a1: a1.attempt_id, a2: a2.attempt_id, a3: a3.attempt_id, running: running.attempt_id }
}

fn check(dir: &Path) -> Report {
    history::check_state_dir(dir).unwrap()
}

#[test]
fn a_state_the_store_wrote_is_clean_also_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    clean_state(dir.path());
    let report = check(dir.path());
    assert!(report.is_clean(), "{report}");
    assert_eq!((report.sweeps, report.trials, report.attempts, report.metrics), (2, 3, 5, 6), "{report}");
    assert!(report.events > 10);
    assert!(report.to_string().starts_with("0 violations in 2 sweeps, 3 trials, 5 attempts"), "{report}");

    // While a store has the database open, with a write in progress elsewhere.
    let mut store = SqliteStore::open(dir.path()).unwrap();
    store.begin_batch().unwrap();
    store.submit(ONE, "one.yaml", &spec::parse(ONE).unwrap()).unwrap();
    let report = check(dir.path());
    assert!(report.is_clean() && report.sweeps == 2, "the uncommitted sweep is not seen: {report}");
    store.commit_batch().unwrap();
    assert_eq!(check(dir.path()).sweeps, 3);
}

#[test]
fn a_missing_state_is_an_error_that_names_it_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = history::check_state_dir(&missing).unwrap_err().to_string();
    assert!(err.contains(&missing.join("sweep.db").display().to_string()), "{err}");
    assert!(!missing.exists());
    // A file that is not a state database.
    std::fs::write(dir.path().join("sweep.db"), "not sqlite").unwrap();
    assert!(history::check_state_dir(dir.path()).is_err());
}

/// Breaks a clean state with `sql` (run with the attempt ids bound as ?1 = a1, ?2 = a2,
/// ?3 = a3, ?4 = the running attempt, ?5 = the first sweep's id) and returns the report.
fn broken(sql: &str) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let ids = clean_state(dir.path());
    let conn = Connection::open(dir.path().join("sweep.db")).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.parameter_count();
    let (a1, a2, a3, running) = (ids.a1 as i64, ids.a2 as i64, ids.a3 as i64, ids.running as i64);
    let values: [&dyn rusqlite::ToSql; 5] = [&a1, &a2, &a3, &running, &ids.sweep];
    stmt.execute(&values[..n]).unwrap();
    drop(stmt);
    drop(conn);
    check(dir.path())
}

/// Asserts that `report` has a violation of `rule` whose text contains `fragment`.
fn assert_found(report: &Report, rule: &str, fragment: &str) {
    assert!(
        report.violations.iter().any(|v| v.rule == rule && v.to_string().contains(fragment)),
        "no `{rule}` violation containing `{fragment}`:\n{report}"
    );
}

#[test]
fn a_trial_completed_twice_is_found_in_the_attempts() {
    // A second, later attempt at the completed t001 that also succeeded.
    let r = broken(
        "INSERT INTO attempts(sweep_id, idx, number, worker_id, incarnation, state, started_at_ms, ended_at_ms, devices)
         SELECT sweep_id, idx, 2, worker_id, incarnation, 'succeeded', ended_at_ms + 10, ended_at_ms + 20, devices
         FROM attempts WHERE id = ?2",
    );
    assert_found(&r, "completed-twice", "/t001: attempts [");
    assert_found(&r, "completed-twice", "all succeeded");
}

#[test]
fn a_completed_trial_without_a_succeeded_attempt_is_found() {
    let r = broken("UPDATE attempts SET state = 'failed' WHERE id = ?2");
    assert_found(&r, "completed-twice", "/t001: completed, but none of its attempts succeeded");
    let r = broken("UPDATE trials SET state = 'failed' WHERE sweep_id = ?5 AND idx = 1");
    assert_found(&r, "completed-twice", "succeeded, but the trial is failed");
}

#[test]
fn a_trial_completed_twice_is_found_in_the_event_log() {
    // The sweep's event log replayed: each trial runs and completes a second time.
    let r = broken(
        "INSERT INTO events(sweep_id, payload, at_ms, checksum)
         SELECT sweep_id, payload, at_ms, checksum FROM events WHERE sweep_id = ?5 ORDER BY seq",
    );
    assert_found(&r, "completed-twice", "/t001: the event log has it completing 2 times");
    assert_found(&r, "completed-twice", "/t000: the event log has it completing 2 times");
}

#[test]
fn metrics_of_an_attempt_that_was_not_current_are_found() {
    // Epoch 1 of t000 claims t001's attempt as its writer.
    let r = broken("UPDATE metrics SET attempt_id = ?2 WHERE attempt_id = ?1");
    assert_found(&r, "metrics-writer", "/t000: epoch 1");
    assert_found(&r, "metrics-writer", "an attempt of history-");
    // Written after its attempt had ended.
    let r = broken("UPDATE metrics SET recorded_at_ms = recorded_at_ms + 100000 WHERE attempt_id = ?1");
    assert_found(&r, "metrics-writer", "outside its running time");
    // Written before its attempt started.
    let r = broken("UPDATE metrics SET recorded_at_ms = 5 WHERE attempt_id = ?4");
    assert_found(&r, "metrics-writer", "outside its running time");
    // By an attempt that was never made.
    let r = broken("UPDATE metrics SET attempt_id = 999 WHERE attempt_id = ?3");
    assert_found(&r, "metrics-writer", "attempt 999, which does not exist");
}

#[test]
fn gaps_in_epochs_are_found() {
    let r = broken("DELETE FROM metrics WHERE attempt_id = ?1 AND epoch = 1");
    assert_found(&r, "epochs", "/t000: epochs [2] are not 1, 2, … without a gap");
    assert_found(&r, "completed-epochs", "/t000: completed with metrics for epochs [2] of its 2");
    // An epoch past the trial's end, and one in the wrong phase.
    let r = broken("UPDATE metrics SET epoch = 3 WHERE attempt_id = ?3");
    assert_found(&r, "epochs", "epoch 3 is outside the trial's 2 epochs");
    let r = broken("UPDATE metrics SET phase = 'fine_tuning' WHERE attempt_id = ?1");
    assert_found(&r, "epochs", "epoch 1 is stored as fine_tuning, but it is feature_extraction");
}

#[test]
fn a_completed_trial_missing_epochs_is_found() {
    let r = broken("DELETE FROM metrics WHERE attempt_id = ?2 AND epoch = 2");
    assert_found(&r, "completed-epochs", "/t001: completed with metrics for epochs [1] of its 2");
    assert!(r.violations.iter().all(|v| v.rule == "completed-epochs"), "{r}");
}

#[test]
fn two_running_attempts_of_a_trial_are_found() {
    // A second running attempt of the running trial.
    let r = broken(
        "INSERT INTO attempts(sweep_id, idx, number, worker_id, incarnation, state, started_at_ms, devices)
         SELECT sweep_id, idx, 3, worker_id, incarnation, 'running', started_at_ms, '' FROM attempts WHERE id = ?4",
    );
    assert_found(&r, "running-attempts", "are all running");
    assert_found(&r, "running-attempts", "ran at the same time");
    // An ended attempt of a completed trial that never ended.
    let r = broken("UPDATE attempts SET state = 'running', ended_at_ms = NULL WHERE id = ?1");
    assert_found(&r, "running-attempts", "completed with current attempt None and running attempts [");
    assert_found(&r, "running-attempts", "ran at the same time");
    // Attempts of one trial overlapping in time, though each ended.
    let r = broken("UPDATE attempts SET ended_at_ms = ended_at_ms + 100000 WHERE id = ?1");
    assert_found(&r, "running-attempts", "/t000: attempts ");
    // A running trial whose current attempt is not its running one.
    let r = broken("UPDATE trials SET current_attempt = ?1 WHERE current_attempt = ?4");
    assert_found(&r, "running-attempts", "running with current attempt Some(");
}

#[test]
fn devices_held_twice_at_once_are_found() {
    // a1 ran on cpu:0 while a2 ran on cpu:1; say a1 held cpu:1 as well.
    let r = broken("UPDATE attempts SET devices = 'cpu:1' WHERE id = ?1");
    assert_found(&r, "device-overlap", "worker w1: attempts ");
    assert_found(&r, "device-overlap", "held cpu:1 at the same time");
    assert!(r.violations.iter().all(|v| v.rule == "device-overlap"), "{r}");
    // A device twice in one attempt, and one the worker never announced.
    let r = broken("UPDATE attempts SET devices = 'cpu:0,cpu:0,cuda:7' WHERE id = ?3");
    assert_found(&r, "device-overlap", "holds cpu:0 twice");
    assert_found(&r, "device-overlap", "holds cuda:7, which the worker never announced");
}

#[test]
fn an_undecodable_event_is_reported_not_fatal() {
    let r = broken("INSERT INTO events(sweep_id, payload, at_ms) VALUES (?5, X'FFFFFFFF', 0)");
    assert_found(&r, "events", "it has no checksum");
    // Undecodable bytes that even carry their checksum.
    let dir = tempfile::tempdir().unwrap();
    let ids = clean_state(dir.path());
    let conn = Connection::open(dir.path().join("sweep.db")).unwrap();
    let sum = sweep_coordinator::store::sqlite::event_checksum(&ids.sweep, &[0xff, 0xff, 0xff, 0xff]);
    conn.execute(
        "INSERT INTO events(sweep_id, payload, at_ms, checksum) VALUES (?1, X'FFFFFFFF', 0, ?2)",
        params![ids.sweep, sum],
    )
    .unwrap();
    drop(conn);
    assert_found(&check(dir.path()), "events", "cannot be decoded");
}

#[test]
fn a_flipped_byte_in_a_stored_event_is_found_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let ids = clean_state(dir.path());
    let conn = Connection::open(dir.path().join("sweep.db")).unwrap();
    // The last event of t001 still decodes with one byte changed (inside a string): only the
    // checksum can tell.
    let (seq, mut payload): (i64, Vec<u8>) = conn
        .query_row("SELECT seq, payload FROM events WHERE sweep_id = ?1 ORDER BY seq DESC LIMIT 1", [&ids.sweep], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let at = payload.iter().rposition(|b| b.is_ascii_lowercase()).expect("a letter to change");
    payload[at] ^= 0x01;
    conn.execute("UPDATE events SET payload = ?2 WHERE seq = ?1", params![seq, payload]).unwrap();
    drop(conn);
    let r = check(dir.path());
    assert_found(&r, "events", &format!("event {seq} of {}: its bytes do not match the checksum", ids.sweep));
    assert_eq!(r.violations.len(), 1, "{r}");
    // The store refuses to serve it to a watcher.
    let store = SqliteStore::open(dir.path()).unwrap();
    let err = store.events_after(&ids.sweep, 0, 10_000).unwrap_err().to_string();
    assert!(err.contains(&format!("event {seq}")) && err.contains("checksum"), "{err}");
    // An event moved to another sweep is seen too.
    drop(store);
    let r = broken("UPDATE events SET sweep_id = 'elsewhere-0000' WHERE seq = (SELECT MIN(seq) FROM events)");
    assert_found(&r, "events", "of elsewhere-0000: its bytes do not match the checksum");
}

#[test]
fn a_checkpoint_reference_that_is_not_the_trials_own_is_found() {
    use prost::Message;
    use sweep_proto::v1;
    let dir = tempfile::tempdir().unwrap();
    let ids = clean_state(dir.path());
    let conn = Connection::open(dir.path().join("sweep.db")).unwrap();
    let reference = |uri: &str, sha: &str, epoch: u32| {
        v1::CheckpointRef { uri: uri.into(), sha256: sha.into(), bytes: 10, epoch }.encode_to_vec()
    };
    let good = "ab".repeat(32);
    let own = format!("/artifacts/{}/t000/state-e0001.safetensors", ids.sweep);
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("resume_checkpoint", reference(&own, &good, 1), ""),
        (
            "resume_checkpoint",
            reference("/artifacts/other-0001/t000/state-e0001.safetensors", &good, 1),
            "is not this trial's own",
        ),
        ("resume_checkpoint", reference(&own, "", 1), "sha256 must be 64"),
        (
            "resume_checkpoint",
            reference(&format!("/artifacts/{}/t000/../../x/t000/state-e0001.safetensors", ids.sweep), &good, 1),
            "`..` segment",
        ),
        ("best_checkpoint", reference(&own, &good, 1), "must end in"),
        ("last_checkpoint", vec![0xff, 0xff], "cannot be decoded"),
    ];
    for (column, blob, fragment) in cases {
        conn.execute(
            &format!("UPDATE trials SET {column} = ?2 WHERE sweep_id = ?1 AND idx = 0"),
            params![ids.sweep, blob],
        )
        .unwrap();
        let r = check(dir.path());
        if fragment.is_empty() {
            assert!(r.is_clean(), "{r}");
        } else {
            assert_found(&r, "checkpoints", &format!("/t000: {column}"));
            assert_found(&r, "checkpoints", fragment);
        }
        conn.execute(&format!("UPDATE trials SET {column} = NULL WHERE sweep_id = ?1"), params![ids.sweep]).unwrap();
    }
    // An epoch the trial has no metrics for.
    conn.execute(
        "UPDATE trials SET resume_checkpoint = ?2 WHERE sweep_id = ?1 AND idx = 0",
        params![ids.sweep, reference(&own.replace("e0001", "e0002"), &good, 2)],
    )
    .unwrap();
    conn.execute("DELETE FROM metrics WHERE sweep_id = ?1 AND idx = 0 AND epoch = 2", params![ids.sweep]).unwrap();
    assert_found(&check(dir.path()), "checkpoints", "holds epoch 2, but the trial has metrics for 1 epochs");
}

#[test]
fn metric_values_no_report_may_carry_are_found() {
    let r = broken("UPDATE metrics SET train_loss = 9e999 WHERE attempt_id = ?2 AND epoch = 1");
    assert_found(&r, "metric-values", "/t001: epoch 1 has train_loss inf");
    let r = broken("UPDATE metrics SET val_accuracy = 1.5, seconds = -1 WHERE attempt_id = ?2 AND epoch = 2");
    assert_found(&r, "metric-values", "val_accuracy 1.5");
    assert_found(&r, "metric-values", "seconds -1");
}

#[test]
fn a_trial_row_that_is_not_its_grid_cell_is_found() {
    let r = broken("UPDATE trials SET backbone = 'resnet152' WHERE sweep_id = ?5 AND idx = 0");
    assert_found(&r, "grid", "/t000: row t000 resnet152");
    let r = broken("UPDATE trials SET lr_decay = X'0A0B6578706F6E656E7469616C' WHERE sweep_id = ?5 AND idx = 1");
    assert_found(&r, "grid", "/t001: row t001 resnet50 exponential");
    let r = broken(
        "INSERT INTO trials(sweep_id, idx, trial_id, backbone, lr_decay, fe_epochs, ft_epochs, state)
         SELECT sweep_id, 2, 't002', backbone, lr_decay, fe_epochs, ft_epochs, 'pending' FROM trials
         WHERE sweep_id = ?5 AND idx = 1",
    );
    assert_found(&r, "grid", "3 trial rows for a grid of 2");
}

#[test]
fn a_stopped_trial_with_every_epoch_is_found() {
    // t001 ran all its epochs and succeeded: `stopped` is not what it can be.
    let r = broken("UPDATE trials SET state = 'stopped' WHERE sweep_id = ?5 AND idx = 1");
    assert_found(&r, "stopped", "/t001: stopped early, but it has metrics for all 2 of its epochs");
    assert_found(&r, "completed-twice", "succeeded, but the trial is stopped");
}
