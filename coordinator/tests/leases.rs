//! Leases on an injected clock: the reaper of a running coordinator ends a silent worker's lease
//! exactly when the clock passes its last heartbeat plus TTL and grace, never before, and never
//! within the failover grace after a start — with time moved by hand, not slept through.

use std::sync::Arc;
use std::time::Duration;

use sweep_coordinator::clock::ManualClock;
use sweep_coordinator::server::{self, Config};
use sweep_proto::v1;
use sweep_proto::v1::sweep_service_client::SweepServiceClient;
use sweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;

const SPEC: &str = "\
name: leases
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }]
  epoch_split: [[1, 1]]
";

const TTL: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(20);

/// Lets the reaper run a few of its ticks (TTL/2 of tokio time, at least 100 ms) on the clock
/// as it stands.
async fn let_the_reaper_look() {
    tokio::time::sleep(Duration::from_millis(350)).await;
}

async fn states(sweeps: &mut SweepServiceClient<Channel>, sweep: &str) -> (String, String) {
    let status = sweeps.get_sweep(v1::GetSweepRequest { sweep_id: sweep.into() }).await.unwrap().into_inner();
    let workers = sweeps.list_workers(v1::ListWorkersRequest::default()).await.unwrap().into_inner();
    (status.trials[0].state.clone(), workers.workers[0].state.clone())
}

/// Submits the one-trial sweep, registers a worker and hands it the trial, on a coordinator
/// at `addr`; returns the sweep id and the worker's registration.
async fn a_worker_takes_the_trial(addr: std::net::SocketAddr) -> (String, v1::RegisterResponse) {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let sweep = SweepServiceClient::new(channel.clone())
        .submit_sweep(v1::SubmitSweepRequest {
            spec_yaml: SPEC.into(),
            source: "leases.yaml".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sweep_id;
    let mut workers = WorkerServiceClient::new(channel);
    let devices = vec![v1::Device { id: "cpu:0".into(), kind: "cpu".into(), name: "t".into(), memory_bytes: 0 }];
    let w = workers
        .register(v1::RegisterRequest { name: "w".into(), devices, version: "t".into() })
        .await
        .unwrap()
        .into_inner();
    let acquire = v1::AcquireTrialRequest {
        worker_id: w.worker_id.clone(),
        incarnation: w.incarnation,
        wait_ms: 0,
        session: w.session.clone(),
    };
    workers.acquire_trial(acquire).await.unwrap().into_inner().assignment.expect("the trial is handed out");
    (sweep, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_ends_when_the_clock_passes_the_last_heartbeat_plus_ttl_and_grace() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), dir.path().join("state"));
    // Leases of 10 s + 20 s on the manual clock; the reaper looks every 50 ms of real time.
    config.heartbeat_ttl = TTL;
    config.lease_grace = GRACE;
    config.clock = clock.clone();
    config.reaper_every = Some(Duration::from_millis(50));
    let running = server::start(config).await.unwrap();
    let (sweep, w) = a_worker_takes_the_trial(running.addr).await;
    let channel = Channel::from_shared(format!("http://{}", running.addr)).unwrap().connect().await.unwrap();
    let mut sweeps = SweepServiceClient::new(channel.clone());
    let mut workers = WorkerServiceClient::new(channel);
    let heartbeat = v1::HeartbeatRequest {
        worker_id: w.worker_id.clone(),
        incarnation: w.incarnation,
        running_attempt_ids: vec![],
        session: w.session.clone(),
    };

    // Heartbeats keep the lease however much time passes, as long as each comes in time.
    for _ in 0..5 {
        clock.advance(TTL + GRACE - Duration::from_millis(1));
        workers.heartbeat(heartbeat.clone()).await.unwrap();
        let_the_reaper_look().await;
        assert_eq!(states(&mut sweeps, &sweep).await, ("running".into(), "active".into()));
    }
    // Silent: one millisecond short of TTL + grace, the lease holds…
    clock.advance(TTL + GRACE - Duration::from_millis(1));
    let_the_reaper_look().await;
    assert_eq!(states(&mut sweeps, &sweep).await, ("running".into(), "active".into()));
    // …and past it, it ends: the worker is gone and its trial waits for another.
    clock.advance(Duration::from_millis(2));
    let mut seen = states(&mut sweeps, &sweep).await;
    for _ in 0..40 {
        if seen == ("pending".into(), "gone".into()) {
            break;
        }
        let_the_reaper_look().await;
        seen = states(&mut sweeps, &sweep).await;
    }
    assert_eq!(seen, ("pending".into(), "gone".into()));
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_gives_every_worker_a_whole_lease_before_ending_any() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let config = || {
        let mut c = Config::new("127.0.0.1:0".parse().unwrap(), state.clone());
        c.heartbeat_ttl = TTL;
        c.lease_grace = GRACE;
        c.clock = clock.clone();
        c.reaper_every = Some(Duration::from_millis(50));
        c
    };
    // A worker registers and takes the trial; then the coordinator stops, and an hour passes.
    let first = server::start(config()).await.unwrap();
    let (sweep, _) = a_worker_takes_the_trial(first.addr).await;
    first.stop().await.unwrap();
    clock.advance(Duration::from_secs(3600));

    // The new coordinator does not end the lease at once, though the last heartbeat is an hour
    // old: the worker gets TTL + grace from the start to come back.
    let second = server::start(config()).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", second.addr)).unwrap().connect().await.unwrap();
    let mut sweeps = SweepServiceClient::new(channel);
    clock.advance(TTL + GRACE - Duration::from_millis(1));
    let_the_reaper_look().await;
    assert_eq!(states(&mut sweeps, &sweep).await, ("running".into(), "active".into()));
    clock.advance(Duration::from_millis(1));
    let mut seen = states(&mut sweeps, &sweep).await;
    for _ in 0..40 {
        if seen.1 == "gone" {
            break;
        }
        let_the_reaper_look().await;
        seen = states(&mut sweeps, &sweep).await;
    }
    assert_eq!(seen, ("pending".into(), "gone".into()));
    second.stop().await.unwrap();
}
