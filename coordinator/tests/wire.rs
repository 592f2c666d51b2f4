//! Bad requests on the wire, against a real tonic server on a loopback port: unknown ids,
//! stale attempts and incarnations, oversized messages, garbage fields and bodies that are not
//! protobuf at all. Each gets its status code and a message naming what is wrong; none changes
//! what is stored, and the coordinator serves normal requests afterwards.

use std::time::Duration;

use prost::bytes::{Buf, BufMut};
use sweep_coordinator::server::{self, Config, MAX_MESSAGE_BYTES, MAX_SPEC_BYTES};
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const SPEC: &str = "\
name: wire
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 1]]
";

fn cpu(id: &str) -> v1::Device {
    v1::Device { id: id.into(), kind: "cpu".into(), name: "test".into(), memory_bytes: 0 }
}

fn metrics(epoch: u32, phase: &str) -> v1::EpochMetrics {
    v1::EpochMetrics {
        epoch,
        phase: phase.into(),
        train_loss: 0.5,
        train_accuracy: 0.5,
        val_loss: 0.5,
        val_accuracy: 0.5,
        seconds: 1.0,
        ..Default::default()
    }
}

/// A report of `w` (worker id and session) for `attempt_id`.
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
        wall_seconds: 1.0,
        worker_id: w.worker_id.clone(),
        session: w.session.clone(),
        ..Default::default()
    }
}

/// What is stored, as the read RPCs show it (the running trial's wall-clock time, which grows
/// by itself, left out).
async fn snapshot(url: &str, sweep: &str) -> String {
    let mut c = SweepServiceClient::connect(url.to_string()).await.unwrap();
    let status = c.get_sweep(v1::GetSweepRequest { sweep_id: sweep.into() }).await.unwrap().into_inner();
    let mut board = c.get_leaderboard(v1::GetLeaderboardRequest { sweep_id: sweep.into() }).await.unwrap().into_inner();
    for e in &mut board.entries {
        if e.state == "running" {
            e.wall_seconds = 0.0;
        }
    }
    let mut trials = Vec::new();
    for t in ["t000", "t001"] {
        let req = v1::GetTrialRequest { sweep_id: sweep.into(), trial_id: t.into() };
        trials.push(c.get_trial(req).await.unwrap().into_inner());
    }
    let sweeps = c.list_sweeps(v1::ListSweepsRequest::default()).await.unwrap().into_inner();
    let workers = c.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner();
    // The first message of a watch carries the last event's sequence number.
    let mut watch =
        c.watch_sweep(v1::WatchSweepRequest { sweep_id: sweep.into(), after_sequence: 0 }).await.unwrap().into_inner();
    let sequence = watch.message().await.unwrap().unwrap().sequence;
    format!("{status:?}\n{board:?}\n{trials:?}\n{sweeps:?}\n{workers:?}\nlast event {sequence}")
}

/// Passes bytes through as they are: what goes out is the request body, unchecked.
#[derive(Clone, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

const METHODS: [&str; 14] = [
    "/sweep.v1.SweepService/SubmitSweep",
    "/sweep.v1.SweepService/GetSweep",
    "/sweep.v1.SweepService/ListSweeps",
    "/sweep.v1.SweepService/CancelSweep",
    "/sweep.v1.SweepService/RetrySweep",
    "/sweep.v1.SweepService/GetLeaderboard",
    "/sweep.v1.SweepService/GetTrial",
    "/sweep.v1.SweepService/ListWorkers",
    "/sweep.v1.SweepService/WatchSweep",
    "/sweep.v1.WorkerService/Register",
    "/sweep.v1.WorkerService/Heartbeat",
    "/sweep.v1.WorkerService/AcquireTrial",
    "/sweep.v1.WorkerService/ReportEpoch",
    "/sweep.v1.WorkerService/FinishAttempt",
];

