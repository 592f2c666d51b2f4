//! Security and operations on the wire: bearer tokens with roles, TLS and mutual TLS from the
//! CLI to a training worker, the standard health and reflection services and `/metrics` as
//! stock clients see them, and start-up refusals of unreadable settings.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sweep_proto::v1;
use tonic::Code;

use super::util::*;

const CLIENT: &str = "client-token-0123456789abcdef";
const VIEWER: &str = "viewer-token-0123456789abcdef";
const WORKER: &str = "worker-token-0123456789abcdef";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn tokens_file(dir: &Path) -> PathBuf {
    write(
        dir,
        "tokens",
        &format!(
            "# role token name\nclient {CLIENT} alice\nviewer {VIEWER} grafana\nworker {WORKER} pool\nadmin {ADMIN} ops\n"
        ),
    )
}

fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    write(dir, name, &format!("{token}\n"))
}

/// A code from calling `f` on a SweepService client (and a WorkerService one) with `token`.
fn code_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn channel(rt: &tokio::runtime::Runtime, url: &str) -> tonic::transport::Channel {
    rt.block_on(tonic::transport::Channel::from_shared(url.to_string()).unwrap().connect()).expect("connect")
}

fn with_token(
    token: Option<&str>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|t| format!("Bearer {t}").parse().unwrap());
    move |mut r: tonic::Request<()>| {
        if let Some(h) = &header {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    }
}

