//! The in-process backend: `N` ranks are threads that exchange host tensors through shared
//! slots.
//!
//! `all_reduce_sum` is a reduce-scatter followed by an all-gather, both through memory:
//!
//! 1. every rank publishes its tensor (flattened, on the host; no copy when it already is);
//! 2. rendezvous; rank `r` sums elements `[lo_r, hi_r)` — its `1/N` of them — over the ranks
//!    in rank order, `((x₀ + x₁) + x₂) + …`, and publishes that part;
//! 3. rendezvous; every rank copies the `N` parts into its tensor.
//!
//! Each element is summed by one rank, in a fixed order, so the result is deterministic and
//! the same on every rank whatever the threads' timing, and the work is split `N` ways.
//! A rank only overwrites its slots after the next collective's first rendezvous, which every
//! rank reaches only after reading the previous collective's slots, so two rendezvous per
//! collective suffice. `broadcast` publishes the root's tensor and needs two as well (the root
//! may change its tensor only after everyone has copied it).

use std::sync::{Arc, Mutex, PoisonError};

use tch::{Device, Kind, Tensor};

use super::{AbortHandle, AllReduce, Backend, DistError, Rendezvous};

/// Slots shared by the ranks of one group.
struct Shared {
    rendezvous: Arc<Rendezvous>,
    slots: Mutex<Slots>,
}

struct Slots {
    /// What each rank contributes to the current collective (flattened host tensors).
    inputs: Vec<Option<Tensor>>,
    /// The part of the sum each rank computed.
    parts: Vec<Option<Tensor>>,
}

/// One rank of an in-process CPU group (see the module documentation).
pub struct CpuComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CpuComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuComm").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

/// The `world` ranks of a new group, in rank order (hand each to its own thread).
pub fn group(world: usize) -> Vec<CpuComm> {
    let world = world.max(1);
    let shared = Arc::new(Shared {
        rendezvous: Arc::new(Rendezvous::new(world)),
        slots: Mutex::new(Slots {
            inputs: (0..world).map(|_| None).collect(),
            parts: (0..world).map(|_| None).collect(),
        }),
    });
    (0..world).map(|rank| CpuComm { rank, world, shared: shared.clone() }).collect()
}

/// Elements `[lo, hi)` of `n` that rank `rank` of `world` sums.
fn part(n: i64, rank: usize, world: usize) -> (i64, i64) {
    let (w, r) = (world as i64, rank as i64);
    let (base, extra) = (n / w, n % w);
    let lo = r * base + r.min(extra);
    let len = base + i64::from(r < extra);
    (lo, lo + len)
}

impl CpuComm {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.shared.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `tensor` as a flat, contiguous host tensor (a view when it already is one).
    fn host_flat(tensor: &Tensor) -> Result<Tensor, DistError> {
        Ok(tensor.f_to_device(Device::Cpu)?.f_contiguous()?.f_reshape([-1])?)
    }

    /// Fails (and aborts the group, so that no rank waits for the others) when the ranks'
    /// tensors disagree.
    fn check_same(&self, inputs: &[Tensor]) -> Result<(), DistError> {
        let (n0, k0) = (inputs[0].numel(), inputs[0].kind());
        for (r, t) in inputs.iter().enumerate() {
            if t.numel() != n0 || t.kind() != k0 {
                let why = format!(
                    "all-reduce: rank {r} passed {} {:?} elements, rank 0 passed {n0} {k0:?}",
                    t.numel(),
                    t.kind()
                );
                self.abort_handle().abort(&why);
                return Err(DistError::Invalid(why));
            }
        }
        Ok(())
    }
}

