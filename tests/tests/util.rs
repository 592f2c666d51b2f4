//! Shared helpers of the end-to-end tests: finding the release binaries, starting real
//! coordinator and worker processes, and cleaning them up.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/`, the directory of this test binary's parent.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-xxxx -> target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path of a workspace binary; tells how to build it when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries of this profile first (`make test` does; or `cargo build --release --bins`)",
        p.display()
    );
    p
}

pub fn sweep() -> Command {
    Command::new(bin("sweep"))
}

/// Runs a command to completion.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// SIGTERM, then wait.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Starts `sweep coordinator` on a free loopback port over `state_dir`; returns it and its URL.
pub fn coordinator(state_dir: &Path, extra: &[&str]) -> (Proc, String) {
    coordinator_at(state_dir, "127.0.0.1:0", extra)
}

/// [`coordinator`] listening on `listen`.
pub fn coordinator_at(state_dir: &Path, listen: &str, extra: &[&str]) -> (Proc, String) {
    let mut child = sweep()
        .args(["coordinator", "--listen", listen, "--state-dir"])
        .arg(state_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start coordinator");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).expect("coordinator prints its address");
    // "coordinator listening on 127.0.0.1:PORT (state in DIR)"
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected first line from the coordinator: {line:?}"))
        .to_string();
    (Proc { child, name: "coordinator".into() }, format!("http://{addr}"))
}

/// A loopback port free right now (for a coordinator that must come back on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Starts a `sweep-worker` with one intra-op thread, logging to `<dir>/<name>.log` and
/// writing checkpoints under `<dir>/artifacts`.
pub fn worker(url: &str, name: &str, dir: &Path) -> Proc {
    worker_with(url, name, dir, &[])
}

/// [`worker`] with extra arguments (`--devices cpu:0,cpu:1`).
pub fn worker_with(url: &str, name: &str, dir: &Path, extra: &[&str]) -> Proc {
    let artifacts = dir.join("artifacts");
    worker_in(url, name, dir, artifacts.to_str().expect("utf-8 path"), &dir.join("cache"), extra, &[])
}

/// A `sweep-worker` with its own artifact store location, cache directory and environment,
/// logging to `<dir>/<name>.log`.
pub fn worker_in(
    url: &str,
    name: &str,
    dir: &Path,
    artifacts: &str,
    cache: &Path,
    extra: &[&str],
    env: &[(String, String)],
) -> Proc {
    let file = std::fs::File::create(dir.join(format!("{name}.log"))).expect("worker log");
    let child = Command::new(bin("sweep-worker"))
        .args(["--coordinator", url, "--name", name, "--threads", "1", "--poll-wait", "2", "--artifacts", artifacts])
        .arg("--cache-dir")
        .arg(cache)
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::from(file.try_clone().expect("log")))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start worker");
    Proc { child, name: name.into() }
}

/// A local S3-compatible server (moto, from the project's `.venv`) on a free loopback port,
/// with one bucket.
pub struct S3Server {
    _proc: Proc,
    pub endpoint: String,
    pub bucket: String,
}

/// The project's venv `bin/` (created by `make`).
pub fn venv_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin").join(name);
    assert!(p.is_file(), "{} is missing: `make test` installs requirements.txt into .venv", p.display());
    p
}

