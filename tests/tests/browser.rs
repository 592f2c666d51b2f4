//! A W3C WebDriver client, just what the dashboard tests need, over plain HTTP to a local
//! `chromedriver` (Debian's `chromium-driver`, which `scripts/install-browser.sh` installs):
//! start a headless Chromium session, open a URL, run a script in the page, take a screenshot.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A running `chromedriver`, stopped on drop.
pub struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser session, ended on drop.
pub struct Browser {
    port: u16,
    session: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(self.port, "DELETE", &format!("/session/{}", self.session), None);
    }
}

/// One WebDriver call: its `value`, or an error with the driver's message.
fn call(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("chromedriver: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver keeps the connection open: read the head, then the body's announced length
    // (or its chunks, to the last).
    let mut raw = Vec::new();
    let mut chunk = [0u8; 65536];
    let rest = loop {
        let n = s.read(&mut chunk).map_err(|e| format!("chromedriver: {e}"))?;
        raw.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            match length {
                Some(len) if body.len() >= len => break body[..len].to_string(),
                None if lower.contains("transfer-encoding: chunked") && body.contains("\r\n0\r\n") => {
                    break unchunk(body);
                }
                _ if n == 0 => break body.to_string(),
                _ => {}
            }
        } else if n == 0 {
            return Err("no HTTP answer from chromedriver".into());
        }
    };
    let v: Value = serde_json::from_str(&rest).map_err(|e| format!("chromedriver answered {rest:?}: {e}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if let Some(err) = value.get("error").and_then(Value::as_str) {
        return Err(format!("{err}: {}", value.get("message").and_then(Value::as_str).unwrap_or("")));
    }
    Ok(value)
}

fn unchunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

impl Driver {
    /// Starts `chromedriver` on a free port and waits until it is ready.
    pub fn start() -> Driver {
        let port = crate::util::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (`make test` installs it: scripts/install-browser.sh)");
        let driver = Driver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(port, "GET", "/status", None).map(|v| v["ready"] == true) != Ok(true) {
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        driver
    }

    /// A new headless Chromium session with a window of `width` × `height`.
    pub fn browser(&self, width: u32, height: u32) -> Browser {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         format!("--window-size={width},{height}"), "--force-device-scale-factor=1"],
            },
        }}});
        let v = call(self.port, "POST", "/session", Some(&caps)).expect("a browser session");
        let session = v["sessionId"].as_str().expect("a session id").to_string();
        Browser { port: self.port, session }
    }
}

impl Browser {
    fn path(&self, what: &str) -> String {
        format!("/session/{}/{what}", self.session)
    }

    pub fn open(&self, url: &str) {
        call(self.port, "POST", &self.path("url"), Some(&json!({ "url": url }))).expect("navigate");
    }

    pub fn url(&self) -> String {
        call(self.port, "GET", &self.path("url"), None).expect("url").as_str().unwrap_or_default().to_string()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub fn run(&self, script: &str, args: Vec<Value>) -> Value {
        call(self.port, "POST", &self.path("execute/sync"), Some(&json!({ "script": script, "args": args })))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs an async `script` (its last argument is the callback to call with the result).
    pub fn run_async(&self, script: &str) -> Value {
        call(self.port, "POST", &self.path("execute/async"), Some(&json!({ "script": script, "args": [] })))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something other than null or false, within `wait`.
    pub fn wait_for(&self, script: &str, wait: Duration) -> Value {
        let deadline = Instant::now() + wait;
        loop {
            let v = self.run(script, vec![]);
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.run("return document.body ? document.body.innerText : ''", vec![]);
                panic!("timed out waiting for: {script}\nthe page says:\n{}", body.as_str().unwrap_or(""));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a screenshot of the window as PNG.
    pub fn screenshot(&self, to: &Path) {
        use base64::Engine as _;
        let v = call(self.port, "GET", &self.path("screenshot"), None).expect("screenshot");
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default()).expect("base64 PNG");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).expect("screenshot folder");
        }
        std::fs::write(to, png).expect("write the screenshot");
    }
}
