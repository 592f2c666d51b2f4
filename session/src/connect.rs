//! How clients (the CLI, the worker daemon) connect to a coordinator: TLS with an optional
//! client certificate, and a bearer token sent with every call.
//!
//! Everything is read when the settings are made, so an unreadable token or certificate file
//! stops a program at start-up with an error that names the file, not at its first call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read {what} {path}: {source}")]
    File { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    #[error("the token {0} holds characters a header cannot carry (one line of printable ASCII)")]
    BadToken(String),
    #[error("{0}")]
    Settings(String),
    #[error(
        "`{url}` is not a coordinator URL (expected e.g. http://127.0.0.1:7070 or https://coordinator:7070): {message}"
    )]
    Url { url: String, message: String },
}

/// The flags (and `SWEEP_*` variables) of every program that connects to a coordinator — the
/// `sweep` commands and `sweep-worker` — so they are spelled, documented and read one way.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// File holding the bearer token: a `worker` token for a worker; a `client`, `viewer` or
    /// `admin` token for a user [default: $SWEEP_TOKEN].
    #[arg(long, env = "SWEEP_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's certificate, for https:// [default:
    /// the system's roots].
    #[arg(long, env = "SWEEP_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate (PEM), for a coordinator that requires one (mutual TLS).
    #[arg(long, env = "SWEEP_CLIENT_CERT", value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, env = "SWEEP_CLIENT_KEY", value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The TLS and token settings, every file read now: the token from `--token-file`, else
    /// `SWEEP_TOKEN`.
    pub fn security(&self) -> Result<ClientSecurity, ConnectError> {
        ClientSecurity::load(&ClientFiles {
            token_file: self.token_file.clone(),
            token: std::env::var("SWEEP_TOKEN").ok(),
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        })
    }
}

/// TLS and token settings of a client, with the files already read.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    token: Option<MetadataValue<Ascii>>,
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or the key.
        f.debug_struct("ClientSecurity")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("ca", &self.ca_pem.as_ref().map(|_| "<set>"))
            .field("client_certificate", &self.identity.as_ref().map(|_| "<set>"))
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    let bytes = std::fs::read(path).map_err(|source| ConnectError::File { what, path: path.to_path_buf(), source })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ConnectError::Empty { what, path: path.to_path_buf() });
    }
    Ok(bytes)
}

/// Where a client's settings come from (flags or `SWEEP_*` variables).
#[derive(Debug, Clone, Default)]
pub struct ClientFiles {
    /// A file holding the bearer token (its first line).
    pub token_file: Option<PathBuf>,
    /// The token itself (e.g. `SWEEP_TOKEN`); `token_file` wins when both are given.
    pub token: Option<String>,
    /// CA certificate(s) to verify the coordinator with (PEM) [default: the system's roots].
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) for a coordinator that requires them (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl ClientSecurity {
    /// Reads the files named in `files`.
    pub fn load(files: &ClientFiles) -> Result<ClientSecurity, ConnectError> {
        let token = match (&files.token_file, &files.token) {
            (Some(path), _) => {
                let bytes = read("token file", path)?;
                let text = String::from_utf8_lossy(&bytes);
                let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default().to_string();
                Some(bearer(&line).map_err(|_| ConnectError::BadToken(format!("in {}", path.display())))?)
            }
            (None, Some(t)) if !t.trim().is_empty() => {
                Some(bearer(t.trim()).map_err(|_| ConnectError::BadToken("given".into()))?)
            }
            _ => None,
        };
        let ca_pem = files.ca_cert.as_deref().map(|p| read("CA certificate", p)).transpose()?;
        let identity = match (&files.client_cert, &files.client_key) {
            (Some(c), Some(k)) => Some((read("client certificate", c)?, read("client key", k)?)),
            (None, None) => None,
            _ => {
                return Err(ConnectError::Settings(
                    "a client certificate needs its key and a key its certificate (--client-cert and --client-key)"
                        .into(),
                ));
            }
        };
        Ok(ClientSecurity { token, ca_pem, identity })
    }

    /// An endpoint for `url`: TLS for `https://` URLs (verified against the CA given, else the
    /// system's roots; with the client certificate if one is given), plain HTTP/2 otherwise.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ConnectError> {
        let bad = |message: String| ConnectError::Url { url: url.to_string(), message };
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(bad("it must start with http:// or https://".into()));
        }
        if !https {
            if self.ca_pem.is_some() || self.identity.is_some() {
                return Err(ConnectError::Settings(format!(
                    "a CA or client certificate was given but {url} is not https://"
                )));
            }
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_pem {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint.tls_config(tls).map_err(|e| bad(format!("TLS: {e}")))
    }

    /// The interceptor that adds the token to every call.
    pub fn interceptor(&self) -> BearerToken {
        BearerToken(self.token.clone())
    }
}

fn bearer(token: &str) -> Result<MetadataValue<Ascii>, ()> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(());
    }
    let mut v: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| ())?;
    // Not to be indexed by HTTP/2 header compression.
    v.set_sensitive(true);
    Ok(v)
}

/// Adds `authorization: Bearer <token>` to every request (nothing when no token is set).
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The usual client endpoint settings: connect timeout and HTTP/2 keepalive.
pub fn with_keepalive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_up_front_and_their_problems_named() {
        let dir = std::env::temp_dir().join(format!("sweep-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "\n  s3cret-token \nignored\n").unwrap();
        let s = ClientSecurity::load(&ClientFiles { token_file: Some(token.clone()), ..Default::default() }).unwrap();
        assert_eq!(s.token.as_ref().unwrap().to_str().unwrap(), "Bearer s3cret-token");
        let missing = dir.join("missing");
        let e = ClientSecurity::load(&ClientFiles { token_file: Some(missing.clone()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("token file") && e.contains("missing"), "{e}");
        std::fs::write(&token, "  \n").unwrap();
        let e = ClientSecurity::load(&ClientFiles { token_file: Some(token.clone()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = ClientSecurity::load(&ClientFiles { token: Some("two words".into()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("characters a header cannot carry"), "{e}");
        let e = ClientSecurity::load(&ClientFiles { client_cert: Some(token), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs its key"), "{e}");
        let e = ClientSecurity::load(&ClientFiles { ca_cert: Some(missing), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("CA certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls_choose_tls_and_refuse_what_does_not_fit() {
        let plain = ClientSecurity::default();
        assert!(plain.endpoint("http://127.0.0.1:7070").is_ok());
        assert!(plain.endpoint("https://127.0.0.1:7070").is_ok());
        let e = plain.endpoint("127.0.0.1:7070").unwrap_err().to_string();
        assert!(e.contains("not a coordinator URL"), "{e}");
        let with_ca = ClientSecurity { ca_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()), ..Default::default() };
        let e = with_ca.endpoint("http://127.0.0.1:7070").unwrap_err().to_string();
        assert!(e.contains("is not https://"), "{e}");
    }
}