impl S3Server {
    /// Starts the server (its log in `<dir>/s3.log`) and creates `bucket`.
    pub fn start(dir: &Path, bucket: &str) -> S3Server {
        let port = free_port();
        let log = std::fs::File::create(dir.join("s3.log")).expect("s3 log");
        let child = Command::new(venv_bin("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start moto_server");
        let proc = Proc { child, name: "s3".into() };
        wait_for(Duration::from_secs(60), "the S3 server to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let s3 = S3Server { _proc: proc, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.into() };
        s3.python(&format!("s3.create_bucket(Bucket='{bucket}')"));
        s3
    }

    /// What a worker needs in its environment to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "sweep-test"),
            ("AWS_SECRET_ACCESS_KEY", "sweep-test-secret"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Runs Python with a boto3 client `s3` of this server (a client that is not ours) and
    /// returns what it printed.
    pub fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='sweep-test', \
             aws_secret_access_key='sweep-test-secret', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        let out = output(Command::new(venv_bin("python")).arg("-c").arg(script));
        assert!(out.status.success(), "python against the S3 server failed: {}", stderr(&out));
        stdout(&out)
    }

    /// Every key in the bucket, sorted, with its size.
    pub fn objects(&self) -> Vec<(String, u64)> {
        let listing = self.python(&format!(
            "for o in s3.list_objects_v2(Bucket='{}').get('Contents', []): print(o['Key'], o['Size'])",
            self.bucket
        ));
        let mut found: Vec<(String, u64)> = listing
            .lines()
            .filter_map(|l| l.rsplit_once(' ').map(|(k, n)| (k.to_string(), n.parse().unwrap_or(0))))
            .collect();
        found.sort();
        found
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A tiny sweep that trains in seconds on one CPU thread: resnet18 at 32 px, 2 trials.
pub const TINY_SPEC: &str = "\
name: tiny
dataset: { kind: synthetic, classes: 3, train_per_class: 6, val_per_class: 4, image_size: 32, seed: 1 }
training:
  batch_size: 8
  augment: { hflip: true, rotation_deg: 5, shear_deg: 0, color_jitter: 0.1 }
grid:
  backbone: [resnet18]
  lr_decay:
    - { strategy: exponential, head_lr: 1.0e-3, factor: 3 }
  epoch_split: [[1, 1], [2, 1]]
retries: { max_attempts: 2 }
";

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

/// Asserts that a coordinator's state directory keeps the store's invariants (what
/// `sweep check-state` checks); the coordinator may still be running on it.
pub fn assert_history_clean(state_dir: &Path) {
    let report = sweep_coordinator::history::check_state_dir(state_dir).expect("the state directory is readable");
    assert!(report.is_clean(), "{report}");
}

/// A loopback TCP proxy that can partition its clients from the server: while cut, every
/// connection through it is closed and new ones are refused (closed on accept).
pub struct Proxy {
    pub url: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Forwards `127.0.0.1:<new port>` to `target` (`http://host:port`).
    pub fn start(target: &str) -> Proxy {
        use std::sync::atomic::Ordering;
        let target = target.trim_start_matches("http://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || pump(from, to, &flag));
                }
            }
        });
        Proxy { url, cut }
    }

    /// Partitions (`true`) or heals (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, cut: &std::sync::atomic::AtomicBool) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 16 * 1024];
    loop {
        if cut.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A worker written into the test: registers with `url` and runs up to `max_trials` trials,
/// reporting deterministic metrics (they depend only on the trial index and the epoch: val
/// accuracy `0.30 + 0.08 × epoch + 0.01 × index`, a second per epoch, 10 s per attempt) so that
/// what the CLI prints can be compared with stored snapshots. Returns the trials it ran.
pub fn scripted_worker(url: &str, name: &str, max_trials: usize) -> Vec<String> {
    scripted_worker_with(url, name, max_trials, None)
}

/// [`scripted_worker`] whose calls carry the bearer token `token`.
pub fn scripted_worker_with(url: &str, name: &str, max_trials: usize, token: Option<&str>) -> Vec<String> {
    use sweep_proto::v1;
    use sweep_proto::v1::worker_service_client::WorkerServiceClient;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().expect("token header"));
    rt.block_on(async {
        let channel =
            tonic::transport::Channel::from_shared(url.to_string()).expect("url").connect().await.expect("connect");
        let mut c = WorkerServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            if let Some(h) = &header {
                r.metadata_mut().insert("authorization", h.clone());
            }
            Ok(r)
        });
        let reg = c
            .register(v1::RegisterRequest {
                name: name.into(),
                devices: vec![v1::Device {
                    id: "cpu:0".into(),
                    kind: "cpu".into(),
                    name: "test CPU".into(),
                    memory_bytes: 1 << 30,
                }],
                version: "test".into(),
            })
            .await
            .expect("register")
            .into_inner();
        let mut ran = Vec::new();
        while ran.len() < max_trials {
            let got = c
                .acquire_trial(v1::AcquireTrialRequest {
                    worker_id: reg.worker_id.clone(),
                    incarnation: reg.incarnation,
                    wait_ms: 500,
                    session: reg.session.clone(),
                })
                .await
                .expect("acquire")
                .into_inner();
            let Some(a) = got.assignment else { break };
            let epochs = a.fe_epochs + a.ft_epochs;
            let mut stopped = false;
            // Go on after the resume point handed over (epochs stored before, maybe computed
            // for this trial by one it shares them with), as a worker does.
            let start = a.resume.as_ref().map_or(0, |r| r.epoch);
            for epoch in start + 1..=epochs {
                let val = 0.30 + 0.08 * epoch as f64 + 0.01 * a.trial_index as f64;
                let phase = if epoch <= a.fe_epochs { "feature_extraction" } else { "fine_tuning" };
                let reference = |what: &str| v1::CheckpointRef {
                    uri: format!("/artifacts/{}/{}/{what}.safetensors", a.sweep_id, a.trial_id),
                    sha256: "00".repeat(32),
                    bytes: 1000,
                    epoch,
                };
                let reply = c
                    .report_epoch(v1::ReportEpochRequest {
                        attempt_id: a.attempt_id,
                        metrics: Some(v1::EpochMetrics {
                            epoch,
                            phase: phase.into(),
                            train_loss: 2.0 / epoch as f64,
                            train_accuracy: val + 0.02,
                            val_loss: 2.2 / epoch as f64,
                            val_accuracy: val,
                            seconds: 1.0,
                            attempt_id: 0,
                            shared_with: Vec::new(),
                            reused_from: String::new(),
                        }),
                        parameters: 11_000_000 + a.trial_index as u64,
                        last_checkpoint: Some(reference("last")),
                        best_checkpoint: Some(reference("best")),
                        skipped_images: 0,
                        resume_checkpoint: Some(reference(&format!("state-e{epoch:04}"))),
                        resumed_from_epoch: 0,
                        note: String::new(),
                        worker_id: reg.worker_id.clone(),
                        session: reg.session.clone(),
                    })
                    .await
                    .expect("report")
                    .into_inner();
                // Told to stop (cancelled, or stopped early): stop as a worker does.
                if reply.cancel {
                    stopped = true;
                    break;
                }
            }
            let outcome = if stopped { v1::Outcome::Cancelled } else { v1::Outcome::Succeeded };
            c.finish_attempt(v1::FinishAttemptRequest {
                attempt_id: a.attempt_id,
                outcome: outcome as i32,
                error_class: v1::ErrorClass::Unspecified as i32,
                message: if stopped { "stopped on request".into() } else { String::new() },
                wall_seconds: 10.0,
                worker_id: reg.worker_id.clone(),
                session: reg.session.clone(),
            })
            .await
            .expect("finish");
            ran.push(a.trial_id);
        }
        ran
    })
}