impl AllReduce for CpuComm {
    fn backend(&self) -> Backend {
        Backend::Cpu
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_reduce_sum(&mut self, tensor: &mut Tensor) -> Result<(), DistError> {
        if matches!(tensor.kind(), Kind::Bool) {
            return Err(DistError::Invalid("all-reduce: cannot sum a boolean tensor".into()));
        }
        let rv = self.shared.rendezvous.clone();
        if self.world == 1 {
            return match rv.aborted() {
                Some(r) => Err(DistError::Aborted(r)),
                None => Ok(()),
            };
        }
        let mine = Self::host_flat(tensor)?;
        self.slots().inputs[self.rank] = Some(mine);
        rv.wait()?;
        let inputs: Vec<Tensor> = self
            .slots()
            .inputs
            .iter()
            .map(|t| t.as_ref().map(Tensor::shallow_clone))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                DistError::Invalid("all-reduce: a rank's input is missing (collectives out of order)".into())
            })?;
        self.check_same(&inputs)?;
        let (lo, hi) = part(inputs[0].numel() as i64, self.rank, self.world);
        let mut acc = inputs[0].f_narrow(0, lo, hi - lo)?.f_detach_copy()?;
        for x in &inputs[1..] {
            acc = acc.f_add_(&x.f_narrow(0, lo, hi - lo)?)?;
        }
        self.slots().parts[self.rank] = Some(acc);
        rv.wait()?;
        let parts: Vec<Tensor> = self
            .slots()
            .parts
            .iter()
            .map(|t| t.as_ref().map(Tensor::shallow_clone))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                DistError::Invalid("all-reduce: a rank's part is missing (collectives out of order)".into())
            })?;
        tch::no_grad(|| -> Result<(), DistError> {
            if tensor.device() == Device::Cpu && tensor.is_contiguous() {
                // Straight into the caller's memory, part by part.
                let flat = tensor.f_view([-1])?;
                for (r, p) in parts.iter().enumerate() {
                    let (lo, hi) = part(flat.numel() as i64, r, self.world);
                    flat.f_narrow(0, lo, hi - lo)?.f_copy_(p)?;
                }
            } else {
                let sum = Tensor::f_cat(&parts, 0)?.f_view(tensor.size().as_slice())?;
                tensor.f_copy_(&sum)?;
            }
            Ok(())
        })
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        if root >= self.world {
            return Err(DistError::Invalid(format!("broadcast from rank {root} in a group of {}", self.world)));
        }
        let rv = self.shared.rendezvous.clone();
        if self.world == 1 {
            return match rv.aborted() {
                Some(r) => Err(DistError::Aborted(r)),
                None => Ok(()),
            };
        }
        if self.rank == root {
            let mine = Self::host_flat(tensor)?;
            self.slots().inputs[root] = Some(mine);
        }
        rv.wait()?;
        if self.rank != root {
            let src = self.slots().inputs[root]
                .as_ref()
                .map(Tensor::shallow_clone)
                .ok_or_else(|| DistError::Invalid("broadcast: the root's tensor is missing".into()))?;
            if src.numel() != tensor.numel() || src.kind() != tensor.kind() {
                let why = format!(
                    "broadcast: rank {} expects {} {:?} elements, root {root} sent {} {:?}",
                    self.rank,
                    tensor.numel(),
                    tensor.kind(),
                    src.numel(),
                    src.kind()
                );
                self.abort_handle().abort(&why);
                return Err(DistError::Invalid(why));
            }
            tch::no_grad(|| tensor.f_copy_(&src.f_view(tensor.size().as_slice())?))?;
        }
        // The root may change its tensor only once every rank has copied it.
        rv.wait()
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        self.shared.rendezvous.wait()
    }

    fn abort_handle(&self) -> AbortHandle {
        AbortHandle { rendezvous: self.shared.rendezvous.clone(), on_abort: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_element_once() {
        for n in [0i64, 1, 2, 5, 7, 100] {
            for world in 1..5 {
                let mut next = 0;
                for r in 0..world {
                    let (lo, hi) = part(n, r, world);
                    assert_eq!(lo, next);
                    assert!(hi >= lo);
                    next = hi;
                }
                assert_eq!(next, n);
            }
        }
    }
}
