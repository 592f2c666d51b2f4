//! Bearer tokens with roles, checked on every gRPC call before any handler runs.
//!
//! The tokens file (`sweep coordinator --tokens FILE`) has one token per line:
//! `ROLE TOKEN [NAME]`, `#` starts a comment. Roles:
//!
//! | role | may call |
//! |---|---|
//! | `admin` | everything |
//! | `client` | `SweepService`: submit, cancel, retry, and every read |
//! | `viewer` | `SweepService` reads only (list, status, leaderboard, trial, workers, watch) |
//! | `worker` | `WorkerService` only |
//!
//! A call without a token, or with one the file does not hold, gets `UNAUTHENTICATED`; a call
//! its role does not allow gets `PERMISSION_DENIED`, naming the role and the method. The health
//! service stays open (probes carry no token); reflection needs any valid token. Without a
//! tokens file every call is allowed (a loopback `sweep run`, a trusted network).

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, bail};
use tonic::Status;
use tonic::codegen::http;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Client,
    Viewer,
    Worker,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "client" => Some(Role::Client),
            "viewer" => Some(Role::Viewer),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Client => "client",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }
}

/// One token of the file.
#[derive(Clone)]
struct Entry {
    token: Vec<u8>,
    role: Role,
    name: String,
}

impl Entry {
    /// The identity a call with this token acts as: the token's SHA-256, hex. Only the token
    /// decides it — renaming the token, or moving its line in the file, keeps every worker it
    /// registered bound to it; another token (same name or not) is another identity.
    fn identity(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&self.token);
        format!("token:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

/// Who a call authenticated as, put into the request's extensions by [`AuthLayer`] for the
/// handlers (a worker is bound to the identity that registered it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    pub role: Role,
    /// `token:<SHA-256 of the token>`.
    pub identity: String,
}

/// The tokens a coordinator accepts.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        let names: Vec<String> = self.entries.iter().map(|e| format!("{} ({})", e.name, e.role.as_str())).collect();
        f.debug_struct("Tokens").field("entries", &names).finish()
    }
}

/// Shortest token accepted: anything shorter is guessable.
const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    /// Reads a tokens file; every problem names the file and the line.
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read tokens file {}", path.display()))?;
        Tokens::parse(&text).map_err(|e| anyhow::anyhow!("tokens file {}:{e}", path.display()))
    }

    /// The tokens of a file's text; errors start with `LINE: `.
    pub fn parse(text: &str) -> anyhow::Result<Tokens> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            // `#` starts a comment at the start of a line or after white space; inside a token
            // it is part of the token.
            let cut = line
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || line[..i].ends_with(char::is_whitespace)))
                .map_or(line.len(), |(i, _)| i);
            let line = line[..cut].trim();
            if line.is_empty() {
                continue;
            }
            let n = i + 1;
            let mut parts = line.split_whitespace();
            let (Some(role), Some(token)) = (parts.next(), parts.next()) else {
                bail!("{n}: expected `ROLE TOKEN [NAME]`");
            };
            let Some(role) = Role::parse(role) else {
                bail!("{n}: unknown role `{role}` (admin, client, viewer or worker)");
            };
            if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "{n}: a token must be at least {MIN_TOKEN_LEN} printable characters (e.g. `openssl rand -hex 32`)"
                );
            }
            if entries.iter().any(|e| e.token == token.as_bytes()) {
                bail!("{n}: this token is listed twice");
            }
            let name = parts.collect::<Vec<_>>().join(" ");
            entries.push(Entry {
                token: token.as_bytes().to_vec(),
                role,
                name: if name.is_empty() { format!("line {n}") } else { name },
            });
        }
        if entries.is_empty() {
            bail!("1: no tokens (one `ROLE TOKEN [NAME]` per line)");
        }
        Ok(Tokens { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `token` when the file holds it (compared in constant time): how the
    /// dashboard checks a bearer header or its login cookie.
    pub fn authenticate(&self, token: &str) -> Option<Role> {
        self.find(token.trim().as_bytes()).map(|e| e.role)
    }

    /// The role and name of `token`, comparing in constant time.
    fn find(&self, token: &[u8]) -> Option<&Entry> {
        let mut found = None;
        for e in &self.entries {
            if constant_time_eq(&e.token, token) {
                found = Some(e);
            }
        }
        found
    }

    /// Whether a call of `path` (`/package.Service/Method`) with the `authorization` header
    /// `header` may go on, and who it authenticated as (`None` for the open health service).
    pub fn check(&self, path: &str, header: Option<&str>) -> Result<Option<Authenticated>, Status> {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
        let method = path.rsplit('/').next().unwrap_or_default();
        if service == "grpc.health.v1.Health" {
            return Ok(None);
        }
        let Some(header) = header else {
            return Err(Status::unauthenticated(format!(
                "{path} needs a bearer token (`authorization: Bearer TOKEN`; sweep: --token-file or SWEEP_TOKEN_FILE)"
            )));
        };
        let token = header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).unwrap_or("");
        let Some(entry) = self.find(token.trim().as_bytes()) else {
            return Err(Status::unauthenticated("the bearer token is not valid here"));
        };
        let allowed = match (entry.role, service) {
            (Role::Admin, _) => true,
            (_, s) if s.starts_with("grpc.reflection.") => true,
            (Role::Client, "sweep.v1.SweepService") => true,
            (Role::Viewer, "sweep.v1.SweepService") => {
                !matches!(method, "SubmitSweep" | "CancelSweep" | "RetrySweep" | "DropSweep" | "UpdateSweep")
            }
            (Role::Worker, "sweep.v1.WorkerService") => true,
            _ => false,
        };
        if allowed {
            Ok(Some(Authenticated { role: entry.role, identity: entry.identity() }))
        } else {
            Err(Status::permission_denied(format!(
                "a {} token ({}) may not call {path}",
                entry.role.as_str(),
                entry.name
            )))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff));
    }
    diff == 0
}