/// A WorkerService client written into the test, registered with one CPU device: calls the
/// coordinator as a worker would, in its own name (worker id and session).
pub struct TestWorker {
    rt: tokio::runtime::Runtime,
    client: sweep_proto::v1::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    pub reg: sweep_proto::v1::RegisterResponse,
}

impl TestWorker {
    /// Registers as `name`, its device named `device`, its version `version`.
    pub fn register(url: &str, name: &str, device: &str, version: &str) -> TestWorker {
        use sweep_proto::v1;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut client =
            rt.block_on(v1::worker_service_client::WorkerServiceClient::connect(url.to_string())).expect("connect");
        let device = v1::Device { id: "cpu:0".into(), kind: "cpu".into(), name: device.into(), memory_bytes: 0 };
        let request = v1::RegisterRequest { name: name.into(), devices: vec![device], version: version.into() };
        let reg = rt.block_on(client.register(request)).expect("register").into_inner();
        TestWorker { rt, client, reg }
    }

    /// The next trial, waiting up to `wait_ms` for one.
    pub fn acquire(&mut self, wait_ms: u64) -> Option<sweep_proto::v1::Assignment> {
        let request = sweep_proto::v1::AcquireTrialRequest {
            worker_id: self.reg.worker_id.clone(),
            incarnation: self.reg.incarnation,
            wait_ms,
            session: self.reg.session.clone(),
        };
        self.rt.block_on(self.client.acquire_trial(request)).expect("acquire").into_inner().assignment
    }

    /// Reports `metrics` for `attempt_id`; the status code of the answer.
    pub fn report(&mut self, attempt_id: u64, metrics: sweep_proto::v1::EpochMetrics) -> tonic::Code {
        let request = sweep_proto::v1::ReportEpochRequest {
            attempt_id,
            metrics: Some(metrics),
            worker_id: self.reg.worker_id.clone(),
            session: self.reg.session.clone(),
            ..Default::default()
        };
        self.rt.block_on(self.client.report_epoch(request)).err().map_or(tonic::Code::Ok, |s| s.code())
    }

    /// Ends `attempt_id` as failed with `class` and `message`.
    pub fn fail(&mut self, attempt_id: u64, class: sweep_proto::v1::ErrorClass, message: &str) {
        let request = sweep_proto::v1::FinishAttemptRequest {
            attempt_id,
            outcome: sweep_proto::v1::Outcome::Failed as i32,
            error_class: class as i32,
            message: message.into(),
            wall_seconds: 1.0,
            worker_id: self.reg.worker_id.clone(),
            session: self.reg.session.clone(),
        };
        self.rt.block_on(self.client.finish_attempt(request)).expect("finish");
    }
}

/// A worker written into the test whose attempts all fail, retryably, with `message` (a worker
/// with a bad device): registers as `name`, takes and fails `failures` attempts, and returns its
/// worker id. It sends no heartbeats afterwards.
pub fn failing_worker(url: &str, name: &str, failures: usize, message: &str) -> String {
    let mut w = TestWorker::register(url, name, "test CPU", "test");
    for _ in 0..failures {
        let a = w.acquire(5000).expect("a trial to fail");
        w.fail(a.attempt_id, sweep_proto::v1::ErrorClass::Retryable, message);
    }
    w.reg.worker_id.clone()
}

/// The body of `GET http://ADDR/PATH`, with the status code.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read");
    let status = out.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
