//! The NCCL backend: one communicator per CUDA device of this process, collectives in place on
//! libtorch's device memory.
//!
//! **Finding the library.** cudarc's dynamic loader (`cudarc::nccl::sys::culib`) only tries
//! bare names built from `nccl` — `libnccl.so`, `libnccl.so.<CUDA major>`, `libnccl.so.12`,
//! `.11`, … — never `libnccl.so.2`, the file (and soname) the PyTorch wheels ship under
//! `site-packages/nvidia/nccl/lib/`. A bare name is resolved through `LD_LIBRARY_PATH` as it
//! was when the process started, the binary's run path and the loader cache, and glibc matches
//! already-loaded objects by name, not by file, so neither loading the wheel's file first nor
//! a symlink in a directory made later helps. Calling a `cudarc::nccl` function when its loader
//! finds nothing panics. So this module loads NCCL itself (with `libloading`, using cudarc's
//! type definitions of the C API) and never calls cudarc's NCCL functions. It tries, in order:
//!
//! 1. the file named by `SWEEP_NCCL_LIBRARY`, if set;
//! 2. `libnccl.so.2` if it is already loaded in this process (libtorch's CUDA build links it,
//!    so the worker then uses exactly the NCCL its libtorch uses);
//! 3. `libnccl.so.2` and `libnccl.so` in each `LD_LIBRARY_PATH` directory;
//! 4. next to the libtorch this process loaded (found in `/proc/self/maps`):
//!    `<torch>/lib/../../nvidia/nccl/lib/libnccl.so.2` (the wheel layout) and
//!    `<torch>/lib/libnccl.so.2`;
//! 5. the bare names `libnccl.so.2` and `libnccl.so` (run path, loader cache, system paths).
//!
//! A candidate counts when it loads and exports every function used here; [`probe`] reports
//! the file that was found (resolved with `dladdr`), its version, and every candidate tried.
//!
//! **Streams.** tch exposes no CUDA stream API, and libtorch's current stream is its default
//! stream unless someone sets another; nothing in this process does, and c10's default stream
//! *is* the legacy default stream (`cudaStream_t` null). NCCL is therefore given the null
//! stream: its kernels are ordered after the kernels that produced the tensor (the bucket
//! flattening) and before those that read it (unflattening, the optimizer), with no host
//! synchronisation. Setting `SWEEP_NCCL_SYNC=1` additionally synchronises the device before
//! and after every collective (for debugging a suspected stream problem). Before each call the
//! thread's current context is set to the device's primary context (what `cudaSetDevice` does),
//! so the null stream is that device's.
//!
//! **Threads.** Each rank's thread calls NCCL only on its own communicator. Every collective
//! starts with a host rendezvous of all ranks, so no rank enqueues an NCCL kernel that its
//! peers will never match: a rank that failed before the collective aborts the group and the
//! others return [`DistError::Aborted`] from the rendezvous. When the group is aborted every
//! communicator that is not inside an NCCL call is aborted (`ncclCommAbort`), which also stops
//! kernels still waiting for a peer. Communicators are destroyed by their ranks' threads, which
//! end together (NCCL may treat destruction as an intra-node collective).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{AbortHandle, AllReduce, Backend, DistError, Rendezvous};

/// Environment variable naming the NCCL library file to use (tried first).
pub const NCCL_LIBRARY_ENV: &str = "SWEEP_NCCL_LIBRARY";
/// Environment variable: `1` synchronises the device around every NCCL collective.
pub const NCCL_SYNC_ENV: &str = "SWEEP_NCCL_SYNC";

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type CommInitAllFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, *const c_int) -> c_int;
type AllReduceFn = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type BroadcastFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> c_int;
type CommFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// A loaded NCCL library and the functions this backend calls.
pub struct NcclLibrary {
    /// Keeps the library mapped for the process' lifetime.
    _lib: libloading::os::unix::Library,
    path: String,
    version: c_int,
    comm_init_all: CommInitAllFn,
    all_reduce: AllReduceFn,
    broadcast: BroadcastFn,
    comm_destroy: CommFn,
    comm_abort: CommFn,
    error_string: ErrorStringFn,
}