/// The tower layer that checks every request against [`Tokens`].
#[derive(Clone)]
pub struct AuthLayer(pub Option<Arc<Tokens>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Whatever a client sends, only this layer says who a call is.
        request.extensions_mut().remove::<Authenticated>();
        if let Some(tokens) = &self.tokens {
            let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
            match tokens.check(request.uri().path(), header) {
                Ok(Some(who)) => {
                    request.extensions_mut().insert(who);
                }
                Ok(None) => {}
                Err(status) => {
                    tracing::warn!(path = %request.uri().path(), code = ?status.code(), "refused: {}", status.message());
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# role token name
admin  aaaaaaaaaaaaaaaaaaaa ops
client cccccccccccccccccccc  alice
viewer vvvvvvvvvvvvvvvvvvvv  grafana
worker wwwwwwwwwwwwwwwwwwww  gpu-pool   # the DaemonSet
";

    #[test]
    fn roles_decide_what_each_token_may_call() {
        let t = Tokens::parse(FILE).unwrap();
        assert_eq!(t.len(), 4);
        let call =
            |path: &str, token: &str| t.check(path, Some(&format!("Bearer {token}"))).map(|_| ()).map_err(|s| s.code());
        let (a, c, v, w) = ("a".repeat(20), "c".repeat(20), "v".repeat(20), "w".repeat(20));
        use tonic::Code::{PermissionDenied, Unauthenticated};
        for p in ["/sweep.v1.SweepService/SubmitSweep", "/sweep.v1.WorkerService/Register"] {
            assert_eq!(call(p, &a), Ok(()));
        }
        assert_eq!(call("/sweep.v1.SweepService/SubmitSweep", &c), Ok(()));
        assert_eq!(call("/sweep.v1.SweepService/CancelSweep", &c), Ok(()));
        assert_eq!(call("/sweep.v1.WorkerService/Register", &c), Err(PermissionDenied));
        assert_eq!(call("/sweep.v1.SweepService/GetLeaderboard", &v), Ok(()));
        assert_eq!(call("/sweep.v1.SweepService/SubmitSweep", &v), Err(PermissionDenied));
        assert_eq!(call("/sweep.v1.SweepService/UpdateSweep", &v), Err(PermissionDenied), "tags are written");
        assert_eq!(call("/sweep.v1.SweepService/UpdateSweep", &c), Ok(()));
        assert_eq!(call("/sweep.v1.WorkerService/ReportEpoch", &w), Ok(()));
        assert_eq!(call("/sweep.v1.SweepService/SubmitSweep", &w), Err(PermissionDenied));
        assert_eq!(call("/sweep.v1.SweepService/CancelSweep", &w), Err(PermissionDenied));
        assert_eq!(call("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &w), Ok(()));
        assert_eq!(call("/sweep.v1.SweepService/ListSweeps", &"x".repeat(20)), Err(Unauthenticated));
        assert_eq!(t.check("/sweep.v1.SweepService/ListSweeps", None).map_err(|s| s.code()), Err(Unauthenticated));
        assert_eq!(t.check("/grpc.health.v1.Health/Check", None).map_err(|s| s.code()), Ok(None));
        // A token names one identity: its name and a fingerprint, never the token itself.
        let who = t.check("/sweep.v1.WorkerService/Register", Some(&format!("Bearer {w}"))).unwrap().unwrap();
        assert_eq!(who.role, Role::Worker);
        assert!(who.identity.starts_with("token:") && who.identity.len() == "token:".len() + 64);
        assert!(!who.identity.contains(&w));
        let other = Tokens::parse(&format!("worker {} gpu-pool\n", "z".repeat(20))).unwrap();
        let z = other.check("/sweep.v1.WorkerService/Register", Some(&format!("Bearer {}", "z".repeat(20))));
        assert_ne!(z.unwrap().unwrap().identity, who.identity, "same name, another token: another identity");
        // The same token renamed, on another line: the same identity.
        let moved = Tokens::parse(&format!("# rotated\nadmin {}\nworker {w} renamed\n", "q".repeat(20))).unwrap();
        let again = moved.check("/sweep.v1.WorkerService/Register", Some(&format!("Bearer {w}"))).unwrap().unwrap();
        assert_eq!(again.identity, who.identity);
        let e = t.check("/sweep.v1.SweepService/SubmitSweep", Some(&format!("Bearer {w}"))).unwrap_err();
        assert!(
            e.message().contains("a worker token (gpu-pool) may not call /sweep.v1.SweepService/SubmitSweep"),
            "{e:?}"
        );
        // Debug output never shows a token.
        assert!(!format!("{t:?}").contains(&a));
    }

    #[test]
    fn mistakes_in_the_file_name_the_line() {
        for (text, want) in [
            ("admin\n", "1: expected `ROLE TOKEN [NAME]`"),
            ("\nroot aaaaaaaaaaaaaaaaaaaa\n", "2: unknown role `root`"),
            ("client short\n", "1: a token must be at least 16"),
            ("client aaaaaaaaaaaaaaaaaaaa\nworker aaaaaaaaaaaaaaaaaaaa\n", "2: this token is listed twice"),
            ("# nothing\n", "no tokens"),
            ("client abcdefghijklmno#xyz\nclient abcdefghijklmno#xyz\n", "2: this token is listed twice"),
        ] {
            let e = Tokens::parse(text).err().unwrap().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
