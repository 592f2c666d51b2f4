//! A small, seedable, platform-independent random number generator.
//!
//! Every random choice of a trial — weight initialisation, data order, augmentation, dropout
//! masks, synthetic images — comes from this generator rather than from libtorch's global one.
//! libtorch's generator is process-wide: two trials (or two test threads) in one process would
//! interleave their draws and lose determinism. Each consumer here derives its own stream from
//! the trial seed and a label (`Rng::derive(seed, &[STREAM_SHUFFLE, epoch])`), so a stream's
//! values never depend on what other code drew before it.
//!
//! The generator is xoshiro256++ seeded through SplitMix64 (both by Blackman and Vigna); the
//! output is identical on every platform.

/// Stream label: weight initialisation of a model.
pub const STREAM_INIT: u64 = 0x696e_6974; // "init"
/// Stream label: the training-set permutation of an epoch.
pub const STREAM_SHUFFLE: u64 = 0x7368_7566; // "shuf"
/// Stream label: augmentation parameters of an epoch.
pub const STREAM_AUGMENT: u64 = 0x6175_676d; // "augm"
/// Stream label: dropout masks of an epoch.
pub const STREAM_DROPOUT: u64 = 0x6472_6f70; // "drop"
/// Stream label: synthetic dataset images.
pub const STREAM_SYNTHETIC: u64 = 0x7379_6e74; // "synt"

/// SplitMix64 step: a strong 64-bit mixer, used for seeding and stream derivation.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Start of the tail of the 128-layer normal ziggurat.
const ZIGGURAT_R: f64 = 3.442_619_855_899;

/// Tables of the 128-layer ziggurat for the standard normal density `exp(-x²/2)`.
struct Ziggurat {
    k: [u32; 128],
    w: [f64; 128],
    f: [f64; 128],
}

fn ziggurat() -> &'static Ziggurat {
    static TABLES: std::sync::OnceLock<Ziggurat> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        // Marsaglia & Tsang (2000), "The Ziggurat Method for Generating Random Variables".
        let m1 = 2_147_483_648.0f64;
        let v = 9.912_563_035_262_17e-3;
        let mut dn = ZIGGURAT_R;
        let mut tn = dn;
        let q = v / (-0.5 * dn * dn).exp();
        let mut z = Ziggurat { k: [0; 128], w: [0.0; 128], f: [0.0; 128] };
        z.k[0] = ((dn / q) * m1) as u32;
        z.k[1] = 0;
        z.w[0] = q / m1;
        z.w[127] = dn / m1;
        z.f[0] = 1.0;
        z.f[127] = (-0.5 * dn * dn).exp();
        for i in (1..=126).rev() {
            dn = (-2.0 * (v / dn + (-0.5 * dn * dn).exp()).ln()).sqrt();
            z.k[i + 1] = ((dn / tn) * m1) as u32;
            tn = dn;
            z.f[i] = (-0.5 * dn * dn).exp();
            z.w[i] = dn / m1;
        }
        z
    })
}

/// xoshiro256++: fast, 256 bits of state, passes BigCrush. Not cryptographic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded from one 64-bit seed.
    pub fn new(seed: u64) -> Rng {
        let mut sm = seed;
        let s = [splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm), splitmix64(&mut sm)];
        Rng { s }
    }

    /// An independent stream for `seed` and a path of labels (`&[STREAM_SHUFFLE, epoch]`).
    /// Different paths give unrelated streams; the same path always gives the same one.
    pub fn derive(seed: u64, path: &[u64]) -> Rng {
        let mut h = seed;
        let mut acc = splitmix64(&mut h);
        for &p in path {
            let mut x = acc ^ p.wrapping_mul(0xd605_bbb5_8c8a_bbbd);
            acc = splitmix64(&mut x);
        }
        Rng::new(acc)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `[0, 1)` as `f32` (24 bits).
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform integer in `[0, n)` without modulo bias (Lemire's method); 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// True with probability `p`.
    pub fn bernoulli(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Uniform in `(0, 1]` (safe to take the logarithm of).
    fn uniform_open0(&mut self) -> f64 {
        1.0 - self.uniform()
    }

    /// One standard normal value (Marsaglia and Tsang's ziggurat, 128 layers; a few
    /// nanoseconds per value, which matters when initialising 138 M weights).
    pub fn normal(&mut self) -> f64 {
        let z = ziggurat();
        loop {
            let hz = self.next_u64() as u32 as i32;
            let iz = (hz & 127) as usize;
            if hz.unsigned_abs() < z.k[iz] {
                return hz as f64 * z.w[iz];
            }
            // Slow path (about 1.2% of draws).
            let x = hz as f64 * z.w[iz];
            if iz == 0 {
                // The tail beyond R.
                loop {
                    let x = -self.uniform_open0().ln() / ZIGGURAT_R;
                    let y = -self.uniform_open0().ln();
                    if y + y >= x * x {
                        return if hz > 0 { ZIGGURAT_R + x } else { -ZIGGURAT_R - x };
                    }
                }
            }
            if z.f[iz] + self.uniform() * (z.f[iz - 1] - z.f[iz]) < (-0.5 * x * x).exp() {
                return x;
            }
        }
    }

    /// Shuffles `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut v: Vec<i64> = (0..n as i64).collect();
        self.shuffle(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_streams_differ() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::derive(7, &[STREAM_SHUFFLE, 1]);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::derive(7, &[STREAM_SHUFFLE, 1]);
        let b: Vec<u64> = (0..5).map(|_| r.next_u64()).collect();
        assert_eq!(a, b);
        let mut other = Rng::derive(7, &[STREAM_SHUFFLE, 2]);
        assert_ne!(a[0], other.next_u64());
        let mut other = Rng::derive(8, &[STREAM_SHUFFLE, 1]);
        assert_ne!(a[0], other.next_u64());
    }

    #[test]
    fn distributions_are_sane() {
        let mut r = Rng::new(1);
        let n = 100_000;
        let (mut sum, mut sum2) = (0.0, 0.0);
        let mut tail = 0;
        let mut sum4 = 0.0;
        for _ in 0..n {
            let a = r.normal();
            sum += a;
            sum2 += a * a;
            sum4 += a * a * a * a;
            tail += (a.abs() > 3.0) as usize;
        }
        let mean = sum / n as f64;
        let var = sum2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!((sum4 / n as f64 - 3.0).abs() < 0.1, "kurtosis {}", sum4 / n as f64);
        // P(|x| > 3) = 0.0027.
        assert!((200..340).contains(&tail), "tail {tail}");
        let u: f64 = (0..n).map(|_| r.uniform()).sum::<f64>() / n as f64;
        assert!((u - 0.5).abs() < 0.01);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[r.below(3) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(3).permutation(100);
        assert_ne!(p, (0..100).collect::<Vec<i64>>());
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<i64>>());
    }
}
