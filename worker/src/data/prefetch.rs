//! Training batches assembled ahead of the model.
//!
//! [`TrainBatches`] yields the batches of one training pass in order: for each list of sample
//! indices it gathers the uint8 images and labels from the cached split on the training device,
//! then augments and normalises the images ([`augment::train_batch`]). With a prefetch depth of
//! at least 1 a background thread produces the batches into a bounded channel, so batch `i + 1`
//! is assembled while the model trains on batch `i`; with depth 0 they are produced inline, on
//! demand.
//!
//! **Determinism.** The producer is the only user of the pass's augmentation stream and draws
//! from it batch after batch in order, so the parameters of every sample — and on CPU every
//! byte of every batch — are the same whatever the depth and however the two threads are
//! scheduled. libtorch's intra-op thread count is process-wide and the producer thread takes the
//! same count, so its reductions split work exactly as the trainer thread's would.
//!
//! **CPU.** The producer runs concurrently with the forward and backward passes. It augments with
//! the CPU kernel ([`augment::cpu`]) on its own thread only: the model's step has libtorch's
//! intra-op threads on every core, and more threads would preempt them at the points where they
//! wait for each other (measured: resnet50 epochs 5–15 % slower with the kernel on two rayon
//! threads beside two libtorch threads on two cores). Inline, the kernel uses rayon's pool.
//! The channel bound keeps at most `depth` finished batches waiting (plus one being assembled),
//! bounding memory.
//!
//! **CUDA.** Operations only enqueue kernels; both threads use the device's default stream, so
//! the producer's kernels and the model's run in the order they were enqueued and no event is
//! needed between them. What the thread buys is the host side: every small host-to-device copy
//! of a batch (its indices, the augmentation parameters) synchronises the stream, which inline
//! would stall the trainer's kernel launches once per copy; in the producer thread the trainer
//! keeps enqueueing while the producer waits.
//!
//! **Data parallel.** A replica's batches are [`Shard`]s: its contiguous part of each global
//! batch. The producer still draws the parameters of *every* sample of the global batch, in
//! order, and keeps those of its part, so each replica's stream stays in step with the others'
//! and a sample gets the same augmentation whatever the number of replicas. A replica whose
//! part of a (short, last) global batch is empty gets an empty [`Batch`] (`len` 0).
//!
//! Dropping a [`TrainBatches`] early (an error, a cancelled trial) closes the channel and joins
//! the producer, which stops after the batch it is assembling.

use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use sweep_core::spec::Augment;
use tch::{TchError, Tensor};

use crate::augment::{self, SampleParams};
use crate::rng::Rng;

/// Environment variable overriding the prefetch depth of training passes (`0` produces
/// batches inline, without a thread).
pub const PREFETCH_ENV: &str = "SWEEP_PREFETCH";

/// Default number of finished batches the producer may keep ahead of the model.
pub const DEFAULT_PREFETCH_DEPTH: usize = 1;

/// The prefetch depth of training passes: [`PREFETCH_ENV`] when it holds a number, else
/// [`DEFAULT_PREFETCH_DEPTH`].
pub fn prefetch_depth() -> usize {
    std::env::var(PREFETCH_ENV).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_PREFETCH_DEPTH)
}

/// One training batch, ready for the model.
#[derive(Debug)]
pub struct Batch {
    /// Augmented, normalised float images `[N, 3, S, S]` on the training device.
    pub images: Tensor,
    /// Class indices `[N]` (int64) on the training device.
    pub labels: Tensor,
    /// `N` (0 for a replica whose shard of a short global batch is empty).
    pub len: usize,
    /// Samples in the whole global batch this one is a shard of (`len` without data
    /// parallelism).
    pub global_len: usize,
}

/// One replica's part of one global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Sample indices of the whole global batch, in order.
    pub global: Vec<i64>,
    /// The replica's contiguous part of `global`.
    pub part: Range<usize>,
}

impl Shard {
    /// The whole batch `indices` (one replica).
    pub fn whole(indices: Vec<i64>) -> Shard {
        let part = 0..indices.len();
        Shard { global: indices, part }
    }
}

/// Assembles batches from the cached split, in order.
struct Producer {
    images: Tensor,
    labels: Tensor,
    augment: Augment,
    rng: Rng,
    batches: std::vec::IntoIter<Shard>,
    /// Inline: the CPU augmentation may use every core (the model waits for the batch). In the
    /// prefetch thread it runs on that thread alone, beside the model's step.
    parallel: bool,
}

