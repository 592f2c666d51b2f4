//! Simulated workers against an in-process coordinator: every trial of a sweep runs to the end
//! through the real gRPC services, every acknowledged report is in the store, and every
//! trial's epochs are stored complete and in order. No timing assertions.

use std::time::Duration;

use sweep_cli::client::Client;
use sweep_cli::sim::{self, SimOptions};
use sweep_coordinator::server::{self, Config};
use sweep_coordinator::store::{SqliteStore, Store};
use sweep_core::state::{SweepState, TrialState};
use sweep_proto::v1;

const WORKERS: usize = 50;

/// Returns once the sweep has ended (a generous bound only guards against a hang).
async fn ended(url: String, sweep_id: String) {
    let mut client = Client::connect(&url).await.unwrap();
    for _ in 0..1200 {
        let status = client.get_status(&sweep_id).await.unwrap();
        if status.sweep.as_ref().is_some_and(|s| s.finished_at_ms != 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sweep did not end within two minutes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_workers_complete_a_sweep_and_lose_no_report() {
    let dir = tempfile::tempdir().unwrap();
    let running = server::start(Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())).await.unwrap();
    let url = format!("http://{}", running.addr);

    // 2 × 81 = 162 trials of 2 to 6 epochs: about three rounds of 50 workers.
    let spec = sim::load_spec("sim-test", 2);
    let submitted = Client::connect(&url).await.unwrap().submit_text(spec, "sim-test.yaml".into()).await.unwrap();
    assert_eq!(submitted.trial_count as usize, 2 * sim::LOAD_SPEC_TRIALS_PER_DECAY);
    let sweep_id = submitted.sweep_id.clone();
    // A watcher follows the sweep meanwhile: it must see every epoch and the end.
    let mut events = Client::connect(&url).await.unwrap().watch(&sweep_id, 0).await.unwrap();
    let watcher = tokio::spawn(async move {
        let (mut epochs, mut ended) = (0usize, false);
        while let Some(event) = events.message().await.unwrap() {
            match event.event {
                Some(v1::sweep_event::Event::Trial(t)) if t.metrics.is_some() => epochs += 1,
                Some(v1::sweep_event::Event::Ended(_)) => ended = true,
                _ => {}
            }
        }
        (epochs, ended)
    });

    let mut options = SimOptions::new(&url, WORKERS);
    options.epoch = Duration::from_millis(40);
    options.workers_per_connection = 10;
    let report = sim::run(options, ended(url.clone(), sweep_id.clone())).await.unwrap();
    running.stop().await.unwrap();

    assert_eq!(report.registered, WORKERS);
    assert_eq!(report.error_count(), 0, "errors: {:?} {:?}", report.errors, report.error_samples);
    // Every shared epoch ran once: the stage tree's epochs, not the trials'. Trials whose every
    // epoch another computed completed without an attempt of their own.
    let spec = sweep_core::spec::parse(&sim::load_spec("sim-test", 2)).unwrap();
    let tree = sweep_core::stages::StageTree::build(&spec, true);
    assert!(tree.stage_epochs().total() < tree.naive_epochs().total());
    assert_eq!(report.reports.len() as u64, tree.stage_epochs().total(), "every stage's epochs ran once");
    assert_eq!(report.attempts_succeeded as usize, report.assignments(), "no attempt failed or was lost");
    assert!(report.assignments() as u32 <= submitted.trial_count);
    let stored = sweep_coordinator::history::stored_metrics(&dir.path().join("sweep.db")).unwrap();
    let lost = sim::lost_in(&stored, &report.reports);
    assert!(lost.is_empty(), "{} acknowledged reports are not stored, e.g. {:?}", lost.len(), lost.first());

    let store = SqliteStore::open(dir.path()).unwrap();
    let status = store.get_sweep(&sweep_id).unwrap();
    assert_eq!(status.sweep.state, SweepState::Completed);
    let mut epochs = 0;
    for t in &status.trials {
        assert_eq!(t.state, TrialState::Completed, "{}", t.trial_id);
        let total = t.fe_epochs + t.ft_epochs;
        assert_eq!(t.epochs_done, total, "{}", t.trial_id);
        let detail = store.trial(&sweep_id, &t.trial_id).unwrap();
        let stored: Vec<u32> = detail.metrics.iter().map(|m| m.metrics.epoch).collect();
        assert_eq!(stored, (1..=total).collect::<Vec<_>>(), "epochs of {}", t.trial_id);
        epochs += total as usize;
    }
    // Each trial's whole history is stored (648 rows) from 189 reports: a shared epoch is
    // reported once and belongs to every trial through it.
    assert_eq!(epochs as u64, tree.naive_epochs().total());
    drop(store);
    let check = sweep_coordinator::history::check_state_dir(dir.path()).unwrap();
    assert!(check.is_clean(), "{check}");
    let (watched, ended) = watcher.await.unwrap();
    assert!(ended, "the watcher saw the sweep end");
    assert_eq!(watched, epochs, "the watcher saw every epoch");
}

#[tokio::test]
async fn bad_options_and_unreachable_coordinators_are_errors() {
    let mut options = SimOptions::new("http://127.0.0.1:1", 0);
    let e = sim::run(options.clone(), async {}).await.unwrap_err();
    assert!(e.to_string().contains("at least 1"), "{e}");
    options.count = 1;
    options.workers_per_connection = 0;
    let e = sim::run(options.clone(), async {}).await.unwrap_err();
    assert!(e.to_string().contains("workers per connection"), "{e}");
    options.workers_per_connection = 1;
    let e = sim::run(options.clone(), async {}).await.unwrap_err();
    assert!(e.to_string().contains("cannot reach the coordinator at http://127.0.0.1:1"), "{e}");
    options.coordinator = "127.0.0.1:7070".into();
    let e = sim::run(options, async {}).await.unwrap_err();
    assert!(e.to_string().contains("is not a coordinator URL") && e.to_string().contains("http://"), "{e}");
}

#[test]
fn fake_metrics_are_deterministic_and_valid() {
    for epoch in 1..=6 {
        let a = sim::fake_metrics("s-1234", "t007", epoch, 3, 1.0);
        assert_eq!(a, sim::fake_metrics("s-1234", "t007", epoch, 3, 1.0));
        let m = sweep_core::leaderboard::EpochMetrics::try_from(&a).expect("valid metrics");
        assert_eq!(m.phase, sweep_core::leaderboard::Phase::of_epoch(epoch, 3));
    }
    assert_ne!(sim::fake_metrics("s-1234", "t007", 2, 3, 1.0), sim::fake_metrics("s-1234", "t008", 2, 3, 1.0));
    let spec = sweep_core::spec::parse(&sim::load_spec("load", 123)).expect("the load spec parses");
    assert_eq!(spec.grid.trial_count(), 123 * sim::LOAD_SPEC_TRIALS_PER_DECAY);
    assert!(spec.grid.trial_count() <= sweep_core::spec::DEFAULT_MAX_TRIALS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_workers_carry_a_token_and_without_one_are_refused_at_once() {
    use sweep_session::connect::{ClientFiles, ClientSecurity};
    let dir = tempfile::tempdir().unwrap();
    let worker = "worker-token-0123456789abcdef";
    let admin = "admin-token-0123456789abcdef";
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.tokens = Some(std::sync::Arc::new(
        sweep_coordinator::auth::Tokens::parse(&format!("worker {worker} sim\nadmin {admin} ops\n")).unwrap(),
    ));
    let running = server::start(config).await.unwrap();
    let url = format!("http://{}", running.addr);
    let with = |token: &str| {
        ClientSecurity::load(&ClientFiles { token: Some(token.to_string()), ..ClientFiles::default() }).unwrap()
    };
    let mut client = Client::connect_with(&url, &with(admin)).await.unwrap();
    let spec = sim::load_spec("sim-tokens", 1);
    let sweep_id = client.submit_text(spec, "t.yaml".into()).await.unwrap().sweep_id;

    // With the worker token: they register and report.
    let mut options = SimOptions::new(&url, 4);
    options.epoch = Duration::from_millis(20);
    options.security = with(worker);
    let report = sim::run(options.clone(), tokio::time::sleep(Duration::from_secs(2))).await.unwrap();
    assert_eq!(report.registered, 4, "{:?} {:?}", report.errors, report.error_samples);
    assert!(!report.reports.is_empty());
    assert_eq!(report.error_count(), 0, "{:?} {:?}", report.errors, report.error_samples);
    let lost = sim::lost_via_rpc(&url, &with(admin), &report.reports).await.unwrap();
    assert!(lost.is_empty());
    assert!(client.get_status(&sweep_id).await.unwrap().trials.iter().any(|t| t.epochs_done > 0));

    // Without a token: refused, and the run ends long before its 60 s (it retried forever).
    options.security = ClientSecurity::default();
    let started = std::time::Instant::now();
    let report = sim::run(options, tokio::time::sleep(Duration::from_secs(60))).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert_eq!(report.registered, 0);
    assert!(report.error_samples.iter().any(|e| e.contains("needs a bearer token")), "{:?}", report.error_samples);
    running.stop().await.unwrap();
}

/// Early stopping through the real services: simulated workers (deterministic metrics) obey the
/// stop that comes back with a report; paused trials are handed out again once promoted;
/// stopped trials end `stopped` with fewer epochs than their total, the sweep still ends, and no
/// acknowledged report is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_workers_pause_resume_and_stop_trials_as_asha_decides() {
    let dir = tempfile::tempdir().unwrap();
    let running = server::start(Config::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf())).await.unwrap();
    let url = format!("http://{}", running.addr);
    // 81 trials, fine-tuning 1 to 3 epochs: rungs at fine-tuning epochs 1 and 2 (eta 2).
    let spec = sim::load_spec("asha-sim", 1) + "early_stopping: { strategy: asha, eta: 2, min_epochs: 1 }\n";
    let submitted = Client::connect(&url).await.unwrap().submit_text(spec, "asha.yaml".into()).await.unwrap();
    let sweep_id = submitted.sweep_id.clone();
    let mut options = SimOptions::new(&url, 20);
    options.epoch = Duration::from_millis(20);
    let report = sim::run(options, ended(url.clone(), sweep_id.clone())).await.unwrap();
    running.stop().await.unwrap();
    assert_eq!(report.error_count(), 0, "errors: {:?} {:?}", report.errors, report.error_samples);
    let stored = sweep_coordinator::history::stored_metrics(&dir.path().join("sweep.db")).unwrap();
    assert!(sim::lost_in(&stored, &report.reports).is_empty());

    let store = SqliteStore::open(dir.path()).unwrap();
    let status = store.get_sweep(&sweep_id).unwrap();
    assert_eq!(status.sweep.state, SweepState::Completed);
    let stopped: Vec<_> = status.trials.iter().filter(|t| t.state == TrialState::Stopped).collect();
    let completed = status.trials.iter().filter(|t| t.state == TrialState::Completed).count();
    assert!(!stopped.is_empty() && completed > 0, "{} stopped, {completed} completed", stopped.len());
    assert_eq!(stopped.len() + completed, status.trials.len());
    for t in &stopped {
        assert!(t.epochs_done < t.fe_epochs + t.ft_epochs && t.epochs_done > t.fe_epochs, "{}", t.trial_id);
        assert!(t.error.contains("stopped by ASHA"), "{}: {}", t.trial_id, t.error);
    }
    // Every trial with a one-epoch fine-tuning phase ran to its end (its only epoch is its last).
    assert!(status.trials.iter().filter(|t| t.ft_epochs == 1).all(|t| t.state == TrialState::Completed));
    // Trials paused at a rung were promoted later and handed out again, from the rung.
    let events = store.events_after(&sweep_id, 0, 1_000_000).unwrap();
    let noted = |what: &str| {
        events
            .iter()
            .filter(|e| matches!(&e.event, sweep_core::records::SweepEvent::Trial { note, .. } if note.contains(what)))
            .count()
    };
    assert!(noted("paused by ASHA") > 0 && noted("promoted by ASHA") > 0, "no pause, or no promotion");
    // A trial promoted while it waited (an event of its own, not its epoch's) ran on past the
    // rung it paused at. (Which trials wait depends on the order reports arrive in.)
    let mut paused_at: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut promoted_later = Vec::new();
    for e in &events {
        let sweep_core::records::SweepEvent::Trial { trial, metrics, note } = &e.event else { continue };
        match metrics {
            Some(m) if note.contains("paused by ASHA") => {
                paused_at.insert(trial.trial_id.clone(), m.epoch);
            }
            None if note.contains("promoted by ASHA") => {
                promoted_later.push((trial.trial_id.clone(), paused_at.get(&trial.trial_id).copied().unwrap_or(0)));
            }
            _ => {}
        }
    }
    assert!(!promoted_later.is_empty(), "no trial was promoted after it paused");
    for (id, rung) in &promoted_later {
        let t = status.trials.iter().find(|t| &t.trial_id == id).unwrap();
        assert!(*rung > 0 && t.epochs_done > *rung, "{id} was promoted at epoch {rung} but never ran on: {t:?}");
    }
    drop(store);
    let check = sweep_coordinator::history::check_state_dir(dir.path()).unwrap();
    assert!(check.is_clean(), "{check}");
}
