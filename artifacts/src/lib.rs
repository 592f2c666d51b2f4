//! The artifact store: where checkpoints and resume points live, so that any worker can pick
//! up a trial that another one started.
//!
//! Built on the `object_store` crate. A location is either a directory (`.sweep/artifacts`,
//! `/shared/artifacts`, `file:///shared/artifacts`: [`LocalFileSystem`]) or an S3-compatible
//! bucket with an optional prefix (`s3://bucket/prefix`: [`AmazonS3`], configured from the
//! usual `AWS_*` variables — `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT` for MinIO, Ceph or R2, `AWS_ALLOW_HTTP=true` for a
//! plain-HTTP endpoint).
//!
//! Objects are addressed by keys relative to the location (`<sweep>/<trial>/last.safetensors`).
//! The references a worker reports to the coordinator are absolute: a file path for a local
//! store (so that `sweep-worker predict --weights PATH` takes it as it is), `s3://bucket/key`
//! otherwise. libtorch reads and writes files, so every object passes through a local
//! scratch directory: uploads and downloads are streamed in chunks (multipart above 16 MiB),
//! never held in memory whole, and a download is hashed while it is written.
//!
//! A write is atomic for readers on both kinds of store (the local store stages and renames;
//! S3 makes an object visible only when its upload completes).
//!
//! The store's calls are async; a trainer thread calls the blocking wrappers, which run them
//! on the runtime handle the store was opened with (they must not be called on one of that
//! runtime's worker threads).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Handle;

/// Uploads larger than this go in parts of this size.
const PART_BYTES: usize = 16 << 20;
/// Chunk size when reading a local file for upload.
const READ_CHUNK: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The location given on the command line is not one the store can open.
    #[error("artifact store `{location}`: {message}")]
    Location { location: String, message: String },
    /// A call to the store failed.
    #[error("artifact store {uri}: {message}")]
    Store { uri: String, message: String },
    /// The object does not exist.
    #[error("artifact store {uri}: not found")]
    NotFound { uri: String },
    /// Reading or writing the local copy failed.
    #[error("artifact store, local copy {path}: {source}")]
    Local { path: PathBuf, source: std::io::Error },
}

/// Where references to the store point.
#[derive(Debug, Clone)]
enum Base {
    /// The root directory of a local store (absolute).
    Local(PathBuf),
    /// `s3://bucket` plus the prefix inside it (no slashes at either end; may be empty).
    Url { root: String, prefix: String },
}

/// An artifact store opened at a location. Cheap to clone.
#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    base: Base,
    location: String,
    scratch: PathBuf,
    rt: Handle,
    /// This process's scratch folder and the lock that marks it as in use.
    mine: Arc<std::sync::OnceLock<(PathBuf, std::fs::File)>>,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore").field("location", &self.location).field("scratch", &self.scratch).finish()
    }
}

/// An object of a listing: its key relative to the store and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub bytes: u64,
    /// When it was last written, in milliseconds since the Unix epoch (the store's clock).
    pub modified_ms: i64,
}

fn location_error(location: &str, message: impl Into<String>) -> ArtifactError {
    ArtifactError::Location { location: location.to_string(), message: message.into() }
}

