//! Worker identity, against a real server on a loopback port: every WorkerService call is
//! checked against the registration it names (its session secret, and with tokens the token
//! that registered it) and the attempt against the worker it was handed to. A worker holding
//! only its own session and token — or any worker token — cannot report for, finish, heartbeat
//! for or take trials in another worker's name: PERMISSION_DENIED, and nothing stored changes.

use std::sync::Arc;
use std::time::Duration;

use sweep_coordinator::auth::Tokens;
use sweep_coordinator::server::{self, Config};
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const SPEC: &str = "\
name: identity
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 1]]
";

const HONEST: &str = "worker-token-of-the-honest-pool";
const MALLORY: &str = "worker-token-of-mallorys-node-0";
const ADMIN: &str = "admin-token-0123456789abcdef";

type Bearer = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Workers = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

fn with_token(channel: &Channel, token: Option<&str>) -> Workers {
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    let bearer: Bearer = Box::new(move |mut r: tonic::Request<()>| {
        if let Some(h) = &header {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    });
    WorkerServiceClient::with_interceptor(channel.clone(), bearer)
}

fn cpu() -> v1::Device {
    v1::Device { id: "cpu:0".into(), kind: "cpu".into(), name: "test".into(), memory_bytes: 0 }
}

fn metrics(epoch: u32, phase: &str, val: f64) -> v1::EpochMetrics {
    v1::EpochMetrics {
        epoch,
        phase: phase.into(),
        train_loss: 0.5,
        train_accuracy: val,
        val_loss: 0.5,
        val_accuracy: val,
        seconds: 1.0,
        ..Default::default()
    }
}

fn report(w: &v1::RegisterResponse, attempt_id: u64, m: v1::EpochMetrics) -> v1::ReportEpochRequest {
    v1::ReportEpochRequest {
        attempt_id,
        metrics: Some(m),
        worker_id: w.worker_id.clone(),
        session: w.session.clone(),
        ..Default::default()
    }
}

fn finish(w: &v1::RegisterResponse, attempt_id: u64, outcome: v1::Outcome) -> v1::FinishAttemptRequest {
    v1::FinishAttemptRequest {
        attempt_id,
        outcome: outcome as i32,
        error_class: if outcome == v1::Outcome::Failed { v1::ErrorClass::Permanent as i32 } else { 0 },
        message: "forged".into(),
        wall_seconds: 1.0,
        worker_id: w.worker_id.clone(),
        session: w.session.clone(),
    }
}

fn heartbeat(w: &v1::RegisterResponse, running: Vec<u64>) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        worker_id: w.worker_id.clone(),
        incarnation: w.incarnation,
        running_attempt_ids: running,
        session: w.session.clone(),
    }
}

fn acquire(w: &v1::RegisterResponse) -> v1::AcquireTrialRequest {
    v1::AcquireTrialRequest {
        worker_id: w.worker_id.clone(),
        incarnation: w.incarnation,
        wait_ms: 0,
        session: w.session.clone(),
    }
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>, fragment: &str) {
    let s = match r {
        Ok(r) => panic!("{what}: accepted: {r:?}"),
        Err(s) => s,
    };
    assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
    assert!(s.message().contains(fragment), "{what}: `{fragment}` not in `{}`", s.message());
}

/// Everything stored about the sweep and the workers, as an admin reads it (the running trial's
/// wall-clock time, which grows by itself, left out).
async fn snapshot(channel: &Channel, sweep: &str) -> String {
    let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {ADMIN}").parse().unwrap();
    let mut c = SweepServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", header.clone());
        Ok(r)
    });
    let status = c.get_sweep(v1::GetSweepRequest { sweep_id: sweep.into() }).await.unwrap().into_inner();
    let mut board = c.get_leaderboard(v1::GetLeaderboardRequest { sweep_id: sweep.into() }).await.unwrap().into_inner();
    for e in &mut board.entries {
        e.wall_seconds = 0.0;
    }
    let mut trials = Vec::new();
    for t in ["t000", "t001"] {
        let req = v1::GetTrialRequest { sweep_id: sweep.into(), trial_id: t.into() };
        trials.push(c.get_trial(req).await.unwrap().into_inner());
    }
    let mut workers = c.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner();
    for w in &mut workers.workers {
        w.last_seen_ms = 0;
    }
    format!("{status:?}\n{board:?}\n{trials:?}\n{workers:?}")
}

