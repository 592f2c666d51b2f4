//! The worker session against a scripted coordinator on a loopback port: what it sends in the
//! worker's name, and how an attempt ends for each answer the coordinator can give.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sweep_proto::v1;
use sweep_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use sweep_session::{Attempt, End, Executor, Observer, Outcome, SessionError, Worker};
use tonic::{Code, Request, Response, Status};

const SECRET: &str = "5e55105e55105e55105e55105e55105e55105e55105e55105e55105e55105e55";

/// What the scripted coordinator answers and what it heard.
#[derive(Default)]
struct Script {
    register_error: Mutex<Option<Status>>,
    acquire_errors: Mutex<VecDeque<Status>>,
    assignments: Mutex<VecDeque<v1::Assignment>>,
    /// Answers to reports, in order (then: stored, go on).
    report_answers: Mutex<VecDeque<Result<bool, Status>>>,
    /// Attempts the next heartbeats ask to stop.
    cancel: Mutex<Vec<u64>>,
    registrations: AtomicU32,
    reports: Mutex<Vec<v1::ReportEpochRequest>>,
    finishes: Mutex<Vec<v1::FinishAttemptRequest>>,
    progress: Mutex<Vec<v1::ReportProgressRequest>>,
    /// What every progress report gets (an older coordinator: `Unimplemented`).
    progress_error: Mutex<Option<Status>>,
}

struct Fake(Arc<Script>);

#[tonic::async_trait]
impl WorkerService for Fake {
    async fn register(&self, _r: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        if let Some(s) = self.0.register_error.lock().unwrap().clone() {
            return Err(s);
        }
        let n = self.0.registrations.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(v1::RegisterResponse {
            worker_id: format!("w{n}"),
            incarnation: u64::from(n),
            heartbeat_ttl_ms: 1000,
            session: SECRET.into(),
        }))
    }
    async fn heartbeat(&self, r: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        assert_eq!(r.get_ref().session, SECRET);
        // Asks to stop the named attempts once they run (kept until then).
        let running = &r.get_ref().running_attempt_ids;
        let mut wanted = self.0.cancel.lock().unwrap();
        let cancel_attempt_ids: Vec<u64> = wanted.iter().copied().filter(|a| running.contains(a)).collect();
        wanted.retain(|a| !cancel_attempt_ids.contains(a));
        Ok(Response::new(v1::HeartbeatResponse { cancel_attempt_ids }))
    }
    async fn acquire_trial(
        &self,
        r: Request<v1::AcquireTrialRequest>,
    ) -> Result<Response<v1::AcquireTrialResponse>, Status> {
        assert_eq!(r.get_ref().session, SECRET);
        if let Some(s) = self.0.acquire_errors.lock().unwrap().pop_front() {
            return Err(s);
        }
        let next = self.0.assignments.lock().unwrap().pop_front();
        if next.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Response::new(v1::AcquireTrialResponse { assignment: next }))
    }
    async fn report_epoch(
        &self,
        r: Request<v1::ReportEpochRequest>,
    ) -> Result<Response<v1::ReportEpochResponse>, Status> {
        self.0.reports.lock().unwrap().push(r.get_ref().clone());
        match self.0.report_answers.lock().unwrap().pop_front() {
            Some(Err(s)) => Err(s),
            Some(Ok(cancel)) => Ok(Response::new(v1::ReportEpochResponse { cancel, ..Default::default() })),
            None => Ok(Response::new(v1::ReportEpochResponse::default())),
        }
    }
    async fn finish_attempt(
        &self,
        r: Request<v1::FinishAttemptRequest>,
    ) -> Result<Response<v1::FinishAttemptResponse>, Status> {
        self.0.finishes.lock().unwrap().push(r.into_inner());
        Ok(Response::new(v1::FinishAttemptResponse {}))
    }
    async fn report_progress(
        &self,
        r: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        if let Some(e) = self.0.progress_error.lock().unwrap().clone() {
            return Err(e);
        }
        self.0.progress.lock().unwrap().push(r.into_inner());
        Ok(Response::new(v1::ReportProgressResponse { cancel: false }))
    }
}

/// Reports `epochs` epochs, each after `epoch` of (cancellable) work.
struct Trainer {
    epoch: Duration,
}