impl std::fmt::Debug for NcclLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclLibrary").field("path", &self.path).field("version", &self.version_string()).finish()
    }
}

impl NcclLibrary {
    /// The library file (as the dynamic loader resolved it).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `ncclGetVersion`'s code (e.g. 22703).
    pub fn version_code(&self) -> i32 {
        self.version
    }

    /// The version as `major.minor.patch`.
    pub fn version_string(&self) -> String {
        version_string(self.version)
    }

    fn check(&self, what: &str, code: c_int) -> Result<(), DistError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let text = unsafe {
            let p = (self.error_string)(code);
            if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
        };
        Err(DistError::Nccl(format!("{what} failed with code {code}: {text}")))
    }
}

/// NCCL's version code as `major.minor.patch` (codes from 2.9 on are `major·10000 +
/// minor·100 + patch`, older ones `major·1000 + minor·100 + patch`).
pub fn version_string(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, (code % 1000) / 100, code % 100)
    }
}

/// What looking for NCCL found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NcclProbe {
    /// A usable library was loaded.
    pub found: bool,
    /// The library file, when found.
    pub path: Option<String>,
    /// Its version (`2.27.3`), when found.
    pub version: Option<String>,
    /// Every candidate tried, in order, with why it was not used (the last one is the one
    /// found, marked `ok`).
    pub tried: Vec<String>,
}

struct Loaded {
    library: Option<NcclLibrary>,
    tried: Vec<String>,
}

static LIBRARY: OnceLock<Loaded> = OnceLock::new();

/// A place to look for NCCL.
struct Candidate {
    name: String,
    /// Only accept a library that is already loaded (RTLD_NOLOAD).
    loaded_only: bool,
}

/// The directories of the libtorch libraries mapped into this process.
fn torch_lib_dirs() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        let file = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or_default();
        if (file.starts_with("libtorch") || file.starts_with("libc10"))
            && let Some(dir) = Path::new(path).parent()
            && !dirs.iter().any(|d| d == dir)
        {
            dirs.push(dir.to_path_buf());
        }
    }
    dirs
}

fn candidates() -> Vec<Candidate> {
    let mut out = Vec::new();
    let mut push = |name: String, loaded_only: bool| {
        if !out.iter().any(|c: &Candidate| c.name == name && c.loaded_only == loaded_only) {
            out.push(Candidate { name, loaded_only });
        }
    };
    if let Some(p) = std::env::var_os(NCCL_LIBRARY_ENV).filter(|p| !p.is_empty()) {
        push(p.to_string_lossy().into_owned(), false);
    }
    push("libnccl.so.2".into(), true);
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        for dir in std::env::split_paths(&paths).filter(|d| !d.as_os_str().is_empty()) {
            for name in ["libnccl.so.2", "libnccl.so"] {
                push(dir.join(name).display().to_string(), false);
            }
        }
    }
    for dir in torch_lib_dirs() {
        let wheel = dir.join("../../nvidia/nccl/lib/libnccl.so.2");
        push(std::fs::canonicalize(&wheel).unwrap_or(wheel).display().to_string(), false);
        push(dir.join("libnccl.so.2").display().to_string(), false);
    }
    push("libnccl.so.2".into(), false);
    push("libnccl.so".into(), false);
    out
}

/// The file that defines `addr`, as the dynamic loader knows it.
fn file_of(addr: *const c_void) -> Option<String> {
    // SAFETY: dladdr only reads the loader's tables; Dl_info is plain data.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let name = CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
        Some(std::fs::canonicalize(&name).map(|p| p.display().to_string()).unwrap_or(name))
    }
}

