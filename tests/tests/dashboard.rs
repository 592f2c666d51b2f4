//! The dashboard in a real browser (headless Chromium through `chromedriver`): every page loads
//! for a sweep run by the scripted worker and shows the leaderboard's numbers; a live update
//! arrives while a trial runs; names are shown as text with control characters escaped; with
//! `--tokens` a browser without a token gets nothing but the login form. A screenshot of each
//! page goes to `target/dashboard/` (the README shows one).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::browser::Driver;
use crate::util::*;

const SPEC: &str = "\
name: dashboard
dataset: { kind: synthetic, classes: 3, train_per_class: 6, val_per_class: 4, image_size: 32, seed: 1 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay: [{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }, { strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-5 }]
  epoch_split: [[1, 2], [2, 1]]
";

fn run_ok(args: &[&str], url: &str, extra_env: &[(&str, &str)]) -> String {
    let mut cmd = sweep();
    cmd.args(args).env("SWEEP_COORDINATOR", url);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = output(&mut cmd);
    assert!(out.status.success(), "sweep {args:?} failed: {}", stderr(&out));
    stdout(&out)
}

fn submit(url: &str, dir: &Path, name: &str, text: &str) -> String {
    let spec = write(dir, &format!("{name}.yaml"), text);
    run_ok(&["submit", spec.to_str().unwrap()], url, &[]).lines().last().unwrap().trim().to_string()
}

/// Where the screenshots go: `target/dashboard/`.
fn shots() -> PathBuf {
    bin_dir().parent().map(|t| t.join("dashboard")).unwrap_or_else(|| PathBuf::from("target/dashboard"))
}

fn pct(v: &Value) -> String {
    v.as_f64().map(|x| format!("{:.1}%", x * 100.0)).unwrap_or_else(|| "–".into())
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn every_page_loads_shows_the_leaderboards_numbers_and_updates_live() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let (_coord, url) = coordinator(&dir.path().join("state"), &["--metrics-listen", &http]);
    let base = format!("http://{http}");
    let id = submit(&url, dir.path(), "dashboard", SPEC);
    assert_eq!(scripted_worker(&url, "w1", 20).len(), 8);
    // A second sweep (to compare), named with markup; its first attempt fails with a message
    // that has markup and control characters (what a worker sends is not trusted).
    // (Another seed: the same grid would take every epoch from the first sweep.)
    let evil = SPEC.replace("name: dashboard", "name: \"evil <b>bold</b>\"").replace("seed: 1", "seed: 2");
    let second = submit(&url, dir.path(), "evil", &evil);
    failing_worker(&url, "bad", 1, "boom\u{1b}[31m<img src=x id=injected>");
    assert_eq!(scripted_worker(&url, "w2", 20).len(), 8);
    let board: Value = serde_json::from_str(&run_ok(&["leaderboard", &id, "-o", "json"], &url, &[])).unwrap();
    // The first sweep is tagged and annotated (a note with markup: shown as text).
    run_ok(&["tag", &id, "--add", "baseline", "--add", "cpu"], &url, &[]);
    run_ok(&["note", &id, "first <i>try</i>\nsecond line"], &url, &[]);

    let driver = Driver::start();
    let b = driver.browser(1400, 1800);
    let shots = shots();

    // Sweeps: both, with their state, counts and best accuracy; the name is text, escaped.
    b.open(&format!("{base}/"));
    let rows = b.wait_for(
        "const t = document.querySelector('#sweeps tbody'); return t && t.rows.length >= 2 ? [...t.rows].map(r => r.innerText) : null",
        WAIT,
    );
    let rows: Vec<String> = rows.as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let mine = rows.iter().find(|r| r.contains(&id)).expect("the sweep is listed");
    assert!(rows.iter().all(|r| !r.contains("\u{7}")));
    assert!(mine.contains("completed") && mine.contains("8/8 completed"), "{mine}");
    assert!(mine.contains(&pct(&board[0]["best_val_accuracy"])), "{mine} vs {}", board[0]);
    let evil_row = rows.iter().find(|r| r.contains(&second)).unwrap();
    assert!(evil_row.contains("evil <b>bold</b>"), "shown as text: {evil_row}");
    assert_eq!(b.run("return document.querySelectorAll('#sweeps b').length", vec![]), 0, "no markup from a name");
    assert!(mine.contains("baseline") && mine.contains("cpu"), "tags shown: {mine}");
    b.screenshot(&shots.join("sweeps.png"));
    // Filtered by a tag: only the tagged sweep.
    let filtered = b.run(
        "const s = document.getElementById('tag-filter'); s.value = 'baseline'; s.onchange();
         return [...document.querySelector('#sweeps tbody').rows].map(r => r.innerText)",
        vec![],
    );
    let filtered = filtered.as_array().unwrap();
    assert_eq!(filtered.len(), 1, "{filtered:?}");
    assert!(filtered[0].as_str().unwrap().contains(&id));

    // A sweep: the leaderboard's every number as `sweep leaderboard -o json` says; the charts.
    b.open(&format!("{base}/#/sweep/{id}"));
    let cells = b.wait_for(
        "const t = document.querySelector('#leaderboard tbody');
         return t && t.rows.length ? [...t.rows].map(r => [...r.cells].map(c => c.innerText)) : null",
        WAIT,
    );
    let cells = cells.as_array().unwrap();
    assert_eq!(cells.len(), board.as_array().unwrap().len());
    let note = b.run("const n = document.getElementById('note'); return n ? n.innerText : null", vec![]);
    assert_eq!(note, "first <i>try</i>\nsecond line", "the note, as text, line by line");
    assert_eq!(b.run("return document.querySelectorAll('#note i').length", vec![]), 0);
    for (row, entry) in cells.iter().zip(board.as_array().unwrap()) {
        let row: Vec<&str> = row.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(row[0], entry["rank"].to_string());
        assert_eq!(row[1], entry["trial"].as_str().unwrap());
        assert_eq!(row[2], entry["backbone"].as_str().unwrap());
        assert_eq!(row[6], pct(&entry["fe_val_accuracy"]), "{row:?} vs {entry}");
        assert_eq!(row[7], pct(&entry["best_val_accuracy"]), "{row:?} vs {entry}");
        assert_eq!(row[8], entry["best_epoch"].to_string());
    }
    let charts = b.run(
        "return [document.querySelectorAll('#all-trials canvas').length, document.querySelectorAll('#backbones rect').length,
                 document.querySelectorAll('#parallel polyline').length, document.querySelectorAll('.grid .card canvas').length]",
        vec![],
    );
    assert_eq!(
        charts,
        serde_json::json!([1, 2, 8, 8]),
        "every trial on one chart, 2 backbone bars, 8 lines, 8 trial charts"
    );
    // Shared feature extraction is marked (the [1, 2] and [2, 1] trials share epoch 1).
    let shared =
        b.run("return [...document.querySelectorAll('#leaderboard tbody tr')].map(r => r.cells[11].innerText)", vec![]);
    assert!(shared.as_array().unwrap().iter().any(|s| s.as_str().unwrap().starts_with("epoch 1 with t")), "{shared}");
    // Colour by strategy: one legend entry per strategy.
    b.run(
        "const s = document.getElementById('colour-by'); s.value = 'strategy'; s.dispatchEvent(new Event('change'))",
        vec![],
    );
    let legend = b.wait_for(
        "const l = document.querySelectorAll('#colour-legend span'); return l.length ? l.length : null",
        WAIT,
    );
    assert_eq!(legend, 2);
    b.screenshot(&shots.join("sweep.png"));

    // A trial: its epochs, attempts, events and checkpoints.
    let top = board[0]["trial"].as_str().unwrap();
    b.open(&format!("{base}/#/sweep/{id}/trial/{top}"));
    let epochs = b.wait_for("const t = document.querySelector('#epochs tbody'); return t ? t.rows.length : null", WAIT);
    assert_eq!(epochs, 3);
    let text = b.run("return document.getElementById('main').innerText", vec![]);
    let text = text.as_str().unwrap();
    assert!(text.contains("best.safetensors") && text.contains("Attempts") && text.contains("w1"), "{text}");
    assert!(b.run("return document.querySelectorAll('#events div').length", vec![]).as_u64().unwrap() >= 3);
    // Its checkpoints are links to their download (this coordinator has no --artifacts: the
    // answer says where the file is instead).
    let href =
        b.run("const a = document.querySelector('a.download-best'); return a ? a.getAttribute('href') : null", vec![]);
    assert_eq!(href.as_str().unwrap(), format!("/api/sweeps/{id}/trials/{top}/checkpoints/best"));
    let answer = b.run_async(
        "const done = arguments[0]; fetch(document.querySelector('a.download-best').href).then(async r => done([r.status, await r.text()]))",
    );
    assert_eq!(answer[0], 404);
    assert!(answer[1].as_str().unwrap().contains("without --artifacts"), "{answer}");
    b.screenshot(&shots.join("trial.png"));

    // The failed attempt's message, from a worker: text, its escape character shown escaped.
    // The first attempt was t001's: it runs the shared epoch 1 (the longest chains tie; it has
    // the most feature extraction).
    // (Wait for this trial's table: the previous trial page's table stays until the new one is drawn.)
    b.open(&format!("{base}/#/sweep/{second}/trial/t001"));
    let attempts = b.wait_for(
        "const t = document.querySelector('#attempts tbody'); return t && t.innerText.includes('boom') ? t.innerText : null",
        WAIT,
    );
    assert!(attempts.as_str().unwrap().contains("boom\\u{1b}[31m<img src=x id=injected>"), "{attempts}");
    assert_eq!(b.run("return document.getElementById('injected')", vec![]), Value::Null, "no markup from a worker");

    // Workers, and the two sweeps side by side.
    b.open(&format!("{base}/#/workers"));
    let workers = b.wait_for("const t = document.querySelector('#workers tbody'); return t ? t.innerText : null", WAIT);
    assert!(workers.as_str().unwrap().contains("w1") && workers.as_str().unwrap().contains("cpu:0"), "{workers}");
    b.screenshot(&shots.join("workers.png"));
    // Ticked on the sweeps page, then compared.
    b.open(&format!("{base}/"));
    b.wait_for("return document.querySelectorAll('input.pick').length === 2", WAIT);
    b.run("document.querySelectorAll('input.pick').forEach(c => c.click()); document.getElementById('compare-picked').click()", vec![]);
    let compared =
        b.wait_for("const t = document.querySelector('#compare tbody'); return t ? t.rows.length : null", WAIT);
    assert_eq!(compared, 16);
    b.screenshot(&shots.join("compare.png"));

    // Live: a new sweep's page is open while its trials run; the page follows.
    let live =
        submit(&url, dir.path(), "live", &SPEC.replace("name: dashboard", "name: live").replace("seed: 1", "seed: 3"));
    b.open(&format!("{base}/#/sweep/{live}"));
    b.wait_for("const s = document.getElementById('summary'); return s && s.innerText.includes('0/8 completed')", WAIT);
    b.wait_for("return !document.getElementById('live').hidden", WAIT);
    let worker = std::thread::spawn({
        let url = url.clone();
        move || scripted_worker(&url, "w3", 2)
    });
    let seen = b.wait_for(
        "const s = document.getElementById('summary'); return s && !s.innerText.includes('0/8 completed') ? s.innerText : null",
        WAIT,
    );
    assert!(seen.as_str().unwrap().contains("completed"), "{seen}");
    worker.join().unwrap();
    b.wait_for("const s = document.getElementById('summary'); return s && s.innerText.includes('2/8 completed')", WAIT);
}