#[test]
fn tokens_decide_who_may_call_what() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--tokens", tokens.to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ch = channel(&rt, &url);
    let sweeps =
        |t: Option<&str>| v1::sweep_service_client::SweepServiceClient::with_interceptor(ch.clone(), with_token(t));
    let workers =
        |t: Option<&str>| v1::worker_service_client::WorkerServiceClient::with_interceptor(ch.clone(), with_token(t));
    let submit = v1::SubmitSweepRequest { spec_yaml: TINY_SPEC.into(), source: "test".into(), ..Default::default() };
    let register = v1::RegisterRequest {
        name: "x".into(),
        devices: vec![v1::Device { id: "cpu:0".into(), kind: "cpu".into(), name: "cpu".into(), memory_bytes: 1 }],
        version: "t".into(),
    };

    // No token, or one the file does not hold: UNAUTHENTICATED, and nothing happens.
    assert_eq!(code_of(rt.block_on(sweeps(None).list_sweeps(v1::ListSweepsRequest::default()))), Code::Unauthenticated);
    assert_eq!(
        code_of(rt.block_on(sweeps(Some("not-a-token-of-this-file")).submit_sweep(submit.clone()))),
        Code::Unauthenticated
    );
    assert_eq!(code_of(rt.block_on(workers(None).register(register.clone()))), Code::Unauthenticated);
    // A worker token cannot submit or cancel; a client token cannot act as a worker.
    assert_eq!(code_of(rt.block_on(sweeps(Some(WORKER)).submit_sweep(submit.clone()))), Code::PermissionDenied);
    let id =
        rt.block_on(sweeps(Some(CLIENT)).submit_sweep(submit.clone())).expect("client submits").into_inner().sweep_id;
    let cancel = v1::CancelSweepRequest { sweep_id: id.clone() };
    assert_eq!(code_of(rt.block_on(sweeps(Some(WORKER)).cancel_sweep(cancel.clone()))), Code::PermissionDenied);
    assert_eq!(code_of(rt.block_on(sweeps(Some(VIEWER)).cancel_sweep(cancel.clone()))), Code::PermissionDenied);
    assert_eq!(code_of(rt.block_on(sweeps(Some(VIEWER)).submit_sweep(submit.clone()))), Code::PermissionDenied);
    assert_eq!(code_of(rt.block_on(workers(Some(CLIENT)).register(register.clone()))), Code::PermissionDenied);
    assert_eq!(code_of(rt.block_on(workers(Some(VIEWER)).register(register.clone()))), Code::PermissionDenied);
    // What each role may do, it can.
    let get = v1::GetSweepRequest { sweep_id: id.clone() };
    assert_eq!(code_of(rt.block_on(sweeps(Some(VIEWER)).get_sweep(get.clone()))), Code::Ok);
    assert_eq!(code_of(rt.block_on(sweeps(Some(ADMIN)).get_sweep(get.clone()))), Code::Ok);
    assert_eq!(code_of(rt.block_on(workers(Some(WORKER)).register(register.clone()))), Code::Ok);
    // Nothing a refused call asked for happened: one sweep, not cancelled.
    let listed =
        rt.block_on(sweeps(Some(VIEWER)).list_sweeps(v1::ListSweepsRequest::default())).unwrap().into_inner().sweeps;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].counts.unwrap().cancelled, 0);
    assert_ne!(listed[0].state, "cancelled");
    let e = rt.block_on(sweeps(Some(WORKER)).submit_sweep(submit)).unwrap_err();
    assert!(e.message().contains("a worker token (pool) may not call /sweep.v1.SweepService/SubmitSweep"), "{e:?}");

    // The CLI: no token says how to give one; the right one works; a worker token is refused.
    let list = |extra: &[&str]| {
        output(sweep().args(["list", "--coordinator", &url]).args(extra).env_remove("SWEEP_TOKEN_FILE"))
    };
    let out = list(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs a bearer token") && stderr(&out).contains("--token-file"), "{}", stderr(&out));
    let client_file = token_file(dir.path(), "client.token", CLIENT);
    let out = list(&["--token-file", client_file.to_str().unwrap()]);
    assert!(out.status.success() && stdout(&out).contains(&id), "{}", stderr(&out));
    let worker_file = token_file(dir.path(), "worker.token", WORKER);
    let spec = write(dir.path(), "tiny.yaml", TINY_SPEC);
    let out = output(
        sweep().args(["submit", "--coordinator", &url, "--token-file", worker_file.to_str().unwrap()]).arg(&spec),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("refused the call") && stderr(&out).contains("worker token"), "{}", stderr(&out));
    // A daemon with a client token stops at registration, saying why.
    let out = output(
        Command::new(bin("sweep-worker"))
            .args(["--coordinator", &url, "--token-file", client_file.to_str().unwrap(), "--cache-dir"])
            .arg(dir.path().join("cache"))
            .arg("--artifacts")
            .arg(dir.path().join("artifacts")),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("refused this worker") && stderr(&out).contains("client token"), "{}", stderr(&out));
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn unreadable_settings_stop_start_up_naming_the_file() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let start = |extra: &[&str]| {
        output(
            sweep()
                .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
                .arg(dir.path().join("state"))
                .args(extra),
        )
    };
    let missing = dir.path().join("missing.pem");
    let m = missing.to_str().unwrap();
    for (args, want) in [
        (vec!["--tokens", m], "cannot read tokens file"),
        (vec!["--tls-cert", m, "--tls-key", m], "cannot read TLS certificate"),
    ] {
        let out = start(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(want) && stderr(&out).contains("missing.pem"), "{args:?}: {}", stderr(&out));
    }
    let bad = write(dir.path(), "bad-tokens", "client aaaaaaaaaaaaaaaaaaaaaaa\nsuperuser bbbbbbbbbbbbbbbbbbbbbbbbb\n");
    let out = start(&["--tokens", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("bad-tokens:2: unknown role `superuser`"), "{}", stderr(&out));
    // A half-given certificate pair is a usage error.
    let out = start(&["--tls-cert", m]);
    assert!(!out.status.success() && stderr(&out).contains("--tls-key"), "{}", stderr(&out));
    // Nothing was created by the refused starts.
    assert!(!dir.path().join("state").exists());

    // Clients and workers read their files before connecting.
    let out = output(sweep().args(["list", "--token-file", m]));
    assert!(
        !out.status.success()
            && stderr(&out).contains("cannot read token file")
            && stderr(&out).contains("missing.pem")
    );
    let out = output(sweep().args(["list", "--coordinator", "https://localhost:1", "--ca-cert", m]));
    assert!(!out.status.success() && stderr(&out).contains("cannot read CA certificate"), "{}", stderr(&out));
    let out = output(
        Command::new(bin("sweep-worker"))
            .args(["--coordinator", "https://localhost:1", "--ca-cert", m, "--cache-dir"])
            .arg(dir.path().join("cache")),
    );
    assert!(!out.status.success() && stderr(&out).contains("cannot read CA certificate"), "{}", stderr(&out));
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A second client certificate of the same CA (another node).
    other_cert: PathBuf,
    other_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "sweep test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "sweep coordinator");
    let (cc, ck) = leaf(vec!["worker.sweep.test".into()], "sweep worker");
    let (oc, ok) = leaf(vec!["other.sweep.test".into()], "another sweep worker");
    Pki {
        ca: write(dir, "ca.pem", &ca.pem()),
        server_cert: write(dir, "server.pem", &sc),
        server_key: write(dir, "server.key", &sk),
        client_cert: write(dir, "client.pem", &cc),
        client_key: write(dir, "client.key", &ck),
        other_cert: write(dir, "other.pem", &oc),
        other_key: write(dir, "other.key", &ok),
    }
}

#[test]
fn mutual_tls_and_tokens_from_the_cli_to_a_training_worker_and_its_metrics() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let tokens = tokens_file(dir.path());
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let port = free_port();
    let (_coord, _) = coordinator_at(
        &dir.path().join("state"),
        &format!("127.0.0.1:{port}"),
        &[
            "--tls-cert",
            &s(&p.server_cert),
            "--tls-key",
            &s(&p.server_key),
            "--client-ca",
            &s(&p.ca),
            "--tokens",
            &s(&tokens),
            "--heartbeat-ttl",
            "2",
        ],
    );
    let url = format!("https://localhost:{port}");
    let client_token = token_file(dir.path(), "client.token", CLIENT);
    let tls = [
        "--ca-cert".to_string(),
        s(&p.ca),
        "--client-cert".into(),
        s(&p.client_cert),
        "--client-key".into(),
        s(&p.client_key),
        "--token-file".into(),
        s(&client_token),
    ];
    let cli = |args: &[&str], tls: &[String]| output(sweep().args(args).args(["--coordinator", &url]).args(tls));
    let spec = write(dir.path(), "tiny.yaml", TINY_SPEC);
    let out = cli(&["submit", spec.to_str().unwrap()], &tls);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).lines().last().unwrap().trim().to_string();

    // Without the client certificate, without the CA, or in plaintext: no connection.
    for (what, args) in [
        ("no client certificate", tls[..2].iter().chain(&tls[6..]).cloned().collect::<Vec<_>>()),
        ("no CA", tls[2..].to_vec()),
    ] {
        let out = cli(&["list"], &args);
        let e = stderr(&out);
        // An error with a message, never a silent death (SIGPIPE on the refused connection).
        assert_eq!(out.status.code(), Some(1), "{what}: {}\n{e}", stdout(&out));
        println!("{what}: {e}");
        // Refused in the handshake; how the refusal reads depends on timing (the server's
        // alert, or a connection closed before it was read), never on a reply.
        assert!(e.contains("cannot reach the coordinator") || e.contains("transport error"), "{what}: {e}");
    }
    let out = output(sweep().args([
        "list",
        "--coordinator",
        &format!("http://127.0.0.1:{port}"),
        "--token-file",
        &s(&client_token),
    ]));
    assert!(!out.status.success(), "plaintext to a TLS port: {}", stdout(&out));

    // A real worker over mutual TLS with a worker token trains the sweep.
    let worker_token = token_file(dir.path(), "worker.token", WORKER);
    let metrics = format!("127.0.0.1:{}", free_port());
    let _w = worker_in(
        &url,
        "w",
        dir.path(),
        dir.path().join("artifacts").to_str().unwrap(),
        &dir.path().join("cache"),
        &[
            "--ca-cert",
            &s(&p.ca),
            "--client-cert",
            &s(&p.client_cert),
            "--client-key",
            &s(&p.client_key),
            "--token-file",
            &s(&worker_token),
            "--metrics-listen",
            &metrics,
        ],
        &[],
    );
    let log = dir.path().join("w.log");
    wait_for(Duration::from_secs(180), "the sweep to complete over TLS", || {
        let out = cli(&["status", &id, "--output", "json"], &tls);
        assert!(out.status.success(), "{}\n{}", stderr(&out), std::fs::read_to_string(&log).unwrap_or_default());
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_ne!(v["state"], "failed", "{v}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        (v["state"] == "completed").then_some(())
    });
    // The worker's metrics count the epochs it trained: 1+1 and 2+1, the first epoch shared
    // (computed once).
    let (status, body) = http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("sweep_worker_epochs_total 4\n"), "{body}");
    assert!(body.contains("# TYPE sweep_worker_epoch_seconds histogram"), "{body}");
    assert!(body.contains("sweep_worker_images_per_second "), "{body}");
    assert_eq!(http_get(&metrics, "/healthz"), (200, "ok\n".into()));

    // A worker is bound to the client certificate it registered with: the same token and its
    // own session, over a connection with another node's certificate, is refused.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let connect = |cert: &PathBuf, key: &PathBuf| {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(&p.ca).unwrap()))
            .identity(tonic::transport::Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()))
            .domain_name("localhost");
        let channel = rt
            .block_on(tonic::transport::Channel::from_shared(url.clone()).unwrap().tls_config(tls).unwrap().connect());
        let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {WORKER}").parse().unwrap();
        v1::worker_service_client::WorkerServiceClient::with_interceptor(
            channel.unwrap(),
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", header.clone());
                Ok(r)
            },
        )
    };
    let mut mine = connect(&p.client_cert, &p.client_key);
    let mut other = connect(&p.other_cert, &p.other_key);
    let device = v1::Device { id: "cpu:0".into(), kind: "cpu".into(), name: "t".into(), memory_bytes: 0 };
    let reg = rt
        .block_on(mine.register(v1::RegisterRequest {
            name: "bound".into(),
            devices: vec![device],
            version: "t".into(),
        }))
        .unwrap()
        .into_inner();
    let beat = v1::HeartbeatRequest {
        worker_id: reg.worker_id.clone(),
        incarnation: reg.incarnation,
        running_attempt_ids: vec![],
        session: reg.session.clone(),
    };
    let refused = rt.block_on(other.heartbeat(beat.clone())).unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("another identity"), "{refused:?}");
    assert!(rt.block_on(mine.heartbeat(beat)).is_ok());
    assert_history_clean(&dir.path().join("state"));
}