/// Two workers on one coordinator, `tokens` deciding what each authenticates with: the honest
/// one takes t000; everything the other tries in its name is refused and changes nothing; the
/// honest one then completes its trial as if nothing happened.
async fn attack(tokens: Option<Tokens>, honest_token: Option<&str>, mallory_token: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("state"));
    config.heartbeat_ttl = Duration::from_secs(300);
    config.lease_grace = Duration::from_secs(300);
    config.tokens = tokens.map(Arc::new);
    let running = server::start(config).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", running.addr)).unwrap().connect().await.unwrap();
    let admin = Some(ADMIN);
    let sweep = {
        let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {ADMIN}").parse().unwrap();
        let mut c = SweepServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", header.clone());
            Ok(r)
        });
        let req =
            v1::SubmitSweepRequest { spec_yaml: SPEC.into(), source: "identity.yaml".into(), ..Default::default() };
        c.submit_sweep(req).await.unwrap().into_inner().sweep_id
    };
    let register = |name: &str| v1::RegisterRequest { name: name.into(), devices: vec![cpu()], version: "t".into() };
    let mut honest = with_token(&channel, honest_token);
    let mut mallory = with_token(&channel, mallory_token);
    let h = honest.register(register("honest")).await.unwrap().into_inner();
    let m = mallory.register(register("mallory")).await.unwrap().into_inner();
    // Ids count up, but sessions are secrets: 64 hex digits, different every registration.
    assert_eq!((h.session.len(), m.session.len()), (64, 64));
    assert_ne!(h.session, m.session);
    let a = honest.acquire_trial(acquire(&h)).await.unwrap().into_inner().assignment.unwrap();
    honest.report_epoch(report(&h, a.attempt_id, metrics(1, "feature_extraction", 0.4))).await.unwrap();
    let before = snapshot(&channel, &sweep).await;

    // Mallory as herself, writing for the honest worker's attempt.
    let fake = metrics(2, "fine_tuning", 0.999);
    let others = "handed to another worker";
    denied("report as self", mallory.report_epoch(report(&m, a.attempt_id, fake.clone())).await, others);
    denied("finish as self", mallory.finish_attempt(finish(&m, a.attempt_id, v1::Outcome::Succeeded)).await, others);
    // Mallory naming the honest worker, with her own session, or one she made up.
    for (what, session) in [("her session", m.session.clone()), ("a guess", "0".repeat(64))] {
        let as_honest = v1::RegisterResponse { session, ..h.clone() };
        let r = mallory.report_epoch(report(&as_honest, a.attempt_id, fake.clone())).await;
        denied(&format!("report in its name with {what}"), r, "session does not match");
        for outcome in [v1::Outcome::Succeeded, v1::Outcome::Failed, v1::Outcome::Cancelled] {
            let r = mallory.finish_attempt(finish(&as_honest, a.attempt_id, outcome)).await;
            denied(&format!("finish {outcome:?} in its name with {what}"), r, "session does not match");
        }
        let r = mallory.heartbeat(heartbeat(&as_honest, vec![a.attempt_id])).await;
        denied(&format!("heartbeat in its name with {what}"), r, "session does not match");
        let r = mallory.acquire_trial(acquire(&as_honest)).await;
        denied(&format!("acquire in its name with {what}"), r, "session does not match");
    }
    if mallory_token.is_some() && mallory_token != honest_token {
        // Even the honest worker's own session, if it leaked, is no good with another token.
        let r = mallory.report_epoch(report(&h, a.attempt_id, fake.clone())).await;
        denied("report with its leaked session and another token", r, "registered by another identity");
        let r = mallory.heartbeat(heartbeat(&h, vec![a.attempt_id])).await;
        denied("heartbeat with its leaked session and another token", r, "registered by another identity");
        let mut as_admin = with_token(&channel, admin);
        let r = as_admin.finish_attempt(finish(&h, a.attempt_id, v1::Outcome::Failed)).await;
        denied("finish with its leaked session and an admin token", r, "registered by another identity");
    }
    // A session that is not hex: refused before any lookup; none at all (a worker registered
    // with an older coordinator): told to register again.
    let garbled = v1::RegisterResponse { session: "zz".repeat(32), ..h.clone() };
    let s = mallory.heartbeat(heartbeat(&garbled, vec![])).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let empty = v1::RegisterResponse { session: String::new(), ..h.clone() };
    let s = mallory.report_epoch(report(&empty, a.attempt_id, fake.clone())).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("register again"), "{s:?}");
    assert_eq!(snapshot(&channel, &sweep).await, before, "a refused call changed what is stored");

    // The honest worker goes on as if nothing happened, and gets the credit.
    assert!(
        honest.heartbeat(heartbeat(&h, vec![a.attempt_id])).await.unwrap().into_inner().cancel_attempt_ids.is_empty()
    );
    honest.report_epoch(report(&h, a.attempt_id, metrics(2, "fine_tuning", 0.6))).await.unwrap();
    honest.finish_attempt(finish(&h, a.attempt_id, v1::Outcome::Succeeded)).await.unwrap();
    // Mallory's own work is hers.
    let b = mallory.acquire_trial(acquire(&m)).await.unwrap().into_inner().assignment.unwrap();
    assert_eq!(b.trial_id, "t001");
    let stored = snapshot(&channel, &sweep).await;
    assert!(stored.contains("val_accuracy: 0.6") && !stored.contains("0.999"), "{stored}");
    running.stop().await.unwrap();
    let report = sweep_coordinator::history::check_state_dir(&dir.path().join("state")).unwrap();
    assert!(report.is_clean(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_a_worker_cannot_act_in_another_workers_name() {
    attack(None, None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_shared_worker_token_sessions_still_keep_workers_apart() {
    let tokens = Tokens::parse(&format!("worker {HONEST} pool\nadmin {ADMIN} ops\n")).unwrap();
    attack(Some(tokens), Some(HONEST), Some(HONEST)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_bound_to_the_token_that_registered_it() {
    let tokens = Tokens::parse(&format!("worker {HONEST} pool\nworker {MALLORY} pool\nadmin {ADMIN} ops\n")).unwrap();
    attack(Some(tokens), Some(HONEST), Some(MALLORY)).await;
}