impl ArtifactStore {
    /// Opens the store at `location` (a directory, `file://DIR` or `s3://bucket[/prefix]`);
    /// local copies go under `scratch`. A local directory is created. Nothing is contacted
    /// yet: [`ArtifactStore::check`] does that.
    pub fn open(location: &str, scratch: &Path, rt: Handle) -> Result<ArtifactStore, ArtifactError> {
        let trimmed = location.trim();
        if trimmed.is_empty() {
            return Err(location_error(location, "empty; give a directory or s3://bucket/prefix"));
        }
        let (store, base): (Arc<dyn ObjectStore>, Base) = match trimmed.split_once("://") {
            None | Some(("file", _)) => {
                let dir = trimmed.strip_prefix("file://").unwrap_or(trimmed);
                let dir = std::path::absolute(dir).map_err(|e| location_error(location, e.to_string()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| location_error(location, format!("cannot create {}: {e}", dir.display())))?;
                let dir = dir.canonicalize().map_err(|e| location_error(location, e.to_string()))?;
                let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| location_error(location, e.to_string()))?;
                (Arc::new(fs), Base::Local(dir))
            }
            Some(("s3" | "s3a", rest)) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(location_error(location, "no bucket name (s3://bucket/prefix)"));
                }
                let prefix = prefix.trim_matches('/').to_string();
                Key::parse(&prefix).map_err(|e| location_error(location, format!("prefix `{prefix}`: {e}")))?;
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| location_error(location, e.to_string()))?;
                let scheme = trimmed.split_once("://").map_or("s3", |(s, _)| s);
                (Arc::new(s3), Base::Url { root: format!("{scheme}://{bucket}"), prefix })
            }
            Some((scheme, _)) => {
                return Err(location_error(
                    location,
                    format!("scheme `{scheme}` is not supported; give a directory, file://DIR or s3://bucket/prefix"),
                ));
            }
        };
        Ok(ArtifactStore {
            store,
            base,
            location: trimmed.to_string(),
            scratch: scratch.to_path_buf(),
            rt,
            mine: Arc::default(),
        })
    }

    /// The location as given.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The local directory copies pass through.
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    fn object_key(&self, key: &str) -> Result<Key, ArtifactError> {
        let full = match &self.base {
            Base::Url { prefix, .. } if !prefix.is_empty() => format!("{prefix}/{key}"),
            _ => key.to_string(),
        };
        Key::parse(&full).map_err(|e| ArtifactError::Store { uri: self.uri(key), message: format!("bad key: {e}") })
    }

    /// The absolute reference of `key`: a file path for a local store, else `s3://bucket/…`.
    pub fn uri(&self, key: &str) -> String {
        match &self.base {
            Base::Local(dir) => dir.join(key).display().to_string(),
            Base::Url { root, prefix } if prefix.is_empty() => format!("{root}/{key}"),
            Base::Url { root, prefix } => format!("{root}/{prefix}/{key}"),
        }
    }

    /// The key of an absolute reference made by [`ArtifactStore::uri`] (for a local store, also
    /// `file://` and paths through other names of the same directory), or why it is not in
    /// this store.
    pub fn key_of(&self, uri: &str) -> Result<String, String> {
        let not_here = || format!("{uri} is not in this worker's artifact store {}", self.location);
        let key = match &self.base {
            Base::Local(dir) => {
                let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
                let relative = path.strip_prefix(dir).map(Path::to_path_buf).or_else(|_| {
                    // The same file through a symbolic link or a relative path.
                    let parent = path.parent().and_then(|p| p.canonicalize().ok()).ok_or_else(not_here)?;
                    let name = path.file_name().ok_or_else(not_here)?;
                    parent.join(name).strip_prefix(dir).map(Path::to_path_buf).map_err(|_| not_here())
                })?;
                relative.to_str().ok_or_else(not_here)?.to_string()
            }
            Base::Url { root, prefix } => {
                let rest = uri.strip_prefix(root.as_str()).and_then(|r| r.strip_prefix('/')).ok_or_else(not_here)?;
                if prefix.is_empty() {
                    rest.to_string()
                } else {
                    rest.strip_prefix(prefix.as_str())
                        .and_then(|r| r.strip_prefix('/'))
                        .ok_or_else(not_here)?
                        .to_string()
                }
            }
        };
        if key.is_empty() || key.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
            return Err(not_here());
        }
        Ok(key)
    }

    fn store_error(&self, key: &str, e: object_store::Error) -> ArtifactError {
        match e {
            object_store::Error::NotFound { .. } => ArtifactError::NotFound { uri: self.uri(key) },
            e => ArtifactError::Store { uri: self.uri(key), message: e.to_string() },
        }
    }

    /// Checks that the store answers: lists its root (a missing bucket, bad credentials or an
    /// unreachable endpoint fail here, with the store's reason).
    pub async fn check(&self) -> Result<(), ArtifactError> {
        let prefix = match &self.base {
            Base::Url { prefix, .. } if !prefix.is_empty() => Some(Key::from(prefix.as_str())),
            _ => None,
        };
        self.store.list_with_delimiter(prefix.as_ref()).await.map(|_| ()).map_err(|e| {
            let hint = match self.base {
                Base::Local(_) => "",
                Base::Url { .. } => {
                    " (the bucket must exist; AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and \
                     AWS_DEFAULT_REGION configure the client)"
                }
            };
            location_error(&self.location, format!("{e}{hint}"))
        })
    }

    /// Uploads the local file `local` as `key`, streamed, replacing any object of that key.
    pub async fn put_file(&self, key: &str, local: &Path) -> Result<u64, ArtifactError> {
        let k = self.object_key(key)?;
        let local_err = |source| ArtifactError::Local { path: local.to_path_buf(), source };
        let mut file = std::fs::File::open(local).map_err(local_err)?;
        let mut writer = BufWriter::with_capacity(self.store.clone(), k, PART_BYTES);
        let mut sent = 0u64;
        loop {
            let mut chunk = vec![0u8; READ_CHUNK];
            let n = match read_full(&mut file, &mut chunk) {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(local_err(e));
                }
            };
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            sent += n as u64;
            if let Err(e) = writer.put(chunk.into()).await {
                let _ = writer.abort().await;
                return Err(self.store_error(key, e));
            }
        }
        if let Err(e) = writer.shutdown().await {
            let _ = writer.abort().await;
            return Err(ArtifactError::Store { uri: self.uri(key), message: e.to_string() });
        }
        self.sync(key)?;
        Ok(sent)
    }

    /// Stores `bytes` as `key`.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        let k = self.object_key(key)?;
        self.store.put(&k, PutPayload::from(bytes)).await.map_err(|e| self.store_error(key, e))?;
        self.sync(key)
    }

    /// On a local store, flushes a written object and its directory to the disk (the local
    /// store renames into place but does not sync): a machine that loses power keeps what
    /// was reported. An S3 store has made the object durable when the upload completed.
    fn sync(&self, key: &str) -> Result<(), ArtifactError> {
        let Base::Local(dir) = &self.base else { return Ok(()) };
        let path = dir.join(key);
        let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        sync(&path).map_err(|source| ArtifactError::Local { path: path.clone(), source })?;
        match path.parent() {
            Some(parent) => sync(parent).map_err(|source| ArtifactError::Local { path: parent.to_path_buf(), source }),
            None => Ok(()),
        }
    }

    /// Downloads `key` into the local file `local` (written under a temporary name and
    /// renamed), streamed; returns its SHA-256 (lower-case hex) and size.
    pub async fn get_file(&self, key: &str, local: &Path) -> Result<(String, u64), ArtifactError> {
        let k = self.object_key(key)?;
        let got = self.store.get(&k).await.map_err(|e| self.store_error(key, e))?;
        if let Some(parent) = local.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| ArtifactError::Local { path: parent.to_path_buf(), source })?;
        }
        let tmp = local.with_extension(format!(
            "{}.part-{}",
            local.extension().and_then(|e| e.to_str()).unwrap_or(""),
            std::process::id()
        ));
        let local_err = |source| ArtifactError::Local { path: tmp.clone(), source };
        let mut file = std::fs::File::create(&tmp).map_err(local_err)?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(self.store_error(key, e));
                }
            };
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            if let Err(e) = file.write_all(&chunk) {
                let _ = std::fs::remove_file(&tmp);
                return Err(local_err(e));
            }
        }
        drop(file);
        std::fs::rename(&tmp, local).map_err(|source| ArtifactError::Local { path: local.to_path_buf(), source })?;
        Ok((hex(&hasher.finalize()), bytes))
    }

    /// Object `key` as a stream of chunks, with its size: nothing is staged; whoever reads it
    /// decides what to do with a stream that ends in an error.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<(u64, futures::stream::BoxStream<'static, Result<bytes::Bytes, ArtifactError>>), ArtifactError> {
        let k = self.object_key(key)?;
        let got = self.store.get(&k).await.map_err(|e| self.store_error(key, e))?;
        let size = got.meta.size;
        let uri = self.uri(key);
        let stream = got
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| ArtifactError::Store { uri: uri.clone(), message: e.to_string() }))
            .boxed();
        Ok((size, stream))
    }

    /// The whole object `key`.
    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, ArtifactError> {
        let k = self.object_key(key)?;
        let got = self.store.get(&k).await.map_err(|e| self.store_error(key, e))?;
        got.bytes().await.map(|b| b.to_vec()).map_err(|e| self.store_error(key, e))
    }

    /// Copies `from` to `to` inside the store (server-side on S3).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), ArtifactError> {
        let (f, t) = (self.object_key(from)?, self.object_key(to)?);
        if let Base::Local(dir) = &self.base {
            // object_store's local copy is a hard link, which network and FUSE file systems
            // (SMB, gcsfuse, s3fs) refuse: copy the bytes, then rename into place.
            let (src, dst) = (dir.join(from), dir.join(to));
            let tmp = dst.with_extension(format!("copy-{}", std::process::id()));
            let local = |path: &Path| {
                let path = path.to_path_buf();
                move |source| ArtifactError::Local { path, source }
            };
            std::fs::copy(&src, &tmp).map_err(local(&src))?;
            std::fs::rename(&tmp, &dst).map_err(local(&dst))?;
            return self.sync(to);
        }
        self.store.copy(&f, &t).await.map_err(|e| self.store_error(from, e))
    }

    /// Deletes `key`; a missing object is no error.
    pub async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        let k = self.object_key(key)?;
        match self.store.delete(&k).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_error(key, e)),
        }
    }

    /// The objects directly under the folder `dir` (a key without a trailing slash), by key.
    pub async fn list(&self, dir: &str) -> Result<Vec<Listed>, ArtifactError> {
        let k = self.object_key(dir)?;
        let listing = self.store.list_with_delimiter(Some(&k)).await.map_err(|e| self.store_error(dir, e))?;
        let mut found: Vec<Listed> = listing
            .objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.filename()?.to_string();
                Some(Listed {
                    key: format!("{dir}/{name}"),
                    bytes: o.size,
                    modified_ms: o.last_modified.timestamp_millis(),
                })
            })
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// [`ArtifactStore::put_file`] from a thread outside the runtime.
    pub fn put_file_blocking(&self, key: &str, local: &Path) -> Result<u64, ArtifactError> {
        self.rt.block_on(self.put_file(key, local))
    }

    /// [`ArtifactStore::put_bytes`] from a thread outside the runtime.
    pub fn put_bytes_blocking(&self, key: &str, bytes: Vec<u8>) -> Result<(), ArtifactError> {
        self.rt.block_on(self.put_bytes(key, bytes))
    }

    /// [`ArtifactStore::get_file`] from a thread outside the runtime.
    pub fn get_file_blocking(&self, key: &str, local: &Path) -> Result<(String, u64), ArtifactError> {
        self.rt.block_on(self.get_file(key, local))
    }

    /// [`ArtifactStore::get_bytes`] from a thread outside the runtime.
    pub fn get_bytes_blocking(&self, key: &str) -> Result<Vec<u8>, ArtifactError> {
        self.rt.block_on(self.get_bytes(key))
    }

    /// [`ArtifactStore::copy`] from a thread outside the runtime.
    pub fn copy_blocking(&self, from: &str, to: &str) -> Result<(), ArtifactError> {
        self.rt.block_on(self.copy(from, to))
    }

    /// [`ArtifactStore::delete`] from a thread outside the runtime.
    pub fn delete_blocking(&self, key: &str) -> Result<(), ArtifactError> {
        self.rt.block_on(self.delete(key))
    }

    /// [`ArtifactStore::list`] from a thread outside the runtime.
    pub fn list_blocking(&self, dir: &str) -> Result<Vec<Listed>, ArtifactError> {
        self.rt.block_on(self.list(dir))
    }

    /// [`ArtifactStore::check`] from a thread outside the runtime.
    pub fn check_blocking(&self) -> Result<(), ArtifactError> {
        self.rt.block_on(self.check())
    }

    /// This process's scratch folder, `<scratch>/<pid>-<start>`, created on first use and held
    /// by an `flock` on its `.lock` file for the life of the process.
    fn my_scratch(&self) -> Result<&Path, ArtifactError> {
        if let Some((path, _)) = self.mine.get() {
            return Ok(path);
        }
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = self.scratch.join(format!("{}-{started}", std::process::id()));
        let local = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ArtifactError::Local { path, source }
        };
        std::fs::create_dir_all(&path).map_err(local(&path))?;
        let lock_path = path.join(".lock");
        let lock = std::fs::File::create(&lock_path).map_err(local(&lock_path))?;
        flock(&lock, true).map_err(local(&lock_path))?;
        let _ = self.mine.set((path, lock));
        Ok(&self.mine.get().expect("just set").0)
    }

    /// A fresh local directory for one attempt's copies, removed when the guard is dropped.
    pub fn scratch_dir(&self, name: &str) -> Result<ScratchDir, ArtifactError> {
        // One plain name inside this process's folder: never a path that leads out of it (it is
        // removed first).
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
            return Err(ArtifactError::Local {
                path: self.scratch.join(name),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a plain folder name"),
            });
        }
        let path = self.my_scratch()?.join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|source| ArtifactError::Local { path: path.clone(), source })?;
        Ok(ScratchDir { path })
    }

    /// Removes the scratch folders no running process holds (a worker killed with SIGKILL
    /// leaves its copies behind). A folder is in use while its `.lock` is locked: the kernel
    /// releases that lock when its process dies, so workers in other containers sharing the
    /// cache, whose process ids this one cannot see, keep theirs.
    pub fn clean_stale_scratch(&self) {
        let Ok(entries) = std::fs::read_dir(&self.scratch) else { return };
        let mine = self.mine.get().map(|(p, _)| p.clone());
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() || Some(&path) == mine.as_ref() {
                continue;
            }
            let free = match std::fs::OpenOptions::new().write(true).open(path.join(".lock")) {
                Ok(f) => flock(&f, false).is_ok(),
                // A folder without a lock file is from before locks, or half made: not in use.
                Err(_) => true,
            };
            if free {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// An exclusive `flock` on `f`, waiting for it when `wait`.
fn flock(f: &std::fs::File, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let op = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    // SAFETY: flock(2) on a descriptor the caller owns.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// A local copy of the object at `uri` (`s3://bucket/key`) and of the JSON beside it, if there
/// is one, in `dir`; a path (or `file://` URL) is returned as it is. For tools that take a
/// checkpoint reference as `sweep trial` shows it.
pub fn fetch_url(uri: &str, dir: &Path, rt: &Handle) -> Result<PathBuf, ArtifactError> {
    let Some((scheme, rest)) = uri.split_once("://").filter(|(s, _)| *s != "file") else {
        return Ok(PathBuf::from(uri.strip_prefix("file://").unwrap_or(uri)));
    };
    let bucket = rest.split('/').next().unwrap_or("");
    let store = ArtifactStore::open(&format!("{scheme}://{bucket}"), dir, rt.clone())?;
    let key = store.key_of(uri).map_err(|message| location_error(uri, message))?;
    let name = key.rsplit('/').next().unwrap_or(&key).to_string();
    let local = dir.join(&name);
    rt.block_on(async {
        store.get_file(&key, &local).await?;
        let json = json_key(&key);
        match store.get_file(&json, &local.with_extension("json")).await {
            Ok(_) | Err(ArtifactError::NotFound { .. }) => Ok(local),
            Err(e) => Err(e),
        }
    })
}

/// A local directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The key of the JSON file beside the weights (or resume point) at `weights_key`.
pub fn json_key(weights_key: &str) -> String {
    format!("{}.json", weights_key.strip_suffix(".safetensors").unwrap_or(weights_key))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    #[test]
    fn a_local_store_round_trips_files_lists_copies_and_deletes() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store =
            ArtifactStore::open(dir.path().join("a").to_str().unwrap(), &dir.path().join("s"), rt.handle().clone())
                .unwrap();
        store.check_blocking().unwrap();
        // Larger than one part, not a multiple of the read chunk.
        let data: Vec<u8> = (0..(PART_BYTES + READ_CHUNK + 12345)).map(|i| (i * 7 % 251) as u8).collect();
        let src = dir.path().join("src.bin");
        std::fs::write(&src, &data).unwrap();
        assert_eq!(store.put_file_blocking("sw/t000/x.bin", &src).unwrap(), data.len() as u64);
        store.put_bytes_blocking("sw/t000/x.json", b"{}".to_vec()).unwrap();
        // The local layout is the key layout: the path reported is the file.
        let uri = store.uri("sw/t000/x.bin");
        assert_eq!(std::fs::read(&uri).unwrap(), data);
        assert_eq!(store.key_of(&uri).unwrap(), "sw/t000/x.bin");
        assert_eq!(store.key_of(&format!("file://{uri}")).unwrap(), "sw/t000/x.bin");

        let back = dir.path().join("back/x.bin");
        let (sha, bytes) = store.get_file_blocking("sw/t000/x.bin", &back).unwrap();
        assert_eq!((sha, bytes), (hex(&Sha256::digest(&data)), data.len() as u64));
        assert_eq!(std::fs::read(&back).unwrap(), data);

        store.copy_blocking("sw/t000/x.bin", "sw/t000/y.bin").unwrap();
        let keys: Vec<String> = store.list_blocking("sw/t000").unwrap().into_iter().map(|l| l.key).collect();
        assert_eq!(keys, ["sw/t000/x.bin", "sw/t000/x.json", "sw/t000/y.bin"]);
        store.delete_blocking("sw/t000/x.bin").unwrap();
        store.delete_blocking("sw/t000/x.bin").unwrap();
        let e = store.get_bytes_blocking("sw/t000/x.bin").unwrap_err();
        assert!(matches!(e, ArtifactError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("sw/t000/x.bin"), "{e}");
        assert!(store.list_blocking("nothing/here").unwrap().is_empty());
    }

    #[test]
    fn scratch_folders_of_dead_processes_are_removed_and_live_ones_kept() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("scratch");
        let open =
            || ArtifactStore::open(dir.path().join("a").to_str().unwrap(), &scratch, rt.handle().clone()).unwrap();
        let store = open();
        let attempt = store.scratch_dir("s-t000-a1").unwrap();
        // Left by a process that died (its lock released), and by one from before locks.
        let dead = scratch.join("1-1");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join(".lock"), "").unwrap();
        std::fs::write(dead.join("state-e0001.safetensors"), "x").unwrap();
        std::fs::create_dir_all(scratch.join("77")).unwrap();
        // Held by a live process in another container (same pid as the dead one, 1).
        let live = scratch.join("1-2");
        std::fs::create_dir_all(&live).unwrap();
        let held = std::fs::File::create(live.join(".lock")).unwrap();
        flock(&held, true).unwrap();
        // Another store of this process (or another worker) cleans up.
        let other = open();
        other.clean_stale_scratch();
        assert!(!dead.exists() && !scratch.join("77").exists());
        assert!(live.exists(), "a held folder is kept");
        assert!(attempt.path().exists(), "the first store's folder is held too");
        drop(held);
        other.clean_stale_scratch();
        assert!(!live.exists());
    }

    #[test]
    fn references_outside_the_store_and_bad_locations_are_refused_with_the_reason() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let h = rt.handle().clone();
        let store = ArtifactStore::open(dir.path().join("a").to_str().unwrap(), dir.path(), h.clone()).unwrap();
        for uri in ["/elsewhere/sw/t000/x.bin", &store.uri("../b/x"), "s3://b/sw/t000/x.bin"] {
            let e = store.key_of(uri).unwrap_err();
            assert!(e.contains("is not in this worker's artifact store"), "{e}");
        }
        let e = ArtifactStore::open("gs://bucket/p", dir.path(), h.clone()).unwrap_err().to_string();
        assert!(e.contains("scheme `gs` is not supported") && e.contains("gs://bucket/p"), "{e}");
        let e = ArtifactStore::open("s3:///p", dir.path(), h.clone()).unwrap_err().to_string();
        assert!(e.contains("no bucket name"), "{e}");
        let e = ArtifactStore::open(" ", dir.path(), h.clone()).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        std::fs::write(dir.path().join("file"), "x").unwrap();
        let e = ArtifactStore::open(dir.path().join("file/sub").to_str().unwrap(), dir.path(), h.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot create"), "{e}");

        // An S3 store makes s3:// references under its bucket and prefix.
        let s3 = ArtifactStore::open("s3://bucket/runs/a/", dir.path(), h).unwrap();
        assert_eq!(s3.uri("sw/t000/x.bin"), "s3://bucket/runs/a/sw/t000/x.bin");
        assert_eq!(s3.key_of("s3://bucket/runs/a/sw/t000/x.bin").unwrap(), "sw/t000/x.bin");
        assert!(s3.key_of("s3://bucket/runs/b/sw/t000/x.bin").is_err());
        assert!(s3.key_of("s3://other/runs/a/sw/t000/x.bin").is_err());
        let s3a = ArtifactStore::open("s3a://bucket/p", dir.path(), rt.handle().clone()).unwrap();
        assert_eq!(s3a.key_of("s3a://bucket/p/sw/x").unwrap(), "sw/x");
    }
}