impl Producer {
    fn next_batch(&mut self) -> Option<Result<Batch, TchError>> {
        let shard = self.batches.next()?;
        // Every sample of the global batch draws its parameters, in order.
        let params: Vec<SampleParams> =
            shard.global.iter().map(|_| SampleParams::draw(&self.augment, &mut self.rng)).collect();
        let make = || -> Result<Batch, TchError> {
            let global_len = shard.global.len();
            let part = shard.part.start.min(global_len)..shard.part.end.min(global_len);
            let idx = &shard.global[part.clone()];
            let device = self.images.device();
            if idx.is_empty() {
                let mut shape = self.images.size();
                if let Some(first) = shape.first_mut() {
                    *first = 0;
                }
                let images = Tensor::f_zeros(shape.as_slice(), (tch::Kind::Float, device))?;
                let labels = Tensor::f_zeros([0], (tch::Kind::Int64, device))?;
                return Ok(Batch { images, labels, len: 0, global_len });
            }
            let t = Tensor::f_from_slice(idx)?.f_to_device(device)?;
            let x = self.images.f_index_select(0, &t)?;
            let labels = self.labels.f_index_select(0, &t)?;
            let images = augment::train_batch_on(&x, &self.augment, &params[part], self.parallel)?;
            Ok(Batch { images, labels, len: idx.len(), global_len })
        };
        Some(tch::no_grad(make))
    }
}

enum Source {
    Inline(Producer),
    Thread { rx: Option<Receiver<Result<Batch, TchError>>>, handle: Option<JoinHandle<()>> },
}

/// The batches of one training pass, in order (an iterator of `Result<Batch, TchError>`); see
/// the module documentation. After an error it yields nothing more.
pub struct TrainBatches {
    source: Source,
    remaining: usize,
}

impl std::fmt::Debug for TrainBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.source {
            Source::Inline(_) => "inline",
            Source::Thread { .. } => "thread",
        };
        f.debug_struct("TrainBatches").field("mode", &mode).field("remaining", &self.remaining).finish()
    }
}

impl TrainBatches {
    /// The batches `batches` (lists of indices into `images` / `labels`) of a pass: `images`
    /// is the uint8 `[N, 3, S, S]` split and `labels` its int64 `[N]` labels, both on the
    /// training device; `rng` is the pass's augmentation stream. `depth` 0 produces inline;
    /// otherwise a thread keeps up to `depth` batches ready.
    pub fn new(
        images: &Tensor,
        labels: &Tensor,
        batches: Vec<Vec<i64>>,
        augment: Augment,
        rng: Rng,
        depth: usize,
    ) -> TrainBatches {
        TrainBatches::sharded(images, labels, batches.into_iter().map(Shard::whole).collect(), augment, rng, depth)
    }

    /// The batches of one replica of a data-parallel pass: for each global batch, its part
    /// `shard.part` (see the module documentation). [`TrainBatches::new`] is this with whole
    /// batches.
    pub fn sharded(
        images: &Tensor,
        labels: &Tensor,
        batches: Vec<Shard>,
        augment: Augment,
        rng: Rng,
        depth: usize,
    ) -> TrainBatches {
        let remaining = batches.len();
        let make = |batches: Vec<Shard>, rng: Rng, parallel: bool| Producer {
            images: images.shallow_clone(),
            labels: labels.shallow_clone(),
            augment,
            rng,
            batches: batches.into_iter(),
            parallel,
        };
        if depth == 0 || remaining <= 1 {
            return TrainBatches { source: Source::Inline(make(batches, rng, true)), remaining };
        }
        let (tx, rx) = sync_channel(depth);
        let producer = make(batches.clone(), rng.clone(), false);
        match std::thread::Builder::new().name("sweep-prefetch".into()).spawn(move || produce(producer, tx)) {
            Ok(handle) => TrainBatches { source: Source::Thread { rx: Some(rx), handle: Some(handle) }, remaining },
            Err(e) => {
                // Same batches, same stream: only the overlap is lost.
                tracing::warn!(error = %e, "cannot start the batch prefetch thread; producing batches inline");
                TrainBatches { source: Source::Inline(make(batches, rng, true)), remaining }
            }
        }
    }

    /// Batches not yet yielded.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// True when batches are produced by a background thread.
    pub fn is_prefetching(&self) -> bool {
        matches!(self.source, Source::Thread { .. })
    }
}

fn produce(mut producer: Producer, tx: SyncSender<Result<Batch, TchError>>) {
    while let Some(batch) = producer.next_batch() {
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

impl Iterator for TrainBatches {
    type Item = Result<Batch, TchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let item = match &mut self.source {
            Source::Inline(p) => p.next_batch()?,
            Source::Thread { rx, handle } => match rx.as_ref().map(|rx| rx.recv()) {
                Some(Ok(item)) => item,
                // The producer ended before its last batch: it panicked (otherwise it only ends
                // early after sending an error, which ends this pass).
                _ => {
                    let why = match handle.take().map(|h| h.join()) {
                        Some(Err(panic)) => panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a panic".into()),
                        _ => "it stopped early".into(),
                    };
                    Err(TchError::Torch(format!("batch prefetch thread: {why}")))
                }
            },
        };
        self.remaining = if item.is_err() { 0 } else { self.remaining - 1 };
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining))
    }
}

impl Drop for TrainBatches {
    fn drop(&mut self) {
        if let Source::Thread { rx, handle } = &mut self.source {
            // Closing the channel first makes a producer blocked on a full channel return.
            drop(rx.take());
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}
