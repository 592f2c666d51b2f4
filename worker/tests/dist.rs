//! The collectives of data-parallel training on the in-process CPU backend: exact,
//! deterministic sums, broadcasts, buckets, aborts; and what the NCCL backend says on a machine
//! without it.

use std::sync::mpsc;
use std::time::Duration;

use sweep_worker::dist::bucket::{flatten, plan_buckets, unflatten_into};
use sweep_worker::dist::{
    self, AllReduce, Backend, DistError, all_reduce_gradients, all_reduce_tensors, broadcast_tensors, cpu,
};
use sweep_worker::rng::Rng;
use tch::{Device, Kind, Tensor};

/// Runs `f(rank, comm)` on one thread per rank of a CPU group of `world`, and returns the
/// results in rank order; fails the test if a rank takes longer than a minute (a hang).
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &mut cpu::CpuComm) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let (tx, rx) = mpsc::channel();
    for (rank, mut comm) in cpu::group(world).into_iter().enumerate() {
        let (tx, f) = (tx.clone(), f.clone());
        std::thread::spawn(move || {
            let out = f(rank, &mut comm);
            tx.send((rank, out)).unwrap();
        });
    }
    let mut out: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let (rank, v) = rx.recv_timeout(Duration::from_secs(60)).expect("a rank hung");
        out[rank] = Some(v);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Rank `rank`'s input: `numel` values of `kind` from a seeded stream.