#[test]
fn stock_clients_see_health_reflection_and_prometheus_metrics() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let health = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let (_coord, url) = coordinator(
        &dir.path().join("state"),
        &["--tokens", tokens.to_str().unwrap(), "--health-listen", &health, "--metrics-listen", &metrics],
    );
    let client_token = token_file(dir.path(), "client.token", CLIENT);
    let spec = write(dir.path(), "tiny.yaml", TINY_SPEC);
    let out = output(
        sweep().args(["submit", "--coordinator", &url, "--token-file", client_token.to_str().unwrap()]).arg(&spec),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(scripted_worker_with(&url, "w", 10, Some(WORKER)).len(), 2);

    let target = url.trim_start_matches("http://");
    let out = output(
        Command::new(venv_bin("python"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/stock_clients.py"))
            .args(["--target", target, "--health", &health, "--token", VIEWER])
            .args(["--metrics", &format!("http://{metrics}/metrics")]),
    );
    println!("{}", stdout(&out));
    assert!(out.status.success(), "stock clients:\n{}\n{}", stdout(&out), stderr(&out));

    // The figures themselves: 2 trials of 1+1 and 2+1 epochs, the first shared (reported
    // once), one worker.
    let (status, body) = http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "sweep_reports_total 4\n",
        "sweep_trials{state=\"completed\"} 2\n",
        "sweep_sweeps{state=\"completed\"} 1\n",
        "sweep_workers{state=\"active\"} 1\n",
        "sweep_scheduling_latency_seconds_count 2\n",
    ] {
        assert!(body.contains(line), "{line:?} not in\n{body}");
    }
    assert_eq!(http_get(&metrics, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&metrics, "/nope").0, 404);
}

#[test]
fn logs_are_json_lines_on_request() {
    let _bound = sweep_tests::bound(300);
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = sweep()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .env("SWEEP_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "coordinator listening", "{v}");
    assert!(v["fields"]["addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{v}");
    assert!(v["timestamp"].is_string(), "{v}");
}