fn try_load(c: &Candidate) -> Result<NcclLibrary, String> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    if c.name.contains('/') && !Path::new(&c.name).exists() {
        return Err("no such file".into());
    }
    let flags = RTLD_NOW | RTLD_LOCAL | if c.loaded_only { libc::RTLD_NOLOAD } else { 0 };
    // SAFETY: loading NCCL runs its initialisers, which only set up its own state.
    let lib = unsafe { Library::open(Some(&c.name), flags) }
        .map_err(|e| if c.loaded_only { "not loaded in this process".to_string() } else { e.to_string() })?;
    // SAFETY: the symbols are NCCL's C API with these exact signatures (nccl.h, stable since
    // NCCL 2.4); the function pointers stay valid while `lib` is alive, which it is for the
    // life of the process once stored in LIBRARY.
    unsafe {
        fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
            // SAFETY: see the caller.
            unsafe { lib.get::<T>(name.as_bytes()) }.map(|s| *s).map_err(|e| format!("no symbol {name}: {e}"))
        }
        let get_version: GetVersionFn = sym(&lib, "ncclGetVersion")?;
        let mut version: c_int = 0;
        let code = get_version(&mut version);
        if code != 0 {
            return Err(format!("ncclGetVersion failed with code {code}"));
        }
        let path = file_of(get_version as *const c_void).unwrap_or_else(|| c.name.clone());
        Ok(NcclLibrary {
            comm_init_all: sym(&lib, "ncclCommInitAll")?,
            all_reduce: sym(&lib, "ncclAllReduce")?,
            broadcast: sym(&lib, "ncclBroadcast")?,
            comm_destroy: sym(&lib, "ncclCommDestroy")?,
            comm_abort: sym(&lib, "ncclCommAbort")?,
            error_string: sym(&lib, "ncclGetErrorString")?,
            _lib: lib,
            path,
            version,
        })
    }
}

fn load() -> &'static Loaded {
    LIBRARY.get_or_init(|| {
        let mut tried = Vec::new();
        for c in candidates() {
            let label = if c.loaded_only { format!("{} (already loaded?)", c.name) } else { c.name.clone() };
            match try_load(&c) {
                Ok(lib) => {
                    tried.push(format!("{label}: ok"));
                    tracing::info!(path = %lib.path, version = %lib.version_string(), "NCCL loaded");
                    return Loaded { library: Some(lib), tried };
                }
                Err(why) => tried.push(format!("{label}: {why}")),
            }
        }
        Loaded { library: None, tried }
    })
}

/// Looks for NCCL (once per process; never panics) and says what was found or tried.
pub fn probe() -> NcclProbe {
    let loaded = load();
    NcclProbe {
        found: loaded.library.is_some(),
        path: loaded.library.as_ref().map(|l| l.path.clone()),
        version: loaded.library.as_ref().map(NcclLibrary::version_string),
        tried: loaded.tried.clone(),
    }
}

/// The NCCL library, or [`DistError::Unavailable`] saying where it was looked for.
pub fn library() -> Result<&'static NcclLibrary, DistError> {
    let loaded = load();
    loaded.library.as_ref().ok_or_else(|| {
        DistError::Unavailable(format!(
            "NCCL is not available, so CUDA replicas cannot be averaged: no usable libnccl was found (tried {}). Install the NCCL the PyTorch wheel depends on (nvidia-nccl-cu12) or set {NCCL_LIBRARY_ENV} to libnccl.so.2",
            loaded.tried.join("; ")
        ))
    })
}

/// NCCL's data type for a tensor kind.
fn data_type(kind: Kind) -> Result<ncclDataType_t, DistError> {
    Ok(match kind {
        Kind::Float => ncclDataType_t::ncclFloat32,
        Kind::Double => ncclDataType_t::ncclFloat64,
        Kind::Half => ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
        Kind::Int64 => ncclDataType_t::ncclInt64,
        Kind::Int => ncclDataType_t::ncclInt32,
        Kind::Int8 => ncclDataType_t::ncclInt8,
        Kind::Uint8 => ncclDataType_t::ncclUint8,
        other => return Err(DistError::Invalid(format!("NCCL cannot reduce {other:?} tensors"))),
    })
}