fn input(rank: usize, shape: &[i64], kind: Kind) -> Tensor {
    let n: i64 = shape.iter().product();
    let mut r = Rng::derive(7, &[rank as u64, n as u64]);
    let v: Vec<f64> = (0..n).map(|_| (r.normal() * 1000.0).round() / 7.0).collect();
    Tensor::from_slice(&v).to_kind(kind).view(shape)
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

#[test]
fn cpu_all_reduce_is_the_rank_ordered_sum_on_every_rank() {
    let _bound = sweep_tests::bound(600);
    let cases: Vec<(Vec<i64>, Kind)> = vec![
        (vec![], Kind::Float),
        (vec![1], Kind::Float),
        (vec![2], Kind::Double),
        (vec![5], Kind::Float),
        (vec![3, 4], Kind::Int64),
        (vec![7, 3, 2], Kind::Float),
        (vec![0], Kind::Float),
    ];
    for world in [1, 2, 3, 4] {
        let results = on_ranks(world, {
            let cases = cases.clone();
            move |rank, comm| {
                cases
                    .iter()
                    .map(|(shape, kind)| {
                        let mut t = input(rank, shape, *kind);
                        comm.all_reduce_sum(&mut t).unwrap();
                        t
                    })
                    .collect::<Vec<_>>()
            }
        });
        for (i, (shape, kind)) in cases.iter().enumerate() {
            let mut want = input(0, shape, *kind);
            for r in 1..world {
                want = &want + input(r, shape, *kind);
            }
            for (rank, got) in results.iter().enumerate() {
                assert!(same_bits(&got[i], &want), "world {world}, rank {rank}, case {shape:?} {kind:?}");
            }
        }
    }
}

#[test]
fn cpu_sums_keep_rank_order_whatever_the_timing() {
    let _bound = sweep_tests::bound(600);
    // In float32, (1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1: the order shows.
    let values = [1e8f32, 1.0, -1e8];
    for trial in 0..5u64 {
        let results = on_ranks(3, move |rank, comm| {
            // Ranks arrive in a different order each time.
            let mut r = Rng::derive(trial, &[rank as u64]);
            std::thread::sleep(Duration::from_millis(r.below(20)));
            let mut t = Tensor::from_slice(&[values[rank], values[rank] * 0.5]);
            comm.all_reduce_sum(&mut t).unwrap();
            Vec::<f32>::try_from(&t).unwrap()
        });
        for got in results {
            assert_eq!(got, vec![(1e8f32 + 1.0) - 1e8, (5e7f32 + 0.5) - 5e7]);
        }
    }
}

#[test]
fn cpu_broadcast_copies_the_roots_tensor() {
    let _bound = sweep_tests::bound(600);
    let results = on_ranks(3, |rank, comm| {
        let mut t = input(rank, &[4, 5], Kind::Float);
        comm.broadcast(&mut t, 1).unwrap();
        let mut n = Tensor::from_slice(&[rank as i64 * 10]);
        comm.broadcast(&mut n, 2).unwrap();
        (t, n.int64_value(&[0]))
    });
    for (t, n) in results {
        assert!(same_bits(&t, &input(1, &[4, 5], Kind::Float)));
        assert_eq!(n, 20);
    }
    let e = on_ranks(2, |_, comm| comm.broadcast(&mut Tensor::zeros([1], (Kind::Float, Device::Cpu)), 2));
    assert!(e.iter().all(|r| matches!(r, Err(DistError::Invalid(_)))), "{e:?}");
}

#[test]
fn an_abort_releases_every_waiting_rank() {
    let _bound = sweep_tests::bound(600);
    let results = on_ranks(3, |rank, comm| {
        if rank == 2 {
            // This rank fails instead of joining the collective.
            std::thread::sleep(Duration::from_millis(100));
            comm.abort_handle().abort("rank 2 failed");
            return Err(DistError::Invalid("failed".into()));
        }
        let mut t = Tensor::ones([3], (Kind::Float, Device::Cpu));
        comm.all_reduce_sum(&mut t)?;
        Ok(())
    });
    assert_eq!(results[0], Err(DistError::Aborted("rank 2 failed".into())));
    assert_eq!(results[1], Err(DistError::Aborted("rank 2 failed".into())));
    // Later collectives fail at once.
    let later = on_ranks(2, |_, comm| {
        comm.abort_handle().abort("stop");
        comm.barrier()
    });
    assert!(later.iter().all(|r| *r == Err(DistError::Aborted("stop".into()))));
}

#[test]
fn mismatched_tensors_are_refused_without_hanging() {
    let _bound = sweep_tests::bound(600);
    let results = on_ranks(3, |rank, comm| {
        let mut t = Tensor::ones([2 + i64::from(rank == 1)], (Kind::Float, Device::Cpu));
        comm.all_reduce_sum(&mut t)
    });
    for r in results {
        let e = r.unwrap_err();
        assert!(matches!(e, DistError::Invalid(_) | DistError::Aborted(_)), "{e:?}");
        assert!(e.to_string().contains("rank 1 passed 3"), "{e}");
    }
}

#[test]
fn buckets_flatten_and_unflatten_mixed_shapes_exactly() {
    let _bound = sweep_tests::bound(600);
    let shapes: [&[i64]; 5] = [&[], &[3], &[2, 3, 4], &[1, 1], &[5, 1, 2]];
    let tensors: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| input(i, s, Kind::Float)).collect();
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let flat = flatten(&refs).unwrap();
    assert_eq!(flat.size(), vec![1 + 3 + 24 + 1 + 10]);
    let copies: Vec<Tensor> = tensors.iter().map(|t| t.zeros_like()).collect();
    let copy_refs: Vec<&Tensor> = copies.iter().collect();
    unflatten_into(&flat, &copy_refs).unwrap();
    for (a, b) in tensors.iter().zip(&copies) {
        assert!(same_bits(a, b));
    }
    // A non-contiguous tensor flattens by value and is written back in place.
    let t = input(9, &[4, 3], Kind::Float).transpose(0, 1);
    let flat = flatten(&[&t]).unwrap();
    assert!(same_bits(&flat, &t.contiguous().view([-1])));
    let target = Tensor::zeros([4, 3], (Kind::Float, Device::Cpu)).transpose(0, 1);
    unflatten_into(&flat, &[&target]).unwrap();
    assert!(same_bits(&target, &t));
    assert!(unflatten_into(&flat, &[&Tensor::zeros([5], (Kind::Float, Device::Cpu))]).is_err());
}

