//! A self-test of the data-parallel collectives on this machine (`sweep-worker
//! allreduce-check`): builds the group training would build for the given devices, all-reduces
//! known gradients through the training code path ([`all_reduce_gradients`], bucketing
//! included), broadcasts known parameters, checks every element, and times the gradient
//! all-reduce.

use std::time::Instant;

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::{AllReduce, BUCKET_BYTES, DistError, all_reduce_gradients, bucket, nccl};

/// What [`allreduce_check`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AllReduceReport {
    /// `cpu` or `nccl`.
    pub backend: String,
    /// Number of ranks (one per device).
    pub world_size: usize,
    /// The devices, rank by rank (`cuda:0`, …).
    pub devices: Vec<String>,
    /// The NCCL library file (NCCL backend).
    pub nccl_library: Option<String>,
    /// Its version (NCCL backend).
    pub nccl_version: Option<String>,
    /// Gradient tensors reduced per rank.
    pub tensors: usize,
    /// Their elements (float32).
    pub elements: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Buckets they form at [`BUCKET_BYTES`].
    pub buckets: usize,
    /// Timed gradient all-reduces (after one untimed).
    pub repetitions: usize,
    /// Mean seconds of one gradient all-reduce (every bucket, until the device is idle),
    /// slowest rank.
    pub seconds: f64,
    /// Largest `|result - expected|` of the gradient all-reduce over every element of every
    /// rank (0 when exact, which it is for these small integers).
    pub max_abs_error: f64,
    /// Largest difference between a rank's parameters after the broadcast and rank 0's.
    pub broadcast_max_abs_error: f64,
    /// Both errors are 0.
    pub ok: bool,
}

/// Gradient shapes of the check: two tensors over half the bucket cap (so the plan has several
/// buckets), and small ones of assorted ranks that share a bucket.
const SHAPES: [&[i64]; 6] = [&[7], &[1000], &[64, 3, 3, 3], &[1024, 4096], &[13, 17], &[2048, 2048]];

/// Runs the check on `devices` (one rank each, as training would place replicas), timing
/// `repetitions` gradient all-reduces.
pub fn allreduce_check(devices: &[Device], repetitions: usize) -> Result<AllReduceReport, DistError> {
    let comms = super::group(devices)?;
    let backend = comms[0].backend();
    let world = comms.len();
    let abort = comms[0].abort_handle();
    let results: Vec<Result<(f64, f64, f64), DistError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut comm| {
                let abort = abort.clone();
                s.spawn(move || {
                    let r = run_rank(comm.as_mut(), repetitions);
                    if let Err(e) = &r {
                        abort.abort(&format!("rank {}: {e}", comm.rank()));
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(DistError::Invalid("a rank of the check panicked".into()))))
            .collect()
    });
    let mut worst = (0.0f64, 0.0f64, 0.0f64);
    for r in results {
        let (e, b, t) = r?;
        worst = (worst.0.max(e), worst.1.max(b), worst.2.max(t));
    }
    let probe = (backend == super::Backend::Nccl).then(nccl::probe);
    let shapes: Vec<Tensor> = SHAPES.iter().map(|s| Tensor::zeros(*s, (Kind::Float, Device::Cpu))).collect();
    let elements: u64 = shapes.iter().map(|t| t.numel() as u64).sum();
    Ok(AllReduceReport {
        backend: backend.name().into(),
        world_size: world,
        devices: devices.iter().map(|d| super::device_name(*d)).collect(),
        nccl_library: probe.as_ref().and_then(|p| p.path.clone()),
        nccl_version: probe.as_ref().and_then(|p| p.version.clone()),
        tensors: SHAPES.len(),
        elements,
        bytes: elements * 4,
        buckets: bucket::plan_buckets(&shapes, BUCKET_BYTES).len(),
        repetitions,
        seconds: worst.2,
        max_abs_error: worst.0,
        broadcast_max_abs_error: worst.1,
        ok: worst.0 == 0.0 && worst.1 == 0.0,
    })
}

/// The check on every CUDA device libtorch sees (an error when there is none).
pub fn allreduce_check_visible(repetitions: usize) -> Result<AllReduceReport, DistError> {
    let n = tch::Cuda::device_count().max(0) as usize;
    if n == 0 {
        return Err(DistError::Unavailable("libtorch sees no CUDA device on this machine".into()));
    }
    allreduce_check(&(0..n).map(Device::Cuda).collect::<Vec<_>>(), repetitions)
}