/// Sends `body` as the protobuf message of `method`; returns the status (OK included).
async fn raw_call(channel: &Channel, method: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    let result = if method.ends_with("WatchSweep") {
        grpc.server_streaming(tonic::Request::new(body), path, Raw).await.map(|_| ())
    } else {
        grpc.unary(tonic::Request::new(body), path, Raw).await.map(|_| ())
    };
    result.err().unwrap_or_else(|| tonic::Status::new(Code::Ok, ""))
}

/// Sends `body` as the whole HTTP/2 request body (gRPC framing included, or not) and returns the
/// grpc-status the server answers with.
async fn raw_http(channel: &Channel, method: &str, body: String) -> tonic::Status {
    use tonic::codegen::Body as _;
    use tower::ServiceExt;
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    let response = channel.clone().oneshot(request).await.unwrap();
    if let Some(s) = tonic::Status::from_header_map(response.headers()) {
        return s;
    }
    let mut body = response.into_body();
    while let Some(frame) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(trailers) = frame.unwrap().into_trailers() {
            return tonic::Status::from_header_map(&trailers).expect("a grpc-status trailer");
        }
    }
    panic!("{method}: no grpc-status");
}

/// Asserts a refusal with `code` whose message contains `fragment`.
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    fragment: &str,
) {
    let status = match result {
        Ok(r) => panic!("{what}: accepted: {r:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(status.message().contains(fragment), "{what}: `{fragment}` not in `{}`", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_their_reason_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), state.clone());
    config.heartbeat_ttl = Duration::from_secs(300);
    config.lease_grace = Duration::from_secs(300);
    let running = server::start(config).await.unwrap();
    let url = format!("http://{}", running.addr);
    let channel = Channel::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut sweeps = SweepServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut workers = WorkerServiceClient::new(channel.clone());

    // A sweep with one trial completed (attempt `done`) and one running (attempt `live`, with
    // its first epoch stored).
    let sweep = sweeps
        .submit_sweep(v1::SubmitSweepRequest {
            spec_yaml: SPEC.into(),
            source: "wire.yaml".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sweep_id;
    let w = workers
        .register(v1::RegisterRequest { name: "w".into(), devices: vec![cpu("cpu:0")], version: "t".into() })
        .await
        .unwrap()
        .into_inner();
    let acquire = v1::AcquireTrialRequest {
        worker_id: w.worker_id.clone(),
        incarnation: w.incarnation,
        wait_ms: 0,
        session: w.session.clone(),
    };
    let done = workers.acquire_trial(acquire.clone()).await.unwrap().into_inner().assignment.unwrap();
    workers.report_epoch(report(&w, done.attempt_id, metrics(1, "feature_extraction"))).await.unwrap();
    workers.report_epoch(report(&w, done.attempt_id, metrics(2, "fine_tuning"))).await.unwrap();
    workers.finish_attempt(finish(&w, done.attempt_id, v1::Outcome::Succeeded)).await.unwrap();
    let live = workers.acquire_trial(acquire.clone()).await.unwrap().into_inner().assignment.unwrap();
    assert_eq!((done.trial_id.as_str(), live.trial_id.as_str()), ("t000", "t001"));
    workers.report_epoch(report(&w, live.attempt_id, metrics(1, "feature_extraction"))).await.unwrap();
    let before = snapshot(&url, &sweep).await;

    // Unknown ids, on every call that takes one: NOT_FOUND.
    let nf = Code::NotFound;
    let id = |s: &str| s.to_string();
    refused("GetSweep", sweeps.get_sweep(v1::GetSweepRequest { sweep_id: id("nope") }).await, nf, "nope");
    refused("CancelSweep", sweeps.cancel_sweep(v1::CancelSweepRequest { sweep_id: id("nope") }).await, nf, "nope");
    let retry = |sweep_id: &str, trials: &[&str]| v1::RetrySweepRequest {
        sweep_id: sweep_id.into(),
        trial_ids: trials.iter().map(|t| t.to_string()).collect(),
    };
    refused("RetrySweep", sweeps.retry_sweep(retry("nope", &[])).await, nf, "nope");
    refused("RetrySweep trial", sweeps.retry_sweep(retry(&sweep, &["t999"])).await, nf, "t999");
    let board = v1::GetLeaderboardRequest { sweep_id: id("nope") };
    refused("GetLeaderboard", sweeps.get_leaderboard(board).await, nf, "nope");
    let trial = |s: &str, t: &str| v1::GetTrialRequest { sweep_id: s.into(), trial_id: t.into() };
    refused("GetTrial sweep", sweeps.get_trial(trial("nope", "t000")).await, nf, "nope");
    refused("GetTrial trial", sweeps.get_trial(trial(&sweep, "t999")).await, nf, "t999");
    let watch = v1::WatchSweepRequest { sweep_id: id("nope"), after_sequence: 0 };
    refused("WatchSweep", sweeps.watch_sweep(watch).await, nf, "nope");
    let heartbeat = |worker_id: &str, incarnation: u64| v1::HeartbeatRequest {
        worker_id: worker_id.into(),
        incarnation,
        running_attempt_ids: vec![],
        session: w.session.clone(),
    };
    refused("Heartbeat", workers.heartbeat(heartbeat("w999", 1)).await, nf, "w999");
    let acquire_as = |worker_id: &str, incarnation: u64| v1::AcquireTrialRequest {
        worker_id: worker_id.into(),
        incarnation,
        wait_ms: 0,
        session: w.session.clone(),
    };
    refused("AcquireTrial", workers.acquire_trial(acquire_as("w999", 1)).await, nf, "w999");
    let epoch2 = || metrics(2, "fine_tuning");
    refused("ReportEpoch", workers.report_epoch(report(&w, 987_654, epoch2())).await, nf, "987654");
    let outcome = v1::Outcome::Succeeded;
    refused("FinishAttempt", workers.finish_attempt(finish(&w, 987_654, outcome)).await, nf, "987654");

    // Stale incarnations and attempts that are no longer current: FAILED_PRECONDITION.
    let fp = Code::FailedPrecondition;
    let stale = w.incarnation + 7;
    refused("Heartbeat stale", workers.heartbeat(heartbeat(&w.worker_id, stale)).await, fp, "incarnation");
    refused("Acquire stale", workers.acquire_trial(acquire_as(&w.worker_id, stale)).await, fp, "incarnation");
    let old = done.attempt_id;
    refused("ReportEpoch ended", workers.report_epoch(report(&w, old, epoch2())).await, fp, "no longer current");
    let failed = v1::Outcome::Failed;
    refused("FinishAttempt ended", workers.finish_attempt(finish(&w, old, failed)).await, fp, "no longer current");
    refused("Finish early", workers.finish_attempt(finish(&w, live.attempt_id, outcome)).await, fp, "1 of its 2");
    refused("RetrySweep completed", sweeps.retry_sweep(retry(&sweep, &["t000"])).await, fp, "only failed");

    // Progress reports: checked as reports are (the attempt's own backbone, sane numbers, a
    // current attempt of the caller's, one that has not reported an epoch yet).
    let progress = |attempt_id: u64, p: v1::Pretraining| v1::ReportProgressRequest {
        attempt_id,
        worker_id: w.worker_id.clone(),
        session: w.session.clone(),
        pretraining: Some(p),
    };
    let pre = |backbone: &str, epoch: u32, epochs: u32, seconds: f64| v1::Pretraining {
        backbone: backbone.into(),
        epoch,
        epochs,
        seconds,
        waiting: false,
    };
    let ia = Code::InvalidArgument;
    let bad = progress(live.attempt_id, pre("nope\u{1b}[31m", 1, 2, 1.0));
    refused("progress backbone", workers.report_progress(bad).await, ia, "unknown backbone");
    let bad = progress(live.attempt_id, pre("resnet18", 3, 2, 1.0));
    refused("progress epochs", workers.report_progress(bad).await, ia, "makes no sense");
    let bad = progress(live.attempt_id, pre("resnet18", 1, 2, f64::NAN));
    refused("progress seconds", workers.report_progress(bad).await, ia, "not a time");
    let none = v1::ReportProgressRequest { pretraining: None, ..progress(live.attempt_id, pre("resnet18", 1, 2, 1.0)) };
    refused("progress empty", workers.report_progress(none).await, ia, "needs pretraining");
    refused(
        "progress ended",
        workers.report_progress(progress(old, pre("resnet18", 1, 2, 1.0))).await,
        fp,
        "no longer current",
    );
    refused(
        "progress after an epoch",
        workers.report_progress(progress(live.attempt_id, pre(&live.backbone, 1, 2, 1.0))).await,
        fp,
        "past pretraining",
    );

    // Oversized messages: over the spec limit, INVALID_ARGUMENT; over the message limit,
    // RESOURCE_EXHAUSTED before anything is decoded.
    let spec = |bytes: usize| v1::SubmitSweepRequest {
        spec_yaml: format!("{SPEC}#{}", "x".repeat(bytes)),
        ..Default::default()
    };
    refused("big spec", sweeps.submit_sweep(spec(MAX_SPEC_BYTES + 1)).await, Code::InvalidArgument, "spec_yaml is");
    let huge = MAX_MESSAGE_BYTES + 1;
    refused("huge spec", sweeps.submit_sweep(spec(huge)).await, Code::ResourceExhausted, "message length too large");
    let huge_note = v1::ReportEpochRequest { note: "n".repeat(huge), ..report(&w, live.attempt_id, epoch2()) };
    refused("huge report", workers.report_epoch(huge_note).await, Code::ResourceExhausted, "message length too large");
    let long_uri = v1::ReportEpochRequest {
        last_checkpoint: Some(v1::CheckpointRef { uri: "u".repeat(100_000), epoch: 2, ..Default::default() }),
        ..report(&w, live.attempt_id, epoch2())
    };
    refused("long uri", workers.report_epoch(long_uri).await, Code::InvalidArgument, "last_checkpoint");
    let many =
        v1::HeartbeatRequest { running_attempt_ids: (1..5000).collect(), ..heartbeat(&w.worker_id, w.incarnation) };
    refused("many attempts", workers.heartbeat(many).await, Code::InvalidArgument, "running_attempt_ids");
    let many =
        v1::RegisterRequest { devices: (0..2000).map(|i| cpu(&format!("cpu:{i}"))).collect(), ..Default::default() };
    refused("many devices", workers.register(many).await, Code::InvalidArgument, "devices");

    // Garbage fields: INVALID_ARGUMENT naming the field.
    let ia = Code::InvalidArgument;
    let a = live.attempt_id;
    for (what, m, fragment) in [
        ("NaN loss", v1::EpochMetrics { train_loss: f64::NAN, ..epoch2() }, "train_loss"),
        ("negative seconds", v1::EpochMetrics { seconds: -1.0, ..epoch2() }, "seconds"),
        ("accuracy over 1", v1::EpochMetrics { val_accuracy: 1.5, ..epoch2() }, "val_accuracy"),
        ("infinite accuracy", v1::EpochMetrics { train_accuracy: f64::INFINITY, ..epoch2() }, "train_accuracy"),
        ("infinite loss", v1::EpochMetrics { train_loss: f64::INFINITY, ..epoch2() }, "train_loss must be a finite"),
        ("absurd loss", v1::EpochMetrics { val_loss: 1.7e308, ..epoch2() }, "val_loss is 1.7e308; no epoch measures"),
        ("infinite seconds", v1::EpochMetrics { seconds: f64::INFINITY, ..epoch2() }, "seconds must be a finite"),
        ("absurd seconds", v1::EpochMetrics { seconds: 1e300, ..epoch2() }, "seconds is 1e300"),
        ("negative loss", v1::EpochMetrics { val_loss: -0.1, ..epoch2() }, "val_loss"),
        ("epoch 0", v1::EpochMetrics { epoch: 0, ..epoch2() }, "epoch"),
        ("epoch past the end", metrics(3, "fine_tuning"), "past the end"),
        ("epoch far past the end", metrics(u32::MAX, "fine_tuning"), "past the end"),
        ("wrong phase", metrics(2, "feature_extraction"), "fine_tuning"),
        ("unknown phase", metrics(2, "warmup"), "phase `warmup`"),
        ("empty phase", metrics(2, ""), "phase"),
    ] {
        refused(what, workers.report_epoch(report(&w, a, m)).await, ia, fragment);
    }
    let no_metrics = v1::ReportEpochRequest { metrics: None, ..report(&w, a, epoch2()) };
    refused("no metrics", workers.report_epoch(no_metrics).await, ia, "metrics");
    refused("attempt 0", workers.report_epoch(report(&w, 0, epoch2())).await, ia, "attempt_id");
    let empty_uri = v1::ReportEpochRequest {
        best_checkpoint: Some(v1::CheckpointRef { uri: String::new(), epoch: 2, ..Default::default() }),
        ..report(&w, a, epoch2())
    };
    refused("empty uri", workers.report_epoch(empty_uri).await, ia, "best_checkpoint");
    let other_epoch = v1::ReportEpochRequest {
        last_checkpoint: Some(v1::CheckpointRef { uri: "x".into(), epoch: 1, ..Default::default() }),
        ..report(&w, a, epoch2())
    };
    refused("checkpoint of another epoch", workers.report_epoch(other_epoch).await, ia, "last_checkpoint");
    let f = |outcome: i32, error_class: i32, wall_seconds: f64| v1::FinishAttemptRequest {
        outcome,
        error_class,
        wall_seconds,
        ..finish(&w, a, v1::Outcome::Failed)
    };
    refused("outcome 99", workers.finish_attempt(f(99, 0, 1.0)).await, ia, "outcome");
    refused("no outcome", workers.finish_attempt(f(0, 0, 1.0)).await, ia, "outcome");
    refused("error class 42", workers.finish_attempt(f(2, 42, 1.0)).await, ia, "error class");
    refused("NaN wall", workers.finish_attempt(f(2, 1, f64::NAN)).await, ia, "wall_seconds");
    refused("negative wall", workers.finish_attempt(f(2, 1, -3.0)).await, ia, "wall_seconds");
    refused("finish attempt 0", workers.finish_attempt(finish(&w, 0, failed)).await, ia, "attempt_id");
    refused("empty worker", workers.heartbeat(heartbeat("", 1)).await, ia, "worker_id");
    refused("acquire empty", workers.acquire_trial(acquire_as("", 1)).await, ia, "worker_id");
    let register = |devices: Vec<v1::Device>| v1::RegisterRequest { name: "r".into(), devices, version: "t".into() };
    let tpu = v1::Device { kind: "tpu".into(), ..cpu("tpu:0") };
    refused("device kind", workers.register(register(vec![tpu])).await, ia, "devices[0].kind");
    refused("no devices", workers.register(register(vec![])).await, ia, "at least one device");
    refused("empty device id", workers.register(register(vec![cpu("")])).await, ia, "device id");
    refused("twice", workers.register(register(vec![cpu("cpu:0"), cpu("cpu:0")])).await, ia, "listed twice");
    refused("empty sweep id", sweeps.get_sweep(v1::GetSweepRequest::default()).await, ia, "sweep id");
    refused("bad trial id", sweeps.get_trial(trial(&sweep, "x")).await, ia, "trial id");
    let submit =
        |yaml: String| v1::SubmitSweepRequest { spec_yaml: yaml, source: "bad.yaml".into(), ..Default::default() };
    refused("bad spec", sweeps.submit_sweep(submit(SPEC.replace("resnet50", "resnet51"))).await, ia, "bad.yaml:4:");
    refused("empty spec", sweeps.submit_sweep(submit(String::new())).await, ia, "bad.yaml:1:1: the spec is empty");
    // A name of a megabyte (66 of them made every later ListSweeps too large to decode).
    let long_name = SPEC.replace("name: wire", &format!("name: {}", "n".repeat(1_000_000)));
    refused("long name", sweeps.submit_sweep(submit(long_name)).await, ia, "name: is 1000000 characters long");
    let page = v1::ListSweepsRequest { page_size: 10, page_token: "nonsense".into(), ..Default::default() };
    refused("bad page token", sweeps.list_sweeps(page).await, ia, "page_token");
    // Deep enough to overflow the stack of the parser's thread before the spec parser was fixed.
    let deep = format!("{}x\n", "- ".repeat(200_000));
    refused("deep spec", sweeps.submit_sweep(submit(deep)).await, ia, "nested more than 64 levels");

    // Bodies that are not the request's protobuf message, to every method: INVALID_ARGUMENT
    // (or, where the bytes happen to decode, whatever the fields say), never INTERNAL.
    let invalid_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    for method in METHODS {
        let s = raw_call(&channel, method, vec![0xff, 0xff, 0xff, 0xff, 0x0f]).await;
        assert_eq!(s.code(), ia, "{method}: {s:?}");
        assert!(s.message().contains("failed to decode Protobuf message"), "{method}: {s:?}");
        if !method.contains("List") {
            let s = raw_call(&channel, method, invalid_utf8.clone()).await;
            assert!(matches!(s.code(), Code::InvalidArgument), "{method}: {s:?}");
        }
    }
    let s = raw_call(&channel, "/sweep.v1.SweepService/SubmitSweep", invalid_utf8).await;
    assert!(s.message().contains("SubmitSweepRequest.spec_yaml"), "names the field: {s:?}");
    // Random bytes (from a fixed seed) to the calls whose ids random bytes cannot hit by
    // prefix (CancelSweep and RetrySweep accept any unique prefix of a sweep id).
    let methods: Vec<&str> = METHODS.into_iter().filter(|m| !m.contains("Cancel") && !m.contains("Retry")).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..300 {
        let n = (round % 40) + 1;
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let method = methods[round % methods.len()];
        let s = raw_call(&channel, method, bytes.clone()).await;
        assert!(
            matches!(s.code(), Code::Ok | Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition),
            "{method} {bytes:?}: {s:?}"
        );
        if s.code() == Code::Ok {
            // Only calls that change nothing may succeed on random bytes.
            assert!(method.contains("/List") || method.contains("Heartbeat"), "{method} {bytes:?} was accepted");
        }
    }
    // Broken gRPC framing in a raw HTTP/2 request: a bad compression flag, a length prefix
    // longer than the body, a body shorter than a prefix.
    for (what, body) in [
        ("flag", "\u{5}\0\0\0\u{1}x".to_string()),
        ("short", "\0\0\0\0\u{64}abc".to_string()),
        ("stub", "\0\0".to_string()),
        ("text", "GET / HTTP/1.1\r\n\r\n".to_string()),
    ] {
        for method in ["/sweep.v1.SweepService/GetSweep", "/sweep.v1.WorkerService/ReportEpoch"] {
            let s = raw_http(&channel, method, body.clone()).await;
            assert_eq!(s.code(), ia, "{what} to {method}: {s:?}");
        }
    }
    let s = raw_http(&channel, "/sweep.v1.SweepService/NoSuchMethod", String::new()).await;
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");

    // Nothing stored changed, and the coordinator still serves: the running trial completes.
    assert_eq!(snapshot(&url, &sweep).await, before);
    let hb = workers.heartbeat(heartbeat(&w.worker_id, w.incarnation)).await.unwrap().into_inner();
    assert!(hb.cancel_attempt_ids.is_empty());
    workers.report_epoch(report(&w, live.attempt_id, epoch2())).await.unwrap();
    workers.finish_attempt(finish(&w, live.attempt_id, outcome)).await.unwrap();
    let status = sweeps.get_sweep(v1::GetSweepRequest { sweep_id: sweep.clone() }).await.unwrap().into_inner();
    assert_eq!(status.sweep.unwrap().state, "completed");
    let second = sweeps.submit_sweep(submit(SPEC.to_string())).await.unwrap().into_inner();
    assert_eq!(second.trial_count, 2);
    running.stop().await.unwrap();

    let report = sweep_coordinator::history::check_state_dir(&state).unwrap();
    assert!(report.is_clean(), "{report}");
}