#[test]
fn with_tokens_a_browser_without_one_gets_only_the_login_form() {
    let _bound = sweep_tests::bound(300);
    let dir = tempfile::tempdir().unwrap();
    let viewer = "viewer-browser-0123456789";
    let tokens = write(dir.path(), "tokens", &format!("viewer {viewer} v\nadmin admin-browser-0123456789 a\n"));
    let admin_file = write(dir.path(), "admin", "admin-browser-0123456789\n");
    let http = format!("127.0.0.1:{}", free_port());
    let (_coord, url) =
        coordinator(&dir.path().join("state"), &["--tokens", tokens.to_str().unwrap(), "--metrics-listen", &http]);
    let base = format!("http://{http}");
    let spec = write(dir.path(), "s.yaml", SPEC);
    let out = run_ok(&["submit", spec.to_str().unwrap()], &url, &[("SWEEP_TOKEN_FILE", admin_file.to_str().unwrap())]);
    let id = out.lines().last().unwrap().trim().to_string();

    let driver = Driver::start();
    let b = driver.browser(1200, 900);
    b.open(&format!("{base}/#/sweep/{id}"));
    b.wait_for("return document.getElementById('token') !== null", WAIT);
    assert!(b.url().contains("/login"), "{}", b.url());
    let body = b.run("return document.body.innerText", vec![]);
    assert!(!body.as_str().unwrap().contains(&id), "nothing of the sweep before logging in");
    // The API says 401 to this browser.
    let status = b.run_async("const done = arguments[0]; fetch('/api/sweeps').then(r => done(r.status))");
    assert_eq!(status, 401);
    b.screenshot(&shots().join("login.png"));
    // A wrong token: the form again, saying so.
    b.run(
        "document.getElementById('token').value = 'wrong-token-000000000'; document.getElementById('login').click()",
        vec![],
    );
    b.wait_for("const m = document.getElementById('message'); return m && m.innerText.includes('not valid')", WAIT);
    // The viewer's token: the dashboard, with the sweep.
    b.run(
        &format!("document.getElementById('token').value = '{viewer}'; document.getElementById('login').click()"),
        vec![],
    );
    let rows = b.wait_for(
        "const t = document.querySelector('#sweeps tbody'); return t && t.rows.length ? t.innerText : null",
        WAIT,
    );
    assert!(rows.as_str().unwrap().contains(&id), "{rows}");
    let status = b.run_async("const done = arguments[0]; fetch('/api/sweeps').then(r => done(r.status))");
    assert_eq!(status, 200);
    // The cookie is out of the page's reach (HttpOnly).
    assert_eq!(b.run("return document.cookie", vec![]), "");
    // Logging out: nothing again.
    b.run("document.querySelector('.logout button').click()", vec![]);
    b.wait_for("return document.getElementById('token') !== null", WAIT);
    let status = b.run_async("const done = arguments[0]; fetch('/api/sweeps').then(r => done(r.status))");
    assert_eq!(status, 401);
}
