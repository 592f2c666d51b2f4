//! How an epoch's samples are cut into batches, and a global batch into the data-parallel
//! replicas' parts: one definition for the worker, which trains on them, and `sweep plan`,
//! which prices what the feature cache saves.

use std::ops::Range;

/// The batches of an epoch of `n` samples taken in order, `size` at a time, as index ranges:
/// consecutive, the last one shorter — except that a trailing single sample joins the batch
/// before it (BatchNorm in training mode cannot normalise one sample).
pub fn batch_ranges(n: usize, size: usize) -> Vec<Range<usize>> {
    let size = size.max(1);
    let mut out: Vec<Range<usize>> = (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect();
    if out.len() >= 2 && out[out.len() - 1].len() == 1 {
        out.pop();
        if let Some(last) = out.last_mut() {
            last.end = n;
        }
    }
    out
}

/// The lengths of [`batch_ranges`]`(n, size)`, each with how many batches have it (at most two
/// lengths), without listing the batches.
fn batch_sizes(n: usize, size: usize) -> Vec<(usize, usize)> {
    let size = size.max(1);
    let (full, rest) = (n / size, n % size);
    let merged = |full: usize| [(size, full - 1), (size + 1, 1)].into_iter().filter(|&(_, c)| c > 0).collect();
    match (full, rest) {
        (0, 0) => vec![],
        (0, _) => vec![(rest, 1)],
        // Batches of one: the last one joins the one before.
        (2.., 0) if size == 1 => merged(full - 1),
        (_, 0) => vec![(size, full)],
        // A trailing single sample joins the last full batch.
        (_, 1) => merged(full),
        _ => vec![(size, full), (rest, 1)],
    }
}

/// The parts of a global batch of `len` samples that `world` replicas train on, in rank
/// order: contiguous, sizes differing by at most one, and never a single sample (BatchNorm in
/// training mode cannot normalise one). So when `len < 2 · world` only `max(1, len / 2)`
/// replicas get samples and the others an empty part (`len..len`); with one replica the part
/// is the whole batch.
pub fn shard_ranges(len: usize, world: usize) -> Vec<Range<usize>> {
    let world = world.max(1);
    let used = if len >= 2 * world { world } else { (len / 2).max(1) };
    let mut out = split_evenly(len, used);
    out.resize(world, len..len);
    out
}

/// `len` items cut into `parts` contiguous ranges in order, sizes differing by at most one
/// (the first `len % parts` one larger). How validation, and the feature cache's pass over the
/// training set, are shared between replicas.
pub fn split_evenly(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// The batch size a feature cache computes the training features in, for an epoch of `n`
/// samples in global batches of `batch × world` split between `world` replicas: the part size
/// that covers the most samples of an epoch (the larger on a tie). A sample's features depend
/// on the size of the batch they are computed in, so only parts of this size read the cache;
/// every epoch has the same sizes. `None` when there is nothing to train on.
pub fn feature_cache_batch(n: usize, batch: usize, world: usize) -> Option<CacheBatch> {
    let mut covered: Vec<(usize, usize)> = Vec::new();
    for (len, count) in batch_sizes(n, batch.max(1).saturating_mul(world.max(1))) {
        for part in shard_ranges(len, world) {
            if part.is_empty() {
                continue;
            }
            let samples = part.len().saturating_mul(count);
            match covered.iter_mut().find(|(size, _)| *size == part.len()) {
                Some((_, s)) => *s += samples,
                None => covered.push((part.len(), samples)),
            }
        }
    }
    covered
        .into_iter()
        .max_by_key(|&(size, samples)| (samples, size))
        .map(|(size, samples)| CacheBatch { size, read: samples })
}

/// What [`feature_cache_batch`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheBatch {
    /// The batch size of the cached features.
    pub size: usize,
    /// Samples of an epoch whose features are read from the cache (over every replica); the
    /// others' are computed afresh each epoch.
    pub read: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_merge_a_trailing_single_sample() {
        let lens = |n, s| batch_ranges(n, s).iter().map(|r| r.len()).collect::<Vec<_>>();
        assert_eq!(lens(10, 4), [4, 4, 2]);
        assert_eq!(lens(9, 4), [4, 5]);
        assert_eq!(lens(5, 4), [5]);
        assert_eq!(lens(1, 4), [1]);
        assert_eq!(lens(0, 4), Vec::<usize>::new());
        assert_eq!(lens(3, 10), [3]);
        assert_eq!(batch_ranges(9, 4), [0..4, 4..9]);
    }

    #[test]
    fn batch_sizes_count_what_batch_ranges_lists() {
        for n in 0..60 {
            for size in 1..12 {
                let mut want: Vec<(usize, usize)> = Vec::new();
                for r in batch_ranges(n, size) {
                    match want.iter_mut().find(|(l, _)| *l == r.len()) {
                        Some((_, c)) => *c += 1,
                        None => want.push((r.len(), 1)),
                    }
                }
                assert_eq!(batch_sizes(n, size), want, "{n} in batches of {size}");
            }
        }
        // Large sets are counted, not listed.
        // (1,024 replicas of 1: parts of 2 on half of them, never a single sample.)
        assert_eq!(feature_cache_batch(1 << 40, 1, 1024), Some(CacheBatch { size: 2, read: 1 << 40 }));
    }

    #[test]
    fn parts_are_even_and_never_one_sample() {
        assert_eq!(shard_ranges(8, 2), [0..4, 4..8]);
        assert_eq!(shard_ranges(7, 3), [0..3, 3..5, 5..7]);
        assert_eq!(shard_ranges(3, 2), [0..3, 3..3]);
        assert_eq!(shard_ranges(2, 3), [0..2, 2..2, 2..2]);
        assert_eq!(split_evenly(20, 3), [0..7, 7..14, 14..20]);
        assert_eq!(split_evenly(2, 3), [0..1, 1..2, 2..2]);
    }

    #[test]
    fn the_cache_takes_the_part_size_that_covers_the_most_samples() {
        let cb = |n, b, w| feature_cache_batch(n, b, w).map(|c| (c.size, c.read));
        // One replica: the batch size, or the whole set in one batch (a trailing single
        // sample merged).
        assert_eq!(cb(20, 6, 1), Some((6, 18)));
        assert_eq!(cb(20, 5, 1), Some((5, 20)));
        assert_eq!(cb(7, 6, 1), Some((7, 7)));
        assert_eq!(cb(4, 16, 1), Some((4, 4)));
        // Two replicas of 4: global batches 8, 8, 4 → parts 4, 4, 4, 4, 2, 2.
        assert_eq!(cb(20, 4, 2), Some((4, 16)));
        // Three of 3: 9, 9, 2 → parts of 3 (six) and one of 2.
        assert_eq!(cb(20, 3, 3), Some((3, 18)));
        // One global batch of 21 on two replicas of 16: parts of 11 and 10.
        assert_eq!(cb(21, 16, 2), Some((11, 11)));
        // 240 in global batches of 32: seven of 32 (parts of 16), one of 16 (parts of 8).
        assert_eq!(cb(240, 16, 2), Some((16, 224)));
        assert_eq!(cb(0, 4, 2), None);
    }
}