/// A communicator pointer (used by one thread at a time, under its slot's lock).
struct CommSlot {
    comm: ncclComm_t,
    /// False once destroyed or aborted.
    live: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every use goes through the slot's mutex.
unsafe impl Send for CommSlot {}

struct Shared {
    lib: &'static NcclLibrary,
    rendezvous: Arc<Rendezvous>,
    comms: Vec<Mutex<CommSlot>>,
}

impl Shared {
    /// Aborts every communicator that is not inside an NCCL call right now (those are left
    /// to their ranks, which return once their rendezvous fails).
    fn abort_comms(&self) {
        for slot in &self.comms {
            if let Ok(mut s) = slot.try_lock()
                && s.live
            {
                // SAFETY: the communicator is live and no other call on it is in progress.
                let _ = unsafe { (self.lib.comm_abort)(s.comm) };
                s.live = false;
            }
        }
    }
}

/// The primary context of a CUDA device, retained for the rank's lifetime.
struct Context {
    device: cudarc::driver::sys::CUdevice,
    ctx: cudarc::driver::sys::CUcontext,
}

// SAFETY: a CUDA context handle may be made current on any thread.
unsafe impl Send for Context {}

impl Context {
    fn retain(index: usize) -> Result<Context, DistError> {
        crate::devices::driver_available().map_err(|e| DistError::Unavailable(format!("CUDA driver: {e}")))?;
        let device = cudarc::driver::result::device::get(index as c_int)
            .map_err(|e| DistError::Unavailable(format!("CUDA device {index}: {e}")))?;
        // SAFETY: `device` came from cuDeviceGet; the retained context is released on drop.
        let ctx = unsafe { cudarc::driver::result::primary_ctx::retain(device) }
            .map_err(|e| DistError::Unavailable(format!("CUDA device {index}: {e}")))?;
        Ok(Context { device, ctx })
    }

    /// Makes the device current on this thread (what `cudaSetDevice` does).
    fn bind(&self) -> Result<(), DistError> {
        // SAFETY: the context is retained and valid.
        unsafe { cudarc::driver::result::ctx::set_current(self.ctx) }
            .map_err(|e| DistError::Nccl(format!("cannot make the device current: {e}")))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in Context::retain.
        let _ = unsafe { cudarc::driver::result::primary_ctx::release(self.device) };
    }
}

/// One rank of an NCCL group: the communicator of one CUDA device.
pub struct NcclComm {
    rank: usize,
    world: usize,
    device: usize,
    shared: Arc<Shared>,
    context: Context,
    sync: bool,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .finish()
    }
}

/// The ranks of a new group over CUDA devices `devices` (rank `i` on `cuda:devices[i]`), made
/// with `ncclCommInitAll` from this thread; hand each to its own thread.
pub fn group(devices: &[usize]) -> Result<Vec<NcclComm>, DistError> {
    if devices.is_empty() {
        return Err(DistError::Invalid("an NCCL group needs at least one device".into()));
    }
    let lib = library()?;
    let visible = tch::Cuda::device_count().max(0) as usize;
    if let Some(d) = devices.iter().find(|d| **d >= visible) {
        return Err(DistError::Unavailable(format!(
            "cuda:{d} is not a device libtorch can use here ({visible} CUDA device(s) visible)"
        )));
    }
    let contexts = devices.iter().map(|d| Context::retain(*d)).collect::<Result<Vec<_>, _>>()?;
    let list: Vec<c_int> = devices.iter().map(|d| *d as c_int).collect();
    let mut comms: Vec<ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
    // SAFETY: `comms` has room for one communicator per device of `list`.
    let code = unsafe { (lib.comm_init_all)(comms.as_mut_ptr(), list.len() as c_int, list.as_ptr()) };
    lib.check("ncclCommInitAll", code)?;
    let shared = Arc::new(Shared {
        lib,
        rendezvous: Arc::new(Rendezvous::new(devices.len())),
        comms: comms.into_iter().map(|comm| Mutex::new(CommSlot { comm, live: true })).collect(),
    });
    let sync = std::env::var(NCCL_SYNC_ENV).is_ok_and(|v| v.trim() == "1");
    Ok(contexts
        .into_iter()
        .enumerate()
        .map(|(rank, context)| NcclComm {
            rank,
            world: devices.len(),
            device: devices[rank],
            shared: shared.clone(),
            context,
            sync,
        })
        .collect())
}

impl NcclComm {
    fn check_tensor(&self, tensor: &Tensor, what: &str) -> Result<ncclDataType_t, DistError> {
        if tensor.device() != Device::Cuda(self.device) {
            return Err(DistError::Invalid(format!(
                "{what}: rank {} works on cuda:{}, got a tensor on {:?}",
                self.rank,
                self.device,
                tensor.device()
            )));
        }
        if !tensor.is_contiguous() {
            return Err(DistError::Invalid(format!("{what}: NCCL needs a contiguous tensor")));
        }
        data_type(tensor.kind())
    }