#[test]
fn bucketed_all_reduce_and_broadcast_cover_every_tensor() {
    let _bound = sweep_tests::bound(600);
    let shapes: Vec<(Vec<i64>, Kind)> = vec![
        (vec![100], Kind::Float),
        (vec![3, 3], Kind::Double),
        (vec![], Kind::Int64),
        (vec![50, 4], Kind::Float),
        (vec![7], Kind::Float),
        (vec![2, 2], Kind::Int64),
    ];
    // A 256-byte cap makes several buckets, some with one tensor, some with several.
    let plan = plan_buckets(&shapes.iter().map(|(s, k)| input(0, s, *k)).collect::<Vec<_>>(), 256);
    assert!(plan.len() >= 4 && plan.iter().any(|b| b.len() > 1), "{plan:?}");
    let results = on_ranks(3, {
        let shapes = shapes.clone();
        move |rank, comm| {
            let ts: Vec<Tensor> = shapes.iter().map(|(s, k)| input(rank, s, *k)).collect();
            all_reduce_tensors(comm, &ts, 256).unwrap();
            let bs: Vec<Tensor> = shapes.iter().map(|(s, k)| input(rank + 10, s, *k)).collect();
            broadcast_tensors(comm, &bs, 0, 256).unwrap();
            (ts, bs)
        }
    });
    for (ts, bs) in results {
        for (i, (s, k)) in shapes.iter().enumerate() {
            let want = input(0, s, *k) + input(1, s, *k) + input(2, s, *k);
            assert!(same_bits(&ts[i], &want), "tensor {i}");
            assert!(same_bits(&bs[i], &input(10, s, *k)), "broadcast {i}");
        }
    }
}

#[test]
fn gradients_are_summed_and_a_rank_without_data_contributes_zeros() {
    let _bound = sweep_tests::bound(600);
    let results = on_ranks(3, |rank, comm| {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let frozen = Tensor::from_slice(&[9.0f32]);
        if rank != 2 {
            // Rank 2's shard is empty: no backward pass, no gradient.
            let loss = (&w * (rank as f64 + 1.0)).sum(Kind::Float) + &b * 2.0;
            loss.sum(Kind::Float).backward();
        }
        let params = [w.shallow_clone(), b.shallow_clone(), frozen.shallow_clone()];
        all_reduce_gradients(comm, &params, 1 << 20).unwrap();
        (Vec::<f32>::try_from(&w.grad()).unwrap(), Vec::<f32>::try_from(&b.grad()).unwrap(), frozen.grad().defined())
    });
    for (w, b, frozen_has_grad) in results {
        assert_eq!(w, vec![3.0, 3.0, 3.0]);
        assert_eq!(b, vec![4.0]);
        assert!(!frozen_has_grad, "a parameter that needs no gradient takes no part");
    }
}

#[test]
fn the_check_passes_on_cpu_replicas() {
    let _bound = sweep_tests::bound(600);
    let r = dist::check::allreduce_check(&[Device::Cpu, Device::Cpu, Device::Cpu], 1).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!((r.backend.as_str(), r.world_size), ("cpu", 3));
    assert_eq!(r.devices, ["cpu", "cpu", "cpu"]);
    assert!(r.buckets >= 2 && r.bytes > dist::BUCKET_BYTES as u64, "{r:?}");
    assert_eq!((r.max_abs_error, r.broadcast_max_abs_error), (0.0, 0.0));
    assert!(r.seconds > 0.0 && r.nccl_library.is_none());
    let one = dist::check::allreduce_check(&[Device::Cpu], 0).unwrap();
    assert!(one.ok && one.world_size == 1);
}

#[test]
fn cuda_groups_say_why_they_cannot_be_built_here() {
    let _bound = sweep_tests::bound(600);
    let probe = dist::nccl::probe();
    assert_eq!(dist::backend_for(&[Device::Cuda(0), Device::Cuda(1)]), Ok(Backend::Nccl));
    let cuda = tch::Cuda::device_count();
    if cuda >= 1 && probe.found {
        // A GPU machine with NCCL: the check itself is the test (scripts/gpu-check.sh).
        return;
    }
    let e = match dist::group(&[Device::Cuda(0)]) {
        Ok(_) => panic!("an NCCL group without NCCL or CUDA"),
        Err(e) => e,
    };
    assert!(matches!(e, DistError::Unavailable(_)), "{e:?}");
    let text = e.to_string();
    if !probe.found {
        assert!(text.contains("NCCL is not available") && text.contains("libnccl.so.2"), "{text}");
    } else {
        assert!(text.contains("cuda:0"), "{text}");
    }
    assert!(dist::check::allreduce_check_visible(1).is_err() || cuda > 0);
}