impl Executor for Trainer {
    fn run(&self, attempt: Attempt) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
        let epoch = self.epoch;
        Box::pin(async move {
            let a = &attempt.assignment;
            // Pretraining first (best effort: whatever the answer, the attempt goes on).
            let pretraining =
                v1::Pretraining { backbone: "resnet18".into(), epoch: 0, epochs: 2, ..Default::default() };
            if attempt.reporter.progress(pretraining).await {
                return Outcome::Stopped;
            }
            for e in 1..=a.fe_epochs + a.ft_epochs {
                tokio::select! {
                    _ = tokio::time::sleep(epoch) => {}
                    _ = attempt.cancel.raised() => return Outcome::Stopped,
                }
                let m = v1::EpochMetrics { epoch: e, ..Default::default() };
                match attempt.reporter.report(v1::ReportEpochRequest { metrics: Some(m), ..Default::default() }).await {
                    Ok(false) => {}
                    Ok(true) | Err(_) => return Outcome::Stopped,
                }
            }
            Outcome::Succeeded
        })
    }
}

#[derive(Default)]
struct Seen {
    ends: Mutex<Vec<End>>,
    errors: Mutex<Vec<(&'static str, Code)>>,
}

impl Observer for Seen {
    fn error(&self, rpc: &'static str, status: &Status) {
        self.errors.lock().unwrap().push((rpc, status.code()));
    }
    fn ended(&self, _a: &v1::Assignment, end: &End) {
        self.ends.lock().unwrap().push(end.clone());
    }
}

fn assignment(attempt_id: u64, epochs: u32) -> v1::Assignment {
    v1::Assignment {
        attempt_id,
        sweep_id: "s-0001".into(),
        trial_id: "t000".into(),
        fe_epochs: 1,
        ft_epochs: epochs - 1,
        devices: vec!["cpu:0".into()],
        ..Default::default()
    }
}

/// Runs a worker against `script` until `until` holds (or 20 s pass), then shuts it down.
async fn run_until(
    script: Arc<Script>,
    epoch: Duration,
    until: impl Fn(&Script, &Seen) -> bool + Send + 'static,
) -> (Result<(), SessionError>, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Fake(script.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect_lazy();
    let client = v1::worker_service_client::WorkerServiceClient::with_interceptor(
        channel,
        sweep_session::connect::BearerToken::default(),
    );
    let worker = Worker {
        name: "test".into(),
        devices: vec![v1::Device { id: "cpu:0".into(), kind: "cpu".into(), ..Default::default() }],
        version: "test".into(),
        poll_wait: Duration::from_millis(200),
    };
    let seen = Arc::new(Seen::default());
    let (s, o) = (script.clone(), seen.clone());
    let shutdown = async move {
        for _ in 0..400 {
            if until(&s, &o) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the scripted run did not get where the test waits for");
    };
    let result = sweep_session::run(client, worker, Arc::new(Trainer { epoch }), seen.clone(), shutdown).await;
    server.abort();
    (result, seen)
}

fn script_with(assignments: Vec<v1::Assignment>) -> Arc<Script> {
    let s = Script::default();
    *s.assignments.lock().unwrap() = assignments.into();
    Arc::new(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_in_the_workers_name_and_a_finished_attempt_succeeds() {
    let script = script_with(vec![assignment(7, 3)]);
    let (result, seen) =
        run_until(script.clone(), Duration::from_millis(10), |s, _| !s.finishes.lock().unwrap().is_empty()).await;
    result.unwrap();
    let reports = script.reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 3);
    let progress = script.progress.lock().unwrap().clone();
    assert_eq!(progress.len(), 1);
    assert_eq!(
        (progress[0].attempt_id, progress[0].worker_id.as_str(), progress[0].session.as_str()),
        (7, "w1", SECRET)
    );
    assert!(reports.iter().all(|r| r.attempt_id == 7 && r.worker_id == "w1" && r.session == SECRET), "{reports:?}");
    let f = script.finishes.lock().unwrap()[0].clone();
    assert_eq!(
        (f.attempt_id, f.outcome, f.worker_id.as_str(), f.session.as_str()),
        (7, v1::Outcome::Succeeded as i32, "w1", SECRET)
    );
    assert!(matches!(seen.ends.lock().unwrap()[0], End::Finished { outcome: v1::Outcome::Succeeded, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_fails_the_attempt_and_a_fenced_one_drops_it() {
    // Refused (the coordinator will never store it): failed, permanently, saying why.
    let script = script_with(vec![assignment(1, 3)]);
    script.report_answers.lock().unwrap().push_back(Err(Status::invalid_argument("val_loss is 1.7e308")));
    let (_, seen) =
        run_until(script.clone(), Duration::from_millis(10), |s, _| !s.finishes.lock().unwrap().is_empty()).await;
    let f = script.finishes.lock().unwrap()[0].clone();
    assert_eq!((f.outcome, f.error_class), (v1::Outcome::Failed as i32, v1::ErrorClass::Permanent as i32));
    assert!(f.message.contains("coordinator refused a report: val_loss is 1.7e308"), "{}", f.message);
    assert_eq!(script.reports.lock().unwrap().len(), 1, "a refusal is not retried");
    assert!(seen.errors.lock().unwrap().contains(&("ReportEpoch", Code::InvalidArgument)));

    // Fenced (no longer ours, or not ours at all): nothing more is sent for it.
    for code in [Code::FailedPrecondition, Code::PermissionDenied] {
        let script = script_with(vec![assignment(2, 3)]);
        script.report_answers.lock().unwrap().push_back(Err(Status::new(code, "not yours")));
        let (_, seen) =
            run_until(script.clone(), Duration::from_millis(10), |_, o| !o.ends.lock().unwrap().is_empty()).await;
        assert!(matches!(seen.ends.lock().unwrap()[0], End::Dropped(_)), "{code:?}");
        assert!(script.finishes.lock().unwrap().is_empty(), "{code:?}: a fenced attempt was finished");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_from_the_coordinator_cancels_and_shutdown_hands_back() {
    // The heartbeat (every third of the 1 s TTL) names the attempt: stopped on request.
    let script = script_with(vec![assignment(3, 50)]);
    script.cancel.lock().unwrap().push(3);
    let (_, _) =
        run_until(script.clone(), Duration::from_millis(100), |s, _| !s.finishes.lock().unwrap().is_empty()).await;
    let f = script.finishes.lock().unwrap()[0].clone();
    assert_eq!((f.outcome, f.message.as_str()), (v1::Outcome::Cancelled as i32, "stopped on request"));

    // Shut down mid-attempt: handed back, failed, retryable.
    let script = script_with(vec![assignment(4, 50)]);
    let (result, seen) =
        run_until(script.clone(), Duration::from_millis(100), |s, _| !s.reports.lock().unwrap().is_empty()).await;
    result.unwrap();
    let f = script.finishes.lock().unwrap()[0].clone();
    assert_eq!((f.outcome, f.error_class), (v1::Outcome::Failed as i32, v1::ErrorClass::Retryable as i32));
    assert_eq!(f.message, "the worker was shut down");
    assert!(matches!(seen.ends.lock().unwrap()[0], End::Finished { shutting_down: true, .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_coordinator_does_not_know_registers_again_and_a_refused_token_ends_it() {
    let script = script_with(vec![assignment(5, 1)]);
    script.acquire_errors.lock().unwrap().push_back(Status::permission_denied("the session does not match"));
    let (result, _) =
        run_until(script.clone(), Duration::from_millis(10), |s, _| !s.finishes.lock().unwrap().is_empty()).await;
    result.unwrap();
    assert_eq!(script.registrations.load(Ordering::SeqCst), 2);
    assert_eq!(script.finishes.lock().unwrap()[0].worker_id, "w2", "the attempt runs in the new registration's name");

    // A token the coordinator does not accept: the session ends with the reason, at once (it
    // is not retried forever).
    let script = Arc::new(Script::default());
    *script.register_error.lock().unwrap() = Some(Status::unauthenticated("the bearer token is not valid here"));
    let started = std::time::Instant::now();
    let (result, _) = run_until(script, Duration::from_millis(10), |_, _| false).await;
    let e = result.unwrap_err();
    assert!(e.to_string().contains("the bearer token is not valid here"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_does_not_take_progress_reports_changes_nothing_for_the_attempt() {
    let script = script_with(vec![assignment(9, 2)]);
    *script.progress_error.lock().unwrap() = Some(Status::unimplemented("no such method"));
    let (result, _seen) =
        run_until(script.clone(), Duration::from_millis(10), |s, _| !s.finishes.lock().unwrap().is_empty()).await;
    result.unwrap();
    assert_eq!(script.reports.lock().unwrap().len(), 2);
    let f = script.finishes.lock().unwrap()[0].clone();
    assert_eq!(v1::Outcome::try_from(f.outcome), Ok(v1::Outcome::Succeeded));
}
