//! Collective operations for data-parallel training: one [`AllReduce`] trait, two backends.
//!
//! A *group* is `N` ranks, one per training replica, each driven by its own thread. Every rank
//! calls the same collectives in the same order with tensors of the same shapes and kinds; a
//! collective returns on a rank once that rank's part of it is done.
//!
//! * [`cpu`]: the ranks are threads of this process exchanging tensors through shared slots and
//!   a barrier. Sums are exact and deterministic: every element is added in rank order
//!   `((x₀ + x₁) + x₂) + …`, so the result does not depend on thread timing and is the same on
//!   every rank. Used by CPU workers with several CPU slots, and by the tests that prove `N`
//!   replicas equal to one.
//! * [`nccl`]: one NCCL communicator per CUDA device in this process (`ncclCommInitAll`), the
//!   collectives run in place on the tensors' device memory on libtorch's stream. The NCCL
//!   library is loaded at run time, so the worker builds and starts without it.
//!
//! [`group`] picks the backend from the devices: all CPU → [`Backend::Cpu`], distinct CUDA
//! devices → [`Backend::Nccl`] (an error naming what was tried when NCCL is not found).
//!
//! **Failures.** A rank that fails (an error, a cancelled trial, a panic) calls
//! [`AbortHandle::abort`]; every rank waiting in or later entering a collective of that group
//! gets [`DistError::Aborted`] instead of waiting forever. Collectives of both backends begin
//! with a host-side rendezvous of all ranks that an abort releases; NCCL communicators are in
//! addition aborted (`ncclCommAbort`) so that no kernel keeps waiting for a rank that is gone.
//!
//! [`bucket`] flattens many tensors (gradients, parameters, buffers) into buckets of about
//! 25 MB ([`BUCKET_BYTES`], PyTorch DDP's default) so that a step makes a few large collectives
//! instead of one per tensor; [`all_reduce_gradients`] is what a training step calls.

pub mod bucket;
pub mod check;
pub mod cpu;
pub mod nccl;

use std::sync::{Arc, Condvar, Mutex, PoisonError};

use tch::{Device, TchError, Tensor};

pub use bucket::{BUCKET_BYTES, all_reduce_gradients, all_reduce_tensors, broadcast_tensors};

/// Why a collective or a group failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DistError {
    /// The group was aborted (another rank failed or was stopped); the collective did not
    /// complete. Carries the reason given to [`AbortHandle::abort`].
    #[error("data-parallel group aborted: {0}")]
    Aborted(String),
    /// The backend cannot be used on this machine (no NCCL library, no CUDA driver, devices
    /// that cannot form one group).
    #[error("{0}")]
    Unavailable(String),
    /// A tensor does not suit the collective (wrong device, kind, layout), or the ranks passed
    /// tensors that do not match.
    #[error("{0}")]
    Invalid(String),
    /// libtorch failed while preparing or copying a tensor.
    #[error("libtorch: {0}")]
    Torch(String),
    /// NCCL returned an error.
    #[error("NCCL: {0}")]
    Nccl(String),
}

impl From<TchError> for DistError {
    fn from(e: TchError) -> Self {
        let text = match e {
            TchError::Torch(s) => s,
            other => other.to_string(),
        };
        DistError::Torch(text.split("\nException raised from").next().unwrap_or_default().trim_end().to_string())
    }
}

/// Which implementation a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Threads of this process, host memory ([`cpu`]).
    Cpu,
    /// NCCL communicators, one per CUDA device ([`nccl`]).
    Nccl,
}

impl Backend {
    /// `cpu` or `nccl`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Nccl => "nccl",
        }
    }
}

/// One rank's handle on a group: the collectives training uses.
///
/// Every rank of a group must call the same collectives in the same order, with tensors of
/// the same shape and kind (each on its rank's [`device`](AllReduce::device)); otherwise the
/// group reports [`DistError::Invalid`] (CPU) or hangs until aborted (NCCL cannot check).
pub trait AllReduce: Send {
    /// The implementation.
    fn backend(&self) -> Backend;
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// The device this rank's tensors live on.
    fn device(&self) -> Device;
    /// Replaces `tensor` on every rank by the element-wise sum over all ranks.
    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), DistError>;
    /// Copies rank `root`'s `tensor` into every other rank's `tensor`.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), DistError>;
    /// Returns once every rank has called it (or with [`DistError::Aborted`]).
    fn barrier(&mut self) -> Result<(), DistError>;
    /// A handle that aborts the whole group, usable from any thread.
    fn abort_handle(&self) -> AbortHandle;
}

/// Aborts a group: every rank blocked in or later entering one of its collectives gets
/// [`DistError::Aborted`]. Cheap to clone; the first reason given wins.
#[derive(Clone)]
pub struct AbortHandle {
    rendezvous: Arc<Rendezvous>,
    /// Backend-specific clean-up run once, by the first abort (NCCL: abort the communicators).
    on_abort: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortHandle").field("aborted", &self.reason()).finish()
    }
}

impl AbortHandle {
    /// Aborts the group with `reason` (a no-op when it was already aborted).
    pub fn abort(&self, reason: &str) {
        if self.rendezvous.abort(reason)
            && let Some(f) = &self.on_abort
        {
            f();
        }
    }