/// The report as a few lines for a terminal.
pub fn report_text(r: &AllReduceReport) -> String {
    let mut out = format!("backend      {} (world size {}: {})\n", r.backend, r.world_size, r.devices.join(", "));
    if let Some(lib) = &r.nccl_library {
        out += &format!("NCCL         {} ({})\n", r.nccl_version.as_deref().unwrap_or("version unknown"), lib);
    }
    out += &format!(
        "gradients    {} tensors, {} elements ({:.1} MB) in {} bucket(s)\n",
        r.tensors,
        r.elements,
        r.bytes as f64 / 1e6,
        r.buckets
    );
    out += &format!(
        "all-reduce   {:.3} ms per gradient all-reduce over {} repetitions ({:.2} GB/s of gradients)\n",
        r.seconds * 1e3,
        r.repetitions,
        if r.seconds > 0.0 { r.bytes as f64 / r.seconds / 1e9 } else { 0.0 }
    );
    out += &format!(
        "result       {} (largest error: all-reduce {:e}, broadcast {:e})\n",
        if r.ok { "exact" } else { "WRONG" },
        r.max_abs_error,
        r.broadcast_max_abs_error
    );
    out
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// One rank: (max gradient error, max broadcast error, mean seconds per gradient all-reduce).
fn run_rank(comm: &mut dyn AllReduce, repetitions: usize) -> Result<(f64, f64, f64), DistError> {
    let (rank, world, device) = (comm.rank(), comm.world_size(), comm.device());
    let opts = (Kind::Float, device);
    // Gradients: pattern_i · (rank + 1), with pattern_i = (k mod 13) + 1 + i, so the sum over
    // the ranks is pattern_i · world (world + 1) / 2, exactly.
    let mut params = Vec::new();
    let mut patterns = Vec::new();
    for (i, shape) in SHAPES.iter().enumerate() {
        let n: i64 = shape.iter().product();
        let pattern = Tensor::f_arange(n, opts)?.f_remainder(13)?.f_add_scalar(1.0 + i as f64)?.f_view(*shape)?;
        let p = Tensor::f_full(*shape, (1000 * (rank + 1) + i) as f64, opts)?.f_set_requires_grad(true)?;
        params.push(p);
        patterns.push(pattern);
    }
    let set_grads = |params: &[Tensor]| -> Result<(), DistError> {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        let mut loss = Tensor::f_zeros([], opts)?;
        for (p, c) in params.iter().zip(&patterns) {
            loss = loss.f_add(&p.f_mul(c)?.f_mul_scalar((rank + 1) as f64)?.f_sum(Kind::Float)?)?;
        }
        loss.f_backward()?;
        Ok(())
    };
    set_grads(&params)?;
    all_reduce_gradients(comm, &params, BUCKET_BYTES)?;
    let scale = (world * (world + 1) / 2) as f64;
    let mut max_err = 0.0f64;
    for (p, c) in params.iter().zip(&patterns) {
        let want = c.f_mul_scalar(scale)?;
        let err = p.grad().f_sub(&want)?.f_abs()?.f_max()?.f_double_value(&[])?;
        max_err = max_err.max(err);
    }
    // Broadcast: every rank ends with rank 0's parameters (1000 + i).
    super::broadcast_tensors(comm, &params, 0, BUCKET_BYTES)?;
    let mut bcast_err = 0.0f64;
    for (i, p) in params.iter().enumerate() {
        let err = p.f_detach()?.f_sub_scalar((1000 + i) as f64)?.f_abs()?.f_max()?.f_double_value(&[])?;
        bcast_err = bcast_err.max(err);
    }
    // Timing: the same reduction, started together, until the device is idle.
    let mut seconds = 0.0;
    if repetitions > 0 {
        synchronize(device);
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..repetitions {
            all_reduce_gradients(comm, &params, BUCKET_BYTES)?;
        }
        synchronize(device);
        seconds = start.elapsed().as_secs_f64() / repetitions as f64;
    }
    Ok((max_err, bcast_err, seconds))
}