    /// Runs `call` on this rank's communicator after the group's rendezvous, on the device's
    /// null stream.
    fn collective(&self, what: &str, call: impl FnOnce(&NcclLibrary, ncclComm_t) -> c_int) -> Result<(), DistError> {
        self.shared.rendezvous.wait()?;
        if self.sync {
            tch::Cuda::synchronize(self.device as i64);
        }
        let result = {
            let slot = self.shared.comms[self.rank].lock().unwrap_or_else(PoisonError::into_inner);
            if slot.live {
                self.context.bind().and_then(|()| self.shared.lib.check(what, call(self.shared.lib, slot.comm)))
            } else {
                Err(DistError::Aborted(self.shared.rendezvous.aborted().unwrap_or_default()))
            }
        };
        match result {
            Ok(()) => {
                if self.sync {
                    tch::Cuda::synchronize(self.device as i64);
                }
                Ok(())
            }
            Err(DistError::Aborted(r)) => Err(DistError::Aborted(r)),
            Err(e) => {
                // The peers passed the rendezvous and may have enqueued their part: abort the
                // communicators so that their kernels do not wait for this rank forever.
                self.abort_handle().abort(&format!("rank {}: {e}", self.rank));
                Err(e)
            }
        }
    }
}

impl AllReduce for NcclComm {
    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), DistError> {
        let dtype = self.check_tensor(tensor, "all-reduce")?;
        let count = tensor.numel();
        let ptr = tensor.data_ptr();
        // SAFETY: `ptr` is the tensor's device memory of `count` elements of `dtype`, alive
        // (the caller holds the tensor) until the kernel, ordered on the same stream as every
        // later use, has run.
        self.collective("ncclAllReduce", |lib, comm| unsafe {
            (lib.all_reduce)(ptr, ptr, count, dtype, ncclRedOp_t::ncclSum, comm, std::ptr::null_mut())
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        if root >= self.world {
            return Err(DistError::Invalid(format!("broadcast from rank {root} in a group of {}", self.world)));
        }
        let dtype = self.check_tensor(tensor, "broadcast")?;
        let count = tensor.numel();
        let ptr = tensor.data_ptr();
        // SAFETY: as in all_reduce_sum.
        self.collective("ncclBroadcast", |lib, comm| unsafe {
            (lib.broadcast)(ptr, ptr, count, dtype, root as c_int, comm, std::ptr::null_mut())
        })
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        self.shared.rendezvous.wait()
    }

    fn abort_handle(&self) -> AbortHandle {
        let shared = self.shared.clone();
        AbortHandle {
            rendezvous: self.shared.rendezvous.clone(),
            on_abort: Some(Arc::new(move || shared.abort_comms())),
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let mut slot = self.shared.comms[self.rank].lock().unwrap_or_else(PoisonError::into_inner);
        if slot.live {
            let _ = self.context.bind();
            // SAFETY: the communicator is live and this is its last use.
            let _ = unsafe { (self.shared.lib.comm_destroy)(slot.comm) };
            slot.live = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_are_decoded() {
        assert_eq!(version_string(22703), "2.27.3");
        assert_eq!(version_string(21903), "2.19.3");
        assert_eq!(version_string(2804), "2.8.4");
    }

    #[test]
    fn probing_never_panics_and_lists_what_it_tried() {
        let p = probe();
        assert!(!p.tried.is_empty());
        assert!(p.tried.iter().any(|t| t.starts_with("libnccl.so.2")), "{:?}", p.tried);
        if p.found {
            assert!(p.path.is_some() && p.version.is_some());
            assert!(p.tried.last().is_some_and(|t| t.ends_with(": ok")));
        } else {
            let e = library().unwrap_err().to_string();
            assert!(e.contains("NCCL is not available") && e.contains(NCCL_LIBRARY_ENV), "{e}");
        }
    }

    #[test]
    fn unsupported_kinds_are_refused() {
        assert!(data_type(Kind::Float).is_ok());
        assert!(data_type(Kind::Bool).is_err());
    }
}