    /// The reason of the abort, if the group was aborted.
    pub fn reason(&self) -> Option<String> {
        self.rendezvous.aborted()
    }
}

/// A host-side barrier of `world` threads that can be aborted: the rendezvous every
/// collective of both backends starts with.
pub(crate) struct Rendezvous {
    world: usize,
    state: Mutex<RendezvousState>,
    cv: Condvar,
}

struct RendezvousState {
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

impl Rendezvous {
    pub(crate) fn new(world: usize) -> Rendezvous {
        Rendezvous {
            world: world.max(1),
            state: Mutex::new(RendezvousState { arrived: 0, generation: 0, aborted: None }),
            cv: Condvar::new(),
        }
    }

    /// Waits until all `world` threads have called it since the last release.
    pub(crate) fn wait(&self) -> Result<(), DistError> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = &st.aborted {
            return Err(DistError::Aborted(r.clone()));
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.generation = st.generation.wrapping_add(1);
            self.cv.notify_all();
            return Ok(());
        }
        while st.generation == generation && st.aborted.is_none() {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.generation != generation {
            // Released before (or while) the group was aborted: this rendezvous completed.
            Ok(())
        } else {
            Err(DistError::Aborted(st.aborted.clone().unwrap_or_default()))
        }
    }

    /// Marks the group aborted and wakes every waiter; true for the first abort.
    pub(crate) fn abort(&self, reason: &str) -> bool {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let first = st.aborted.is_none();
        if first {
            st.aborted = Some(reason.to_string());
        }
        self.cv.notify_all();
        first
    }

    pub(crate) fn aborted(&self) -> Option<String> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).aborted.clone()
    }
}

/// The backend `devices` (one per rank) would use: CPU for CPU devices, NCCL for distinct
/// CUDA devices. Checks the list, not the machine.
pub fn backend_for(devices: &[Device]) -> Result<Backend, DistError> {
    if devices.is_empty() {
        return Err(DistError::Invalid("a data-parallel group needs at least one device".into()));
    }
    if devices.iter().all(|d| *d == Device::Cpu) {
        return Ok(Backend::Cpu);
    }
    let mut seen = Vec::new();
    for d in devices {
        match d {
            Device::Cuda(i) => {
                if seen.contains(i) {
                    return Err(DistError::Invalid(format!(
                        "device cuda:{i} appears twice; each CUDA device can hold one replica of a trial"
                    )));
                }
                seen.push(*i);
            }
            other => {
                return Err(DistError::Invalid(format!(
                    "devices {} mix {other:?} with CUDA devices; the replicas of a trial are all on CPU or all on CUDA devices",
                    describe_devices(devices)
                )));
            }
        }
    }
    Ok(Backend::Nccl)
}

/// `cpu,cpu` / `cuda:0,cuda:1`.
pub fn describe_devices(devices: &[Device]) -> String {
    devices.iter().map(|d| device_name(*d)).collect::<Vec<_>>().join(",")
}

/// `cpu`, `cuda:N`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// One handle per rank (rank `i` on `devices[i]`), backend chosen by [`backend_for`]. For CUDA
/// devices NCCL must be available ([`nccl::probe`] says what was found or tried).
pub fn group(devices: &[Device]) -> Result<Vec<Box<dyn AllReduce>>, DistError> {
    match backend_for(devices)? {
        Backend::Cpu => Ok(cpu::group(devices.len()).into_iter().map(|c| Box::new(c) as Box<dyn AllReduce>).collect()),
        Backend::Nccl => {
            let indices: Vec<usize> = devices
                .iter()
                .filter_map(|d| match d {
                    Device::Cuda(i) => Some(*i),
                    _ => None,
                })
                .collect();
            Ok(nccl::group(&indices)?.into_iter().map(|c| Box::new(c) as Box<dyn AllReduce>).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_follow_the_devices() {
        assert_eq!(backend_for(&[Device::Cpu]), Ok(Backend::Cpu));
        assert_eq!(backend_for(&[Device::Cpu, Device::Cpu, Device::Cpu]), Ok(Backend::Cpu));
        assert_eq!(backend_for(&[Device::Cuda(0), Device::Cuda(1)]), Ok(Backend::Nccl));
        let e = backend_for(&[]).unwrap_err().to_string();
        assert!(e.contains("at least one device"), "{e}");
        let e = backend_for(&[Device::Cuda(1), Device::Cuda(1)]).unwrap_err().to_string();
        assert!(e.contains("cuda:1 appears twice"), "{e}");
        let e = backend_for(&[Device::Cuda(0), Device::Cpu]).unwrap_err().to_string();
        assert!(e.contains("cuda:0,cpu") && e.contains("all on CPU or all on CUDA"), "{e}");
    }

    #[test]
    fn rendezvous_releases_waiters_on_abort() {
        let rv = Arc::new(Rendezvous::new(3));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let rv = rv.clone();
                std::thread::spawn(move || rv.wait())
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(rv.abort("rank 2 failed"));
        assert!(!rv.abort("again"));
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err(DistError::Aborted("rank 2 failed".into())));
        }
        assert_eq!(rv.wait(), Err(DistError::Aborted("rank 2 failed".into())));
    }
}
