//! Many tensors, few collectives: tensors are flattened into buckets of about
//! [`BUCKET_BYTES`] (PyTorch DDP's `bucket_cap_mb = 25`), each bucket is all-reduced or
//! broadcast as one flat tensor, and the results are copied back.
//!
//! A bucket holds tensors of one kind and one device, taken in reverse order (the last layers
//! first, as DDP, whose buckets fill as the backward pass produces gradients); a tensor larger
//! than the cap has a bucket of its own. The plan depends only on the tensors' shapes and
//! kinds, so every rank makes the same buckets.

use tch::{Device, Kind, Tensor};

use super::{AllReduce, DistError};

/// The bucket size cap in bytes (25 MiB, PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Indices of `tensors` grouped into buckets (see the module documentation).
pub fn plan_buckets(tensors: &[Tensor], cap_bytes: usize) -> Vec<Vec<usize>> {
    struct Open {
        kind: Kind,
        device: Device,
        bytes: usize,
        bucket: usize,
    }
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut open: Vec<Open> = Vec::new();
    for i in (0..tensors.len()).rev() {
        let t = &tensors[i];
        let (kind, device) = (t.kind(), t.device());
        let bytes = t.numel() * kind.elt_size_in_bytes();
        match open.iter_mut().find(|o| o.kind == kind && o.device == device) {
            Some(o) if o.bytes + bytes <= cap_bytes || buckets[o.bucket].is_empty() => {
                o.bytes += bytes;
                buckets[o.bucket].push(i);
            }
            Some(o) => {
                buckets.push(vec![i]);
                *o = Open { kind, device, bytes, bucket: buckets.len() - 1 };
            }
            None => {
                buckets.push(vec![i]);
                open.push(Open { kind, device, bytes, bucket: buckets.len() - 1 });
            }
        }
    }
    buckets
}

/// The tensors, flattened and concatenated into one new contiguous 1-D tensor.
pub fn flatten(tensors: &[&Tensor]) -> Result<Tensor, DistError> {
    tch::no_grad(|| {
        let flat: Vec<Tensor> = tensors.iter().map(|t| t.f_reshape([-1])).collect::<Result<_, _>>()?;
        Ok(Tensor::f_cat(&flat, 0)?)
    })
}

/// Copies consecutive slices of `flat` back into `tensors` (the inverse of [`flatten`]).
pub fn unflatten_into(flat: &Tensor, tensors: &[&Tensor]) -> Result<(), DistError> {
    let total: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    if flat.size() != [total] {
        return Err(DistError::Invalid(format!(
            "unflatten: a flat tensor of shape {:?} for {total} elements",
            flat.size()
        )));
    }
    tch::no_grad(|| {
        let mut offset = 0i64;
        for t in tensors {
            let n = t.numel() as i64;
            let mut dst = t.shallow_clone();
            dst.f_copy_(&flat.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?)?;
            offset += n;
        }
        Ok(())
    })
}

/// Runs `op` on every bucket of `tensors` (in place: a lone contiguous tensor directly, else
/// through a flat copy).
fn per_bucket(
    tensors: &[Tensor],
    cap_bytes: usize,
    mut op: impl FnMut(&mut Tensor) -> Result<(), DistError>,
) -> Result<(), DistError> {
    for bucket in plan_buckets(tensors, cap_bytes) {
        let members: Vec<&Tensor> = bucket.iter().map(|&i| &tensors[i]).collect();
        if let [only] = members.as_slice()
            && only.is_contiguous()
        {
            let mut t = only.shallow_clone();
            op(&mut t)?;
            continue;
        }
        let mut flat = flatten(&members)?;
        op(&mut flat)?;
        unflatten_into(&flat, &members)?;
    }
    Ok(())
}

/// Replaces every tensor of `tensors` (on every rank) by its element-wise sum over the ranks,
/// bucket by bucket.
pub fn all_reduce_tensors(comm: &mut dyn AllReduce, tensors: &[Tensor], cap_bytes: usize) -> Result<(), DistError> {
    per_bucket(tensors, cap_bytes, |t| tch::no_grad(|| comm.all_reduce_sum(t)))
}

/// Copies rank `root`'s `tensors` into every other rank's, bucket by bucket.
pub fn broadcast_tensors(
    comm: &mut dyn AllReduce,
    tensors: &[Tensor],
    root: usize,
    cap_bytes: usize,
) -> Result<(), DistError> {
    per_bucket(tensors, cap_bytes, |t| tch::no_grad(|| comm.broadcast(t, root)))
}

/// What a data-parallel training step does after its backward pass: the gradients of the
/// parameters among `params` that require one are summed over the ranks, in buckets.
///
/// Every such parameter takes part on every rank, so the buckets match: a parameter without a
/// gradient here (a rank whose shard of the batch was empty, or a parameter its forward pass
/// did not use) first gets a zero gradient, through a backward pass of `0 · Σ sum(p)`. Its
/// summed gradient is then whatever the other ranks contribute.
pub fn all_reduce_gradients(comm: &mut dyn AllReduce, params: &[Tensor], cap_bytes: usize) -> Result<(), DistError> {
    let trainable: Vec<&Tensor> = params.iter().filter(|p| p.requires_grad()).collect();
    let missing: Vec<&Tensor> = trainable.iter().copied().filter(|p| !p.grad().defined()).collect();
    if !missing.is_empty() {
        tch::with_grad(|| -> Result<(), DistError> {
            let mut zero: Option<Tensor> = None;
            for p in missing {
                let s = p.f_sum(p.kind())?;
                zero = Some(match zero {
                    None => s,
                    Some(z) => z.f_add(&s)?,
                });
            }
            if let Some(z) = zero {
                z.f_mul_scalar(0.0)?.f_backward()?;
            }
            Ok(())
        })?;
    }
    let grads: Vec<Tensor> = trainable.iter().map(|p| p.grad()).collect();
    all_reduce_tensors(comm, &grads, cap_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[i64], kind: Kind) -> Tensor {
        Tensor::zeros(shape, (kind, Device::Cpu))
    }

    #[test]
    fn buckets_respect_the_cap_kind_and_reverse_order() {
        // 4-byte floats: 100, 50, 200 (alone: over the cap), 10 elements, and an int64 one.
        let ts = [
            t(&[10, 10], Kind::Float),
            t(&[50], Kind::Float),
            t(&[2, 100], Kind::Float),
            t(&[10], Kind::Float),
            t(&[3], Kind::Int64),
        ];
        let plan = plan_buckets(&ts, 600);
        assert_eq!(plan, vec![vec![4], vec![3], vec![2], vec![1, 0]]);
        // Everything fits: one bucket per kind.
        assert_eq!(plan_buckets(&ts, 1 << 20), vec![vec![4], vec![3, 2, 1, 0]]);
        // Each index exactly once, whatever the cap.
        for cap in [0, 1, 40, 400, 1000] {
            let mut all: Vec<usize> = plan_buckets(&ts, cap).concat();
            all.sort();
            assert_eq!(all, vec![0, 1, 2, 3, 4]);
        }
    }
}
