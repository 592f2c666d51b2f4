//! The training augmentation of [`super`], fused for the CPU: one pass per sample from the uint8
//! cache to the normalised float batch, instead of a dozen full-batch tensor operations.
//!
//! It computes what [`super::apply`] and [`super::normalize`] compute, with the same formulas in
//! the same order: bilinear sampling of the affine warp at the same source coordinates (the
//! base grid of `affine_grid` with `align_corners = false`, zeros outside), then brightness,
//! contrast with the sample's mean grey level, saturation, each clamped to `[0, 1]`, then the
//! ImageNet normalisation. Rounding differs in places: the warp's source coordinates are
//! computed in f32 by other operations than `affine_grid`'s matrix product (both paths are about
//! 1e-4 from an f64 computation at 224 px, and up to 5e-4 from each other after normalisation
//! in the worst cases, where a grey level is 0.017; about 1e-5 on average), a warped pixel is the
//! weighted sum of its four bytes times 1 / 255, and the mean grey level is summed in runs of
//! f32 into f64. So CPU training batches are not bit-identical to the tensor path's (which CUDA
//! devices use): `stages::TRAINING_VERSION`, which the pretraining cache's key also holds, rose
//! to 2 with this kernel. Without a warp or jitter it is the tensor path bit for bit
//! (`x / 255`, then `(x - mean) / std`), which keeps validation batches as they were.
//!
//! Each sample is computed by itself, in a fixed order, so a sample's pixels do not depend on
//! the batch it is in, on the number of threads, or on the number of data-parallel replicas.
//! Samples run in parallel on rayon's pool, or one after the other on the calling thread
//! ([`batch_on`]; training's prefetch thread, beside the model's step). On x86-64 a bilinear tap reads the three channels
//! with one SSE2 vector operation, each lane computing what the scalar code (other CPUs) does,
//! so every CPU gives the same bits (tested).

use rayon::prelude::*;
use sweep_core::spec::Augment;
use tch::{Device, Kind, TchError, Tensor};

use super::{IMAGENET_MEAN, IMAGENET_STD, SampleParams};

/// Whether [`batch`] handles `images`: a uint8 `[N, 3, H, W]` batch on the CPU, stored as its
/// values (not a lazily negated view). Anything else takes the tensor operations.
pub fn applies(images: &Tensor) -> bool {
    images.device() == Device::Cpu
        && images.kind() == Kind::Uint8
        && images.dim() == 4
        && images.size()[1] == 3
        && !images.is_neg()
}

/// The augmented, normalised float batch of the uint8 `[N, 3, H, W]` CPU batch `images` with one
/// parameter set per sample; `aug`'s disabled steps are skipped, as in [`super::apply`]. The
/// samples are spread over rayon's pool.
pub fn batch(images: &Tensor, aug: &Augment, params: &[SampleParams]) -> Result<Tensor, TchError> {
    batch_on(images, aug, params, true)
}

/// [`batch`], its samples spread over rayon's pool when `parallel`, else computed one after the
/// other on the calling thread (as the prefetch thread does while the model's step has the
/// cores: more threads would preempt libtorch's, which wait for each other at every operation).
/// The same bits either way.
pub fn batch_on(images: &Tensor, aug: &Augment, params: &[SampleParams], parallel: bool) -> Result<Tensor, TchError> {
    let size = images.size();
    if !applies(images) || size[1] != 3 || size[0] != params.len() as i64 {
        return Err(TchError::Shape(format!(
            "augment (CPU): a {:?} batch of shape {size:?} on {:?} with {} parameter sets (want uint8 [N, 3, H, W] on the CPU)",
            images.kind(),
            images.device(),
            params.len()
        )));
    }
    let (h, w) = (size[2] as usize, size[3] as usize);
    let plane = h * w;
    let input = images.f_contiguous()?;
    let output = Tensor::f_empty(size.as_slice(), (Kind::Float, Device::Cpu))?;
    if plane == 0 || params.is_empty() {
        return Ok(output);
    }
    let numel = params.len() * 3 * plane;
    // SAFETY: `input` is a contiguous uint8 CPU tensor of `numel` elements that this function
    // holds (and does not modify) until it returns; `output` is a contiguous float CPU tensor of
    // `numel` elements that it created and nothing else can reach before it returns it.
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts(input.data_ptr() as *const u8, numel),
            std::slice::from_raw_parts_mut(output.data_ptr() as *mut f32, numel),
        )
    };
    let grid = BaseGrid::new(h, w);
    let one = |((out, img), p): ((&mut [f32], &[u8]), &SampleParams)| sample(img, out, h, w, &grid, aug, p);
    if parallel {
        dst.par_chunks_mut(3 * plane).zip(src.par_chunks(3 * plane)).zip(params.par_iter()).for_each(one);
    } else {
        dst.chunks_mut(3 * plane).zip(src.chunks(3 * plane)).zip(params.iter()).for_each(one);
    }
    Ok(output)
}

/// `affine_grid`'s base coordinates with `align_corners = false`: `linspace(-1, 1, n)` (computed
/// from both ends, as ATen does) times `(n - 1) / n`.
struct BaseGrid {
    xs: Vec<f32>,
    ys: Vec<f32>,
}

impl BaseGrid {
    fn new(h: usize, w: usize) -> BaseGrid {
        BaseGrid { xs: base(w), ys: base(h) }
    }
}

fn base(n: usize) -> Vec<f32> {
    if n <= 1 {
        return vec![0.0; n];
    }
    let step = 2.0f32 / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            let v = if i < half { -1.0 + step * i as f32 } else { 1.0 - step * (n - 1 - i) as f32 };
            v * (n - 1) as f32 / n as f32
        })
        .collect()
}

/// One sample: `img` (3 uint8 planes of `h × w`) into `out` (3 float planes).
fn sample(img: &[u8], out: &mut [f32], h: usize, w: usize, grid: &BaseGrid, aug: &Augment, p: &SampleParams) {
    let plane = h * w;
    let jitter = aug.color_jitter > 0.0;
    // The flip first, as the tensor path does it: the (warped) image is the mirrored one's.
    let flip = aug.hflip && p.flip;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let src = [&img[..plane], &img[plane..2 * plane], &img[2 * plane..3 * plane]];
    // Brightness is applied as each pixel is produced, which also sums the grey levels that
    // contrast needs.
    let luma_sum = if aug.rotation_deg > 0.0 || aug.shear_deg > 0.0 {
        // The pixels interleaved (and mirrored), so that one tap reads the three channels at once.
        let mut px = vec![[0u8; 4]; plane];
        for (k, row) in px.chunks_exact_mut(w).enumerate() {
            let from = k * w..(k + 1) * w;
            let (sr, sg, sb) = (&src[0][from.clone()], &src[1][from.clone()], &src[2][from]);
            for (j, q) in row.iter_mut().enumerate() {
                let x = if flip { w - 1 - j } else { j };
                *q = [sr[x], sg[x], sb[x], 0];
            }
        }
        match jitter {
            true => warp::<true>(&px, [r, g, b], w, grid, p),
            false => warp::<false>(&px, [r, g, b], w, grid, p),
        }
    } else {
        match jitter {
            true => copy::<true>(src, [r, g, b], w, flip, p),
            false => copy::<false>(src, [r, g, b], w, flip, p),
        }
    };
    if jitter {
        let mean = (luma_sum / plane as f64) as f32;
        finish_jittered(r, g, b, p, mean);
    } else {
        finish(r, g, b);
    }
}

/// Grey levels are summed in f32 over runs of this many pixels, the runs in f64: the mean that
/// contrast needs stays within 1e-6 of the exact one at any image size.
const LUMA_RUN: usize = 64;

/// Brightness (with colour jitter, `JITTER`), clamped, on a pixel in `[0, 1]`.
#[inline(always)]
fn bright<const JITTER: bool>(v: f32, f: f32) -> f32 {
    if JITTER { unit(v * f) } else { v }
}

/// No warp: the pixels in `[0, 1]` (then brightness); returns the sum of their grey levels when
/// `JITTER`.
fn copy<const JITTER: bool>(src: [&[u8]; 3], out: [&mut [f32]; 3], w: usize, flip: bool, p: &SampleParams) -> f64 {
    let f = p.brightness as f32;
    let [r, g, b] = out;
    let mut sum = 0.0f64;
    for (((r, g), b), k) in
        r.chunks_exact_mut(w).zip(g.chunks_exact_mut(w)).zip(b.chunks_exact_mut(w)).zip((0..).step_by(w))
    {
        let mut row = 0.0f32;
        for j in 0..w {
            if j % LUMA_RUN == 0 {
                sum += std::mem::take(&mut row) as f64;
            }
            let x = k + if flip { w - 1 - j } else { j };
            let (vr, vg, vb) = (
                bright::<JITTER>(src[0][x] as f32 / 255.0, f),
                bright::<JITTER>(src[1][x] as f32 / 255.0, f),
                bright::<JITTER>(src[2][x] as f32 / 255.0, f),
            );
            if JITTER {
                row += luma(vr, vg, vb);
            }
            (r[j], g[j], b[j]) = (vr, vg, vb);
        }
        sum += row as f64;
    }
    sum
}

/// `floor(v)` as an integer, for `|v| ≤ 2^24` (see [`COORD_LIMIT`]).
#[inline(always)]
fn floor_i(v: f32) -> i32 {
    let t = v as i32;
    if (t as f32) > v { t - 1 } else { t }
}

/// Source coordinates are clamped to `±2^24` before their floor is taken: such a coordinate is
/// outside any image either way, and below it `i32` conversions are exact in every code path.
const COORD_LIMIT: f32 = 16_777_216.0;

/// Where one output pixel samples the source: the top-left tap and the four bilinear weights
/// (top-left, top-right, bottom-left, bottom-right).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Tap {
    x0: i32,
    y0: i32,
    weights: [f32; 4],
}

/// The affine map of one output row: source `x = theta0 · x_j + tx`, `y = theta2 · x_j + ty` in
/// normalised coordinates, for a source of `fw × fh` pixels.
#[derive(Debug, Clone, Copy)]
struct RowMap {
    theta0: f32,
    theta2: f32,
    tx: f32,
    ty: f32,
    fw: f32,
    fh: f32,
}

/// The tap of the output pixel at base coordinate `x`, unnormalised as `grid_sample` does
/// (`((g + 1) · size - 1) / 2`).
#[allow(clippy::manual_clamp)] // max then min, as the vector code does it
#[inline(always)]
fn tap_scalar(x: f32, m: &RowMap) -> Tap {
    let gx = m.theta0 * x + m.tx;
    let gy = m.theta2 * x + m.ty;
    let ix = (((gx + 1.0) * m.fw - 1.0) * 0.5).max(-COORD_LIMIT).min(COORD_LIMIT);
    let iy = (((gy + 1.0) * m.fh - 1.0) * 0.5).max(-COORD_LIMIT).min(COORD_LIMIT);
    let (x0, y0) = (floor_i(ix), floor_i(iy));
    let (dx, dy) = (ix - x0 as f32, iy - y0 as f32);
    Tap { x0, y0, weights: [(1.0 - dx) * (1.0 - dy), dx * (1.0 - dy), (1.0 - dx) * dy, dx * dy] }
}

/// The taps of a row's output pixels at base coordinates `xs`. On x86-64, four pixels at a time
/// with SSE2, each lane computing exactly what [`tap_scalar`] does.
fn row_taps(xs: &[f32], m: &RowMap, out: &mut [Tap]) {
    #[cfg(target_arch = "x86_64")]
    let done = row_taps_sse2(xs, m, out);
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (t, &x) in out[done..].iter_mut().zip(&xs[done..]) {
        *t = tap_scalar(x, m);
    }
}

/// [`row_taps`] for the first multiple of four pixels; returns how many it did.
#[cfg(target_arch = "x86_64")]
fn row_taps_sse2(xs: &[f32], m: &RowMap, out: &mut [Tap]) -> usize {
    use std::arch::x86_64::*;
    let n = xs.len().min(out.len()) / 4 * 4;
    // SAFETY: SSE2 is part of the x86-64 baseline; loads and stores go through the arrays below.
    unsafe {
        let (one, half) = (_mm_set1_ps(1.0), _mm_set1_ps(0.5));
        let (lo, hi) = (_mm_set1_ps(-COORD_LIMIT), _mm_set1_ps(COORD_LIMIT));
        let (t0, t2, tx, ty) = (_mm_set1_ps(m.theta0), _mm_set1_ps(m.theta2), _mm_set1_ps(m.tx), _mm_set1_ps(m.ty));
        let (fw, fh) = (_mm_set1_ps(m.fw), _mm_set1_ps(m.fh));
        // floor of |v| ≤ 2^24: truncate, then subtract one where the truncation is above v.
        let floor = |v: __m128| {
            let t = _mm_cvttps_epi32(v);
            _mm_add_epi32(t, _mm_castps_si128(_mm_cmpgt_ps(_mm_cvtepi32_ps(t), v)))
        };
        for (xs, out) in xs[..n].chunks_exact(4).zip(out[..n].chunks_exact_mut(4)) {
            let x = _mm_loadu_ps(xs.as_ptr());
            let gx = _mm_add_ps(_mm_mul_ps(t0, x), tx);
            let gy = _mm_add_ps(_mm_mul_ps(t2, x), ty);
            let ix = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_add_ps(gx, one), fw), one), half);
            let iy = _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(_mm_add_ps(gy, one), fh), one), half);
            let (ix, iy) = (_mm_min_ps(_mm_max_ps(ix, lo), hi), _mm_min_ps(_mm_max_ps(iy, lo), hi));
            let (x0, y0) = (floor(ix), floor(iy));
            let dx = _mm_sub_ps(ix, _mm_cvtepi32_ps(x0));
            let dy = _mm_sub_ps(iy, _mm_cvtepi32_ps(y0));
            let (ex, ey) = (_mm_sub_ps(one, dx), _mm_sub_ps(one, dy));
            let mut x0s = [0i32; 4];
            let mut y0s = [0i32; 4];
            let mut ws = [[0.0f32; 4]; 4];
            _mm_storeu_si128(x0s.as_mut_ptr().cast(), x0);
            _mm_storeu_si128(y0s.as_mut_ptr().cast(), y0);
            _mm_storeu_ps(ws[0].as_mut_ptr(), _mm_mul_ps(ex, ey));
            _mm_storeu_ps(ws[1].as_mut_ptr(), _mm_mul_ps(dx, ey));
            _mm_storeu_ps(ws[2].as_mut_ptr(), _mm_mul_ps(ex, dy));
            _mm_storeu_ps(ws[3].as_mut_ptr(), _mm_mul_ps(dx, dy));
            for (k, t) in out.iter_mut().enumerate() {
                *t = Tap { x0: x0s[k], y0: y0s[k], weights: [ws[0][k], ws[1][k], ws[2][k], ws[3][k]] };
            }
        }
    }
    n
}

/// The affine warp (rotation · x-shear, as [`super::apply`] builds `theta`) with bilinear
/// sampling and zeros outside (then brightness); returns the sum of the grey levels when
/// `JITTER`. Output pixel `(i, j)` samples the source at `theta · (x_j, y_i)` in normalised
/// coordinates.
fn warp<const JITTER: bool>(px: &[[u8; 4]], out: [&mut [f32]; 3], w: usize, grid: &BaseGrid, p: &SampleParams) -> f64 {
    let (s, c) = p.rotation.sin_cos();
    let t = p.shear.tan();
    let theta = [c as f32, (c * t - s) as f32, s as f32, (s * t + c) as f32];
    let h = grid.ys.len();
    let (wi, hi) = (w as i32, h as i32);
    let f = p.brightness as f32;
    let [r, g, b] = out;
    let mut sum = 0.0f64;
    let mut taps = vec![Tap::default(); w];
    let rows = r.chunks_exact_mut(w).zip(g.chunks_exact_mut(w)).zip(b.chunks_exact_mut(w));
    for (((r, g), b), &y) in rows.zip(&grid.ys) {
        let m = RowMap {
            theta0: theta[0],
            theta2: theta[2],
            tx: theta[1] * y,
            ty: theta[3] * y,
            fw: w as f32,
            fh: h as f32,
        };
        row_taps(&grid.xs, &m, &mut taps);
        let mut row = 0.0f32;
        for (j, &Tap { x0, y0, weights }) in taps.iter().enumerate() {
            if j % LUMA_RUN == 0 {
                sum += std::mem::take(&mut row) as f64;
            }
            let v = if x0 >= 0 && y0 >= 0 && x0 + 1 < wi && y0 + 1 < hi {
                interior(px, y0 as usize * w + x0 as usize, w, weights)
            } else if x0 >= -1 && y0 >= -1 && x0 < wi && y0 < hi {
                let mut v = [0.0f32; 4];
                let corners = [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)];
                for (&(xx, yy), &wt) in corners.iter().zip(&weights) {
                    if xx >= 0 && yy >= 0 && xx < wi && yy < hi {
                        let q = px[yy as usize * w + xx as usize];
                        for c in 0..4 {
                            v[c] += wt * q[c] as f32;
                        }
                    }
                }
                v.map(|v| v * INV_255)
            } else {
                [0.0; 4]
            };
            let (vr, vg, vb) = (bright::<JITTER>(v[0], f), bright::<JITTER>(v[1], f), bright::<JITTER>(v[2], f));
            if JITTER {
                row += luma(vr, vg, vb);
            }
            (r[j], g[j], b[j]) = (vr, vg, vb);
        }
        sum += row as f64;
    }
    sum
}

/// `1 / 255`: a warped pixel's weighted byte sum is scaled by it (a multiplication, not a
/// division: its latency was a fifth of the warp's time).
const INV_255: f32 = 1.0 / 255.0;

/// The bilinear sample of the interleaved pixels `px` whose four taps all lie inside the image,
/// the top-left one at `top` in rows of `w`: `Σ weight · byte` over the taps in order, then
/// times 1 / 255, per channel. On x86-64 with SSE2 (every x86-64 CPU), one vector operation per
/// tap for the four channels, each lane computing exactly what [`interior_scalar`] does.
#[inline(always)]
fn interior(px: &[[u8; 4]], top: usize, w: usize, weights: [f32; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        interior_sse2(px, top, w, weights)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        interior_scalar(px, top, w, weights)
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline(always)]
fn interior_scalar(px: &[[u8; 4]], top: usize, w: usize, weights: [f32; 4]) -> [f32; 4] {
    let mut v = [0.0f32; 4];
    for (k, wt) in [top, top + 1, top + w, top + w + 1].into_iter().zip(weights) {
        let q = px[k];
        for c in 0..4 {
            v[c] += wt * q[c] as f32;
        }
    }
    v.map(|v| v * INV_255)
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn interior_sse2(px: &[[u8; 4]], top: usize, w: usize, weights: [f32; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let taps = [px[top], px[top + 1], px[top + w], px[top + w + 1]];
    // SAFETY: SSE2 is part of the x86-64 baseline; the intrinsics only touch registers and the
    // local arrays.
    unsafe {
        let zero = _mm_setzero_si128();
        let mut v = _mm_setzero_ps();
        for (q, wt) in taps.into_iter().zip(weights) {
            let bytes = _mm_cvtsi32_si128(i32::from_le_bytes(q));
            let ints = _mm_unpacklo_epi16(_mm_unpacklo_epi8(bytes, zero), zero);
            v = _mm_add_ps(v, _mm_mul_ps(_mm_set1_ps(wt), _mm_cvtepi32_ps(ints)));
        }
        let mut out = [0.0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), _mm_mul_ps(v, _mm_set1_ps(INV_255)));
        out
    }
}

/// ImageNet normalisation of the three planes.
fn finish(r: &mut [f32], g: &mut [f32], b: &mut [f32]) {
    for (c, ch) in [r, g, b].into_iter().enumerate() {
        let (m, s) = (IMAGENET_MEAN[c], IMAGENET_STD[c]);
        for v in ch.iter_mut() {
            *v = (*v - m) / s;
        }
    }
}

/// `v` clamped to `[0, 1]`, without a branch (pixels of noisy images saturate at random, which
/// a branch mispredicts). The same as `clamp` for every value that arises here: all are finite.
#[allow(clippy::manual_clamp)] // `clamp` compiles to branches here
#[inline(always)]
fn unit(v: f32) -> f32 {
    v.max(0.0).min(1.0)
}

/// ITU-R 601-2 luma of one pixel, as `grayscale` sums it.
#[inline]
fn luma(r: f32, g: f32, b: f32) -> f32 {
    r * 0.299 + g * 0.587 + b * 0.114
}

/// Contrast with the mean grey level `mean` and saturation, each clamped to `[0, 1]`, with
/// torchvision's formulas, then the ImageNet normalisation (brightness was applied as the pixels
/// were produced).
fn finish_jittered(r: &mut [f32], g: &mut [f32], b: &mut [f32], p: &SampleParams, mean: f32) {
    let (contrast, sat) = (p.contrast as f32, p.saturation as f32);
    let mean_part = mean * (-contrast + 1.0);
    let sat_keep = -sat + 1.0;
    let (m, s) = (IMAGENET_MEAN, IMAGENET_STD);
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let cr = unit(*r * contrast + mean_part);
        let cg = unit(*g * contrast + mean_part);
        let cb = unit(*b * contrast + mean_part);
        let gray = luma(cr, cg, cb) * sat_keep;
        *r = (unit(cr * sat + gray) - m[0]) / s[0];
        *g = (unit(cg * sat + gray) - m[1]) / s[1];
        *b = (unit(cb * sat + gray) - m[2]) / s[2];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_taps_are_the_scalar_taps_bit_for_bit() {
        let mut r = Rng::new(3);
        let (w, h) = (13, 9);
        let px: Vec<[u8; 4]> = (0..w * h).map(|_| [0, 1, 2, 3].map(|_| r.below(256) as u8)).collect();
        for _ in 0..10_000 {
            let top = r.below(((h - 1) * w - 1) as u64) as usize;
            let (dx, dy) = (r.uniform() as f32, r.uniform() as f32);
            let weights = [(1.0 - dx) * (1.0 - dy), dx * (1.0 - dy), (1.0 - dx) * dy, dx * dy];
            let (a, b) = (interior_sse2(&px, top, w, weights), interior_scalar(&px, top, w, weights));
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "at {top} with {weights:?}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_coordinates_are_the_scalar_ones_bit_for_bit() {
        let mut r = Rng::new(4);
        for n in [1usize, 4, 7, 224, 225] {
            let xs = base(n);
            for k in 0..200 {
                // Realistic maps, then ones far outside any image (huge shears).
                let scale = if k % 4 == 3 { 1e9 } else { 1.5 };
                let m = RowMap {
                    theta0: r.uniform_in(-scale, scale) as f32,
                    theta2: r.uniform_in(-scale, scale) as f32,
                    tx: r.uniform_in(-scale, scale) as f32,
                    ty: r.uniform_in(-scale, scale) as f32,
                    fw: n as f32,
                    fh: (n + k % 3) as f32,
                };
                let mut vector = vec![Tap::default(); n];
                let done = row_taps_sse2(&xs, &m, &mut vector);
                assert_eq!(done, n / 4 * 4);
                for (j, (t, &x)) in vector[..done].iter().zip(&xs).enumerate() {
                    let s = tap_scalar(x, &m);
                    assert_eq!(
                        (t.x0, t.y0, t.weights.map(f32::to_bits)),
                        (s.x0, s.y0, s.weights.map(f32::to_bits)),
                        "pixel {j} of {n} with {m:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn floor_is_floor() {
        for v in [-2.5f32, -2.0, -1.0, -0.5, -0.0, 0.0, 0.25, 1.0, 1.75, 223.99, COORD_LIMIT, -COORD_LIMIT] {
            assert_eq!(floor_i(v), v.floor() as i32, "{v}");
        }
    }

    #[test]
    fn the_base_grid_is_atens() {
        // torch.linspace(-1, 1, n) * (n - 1) / n, printed by PyTorch 2.11 for n = 5 and 6.
        assert_eq!(base(5), vec![-0.8, -0.4, 0.0, 0.4, 0.8]);
        let six = base(6);
        for (a, b) in six.iter().zip([-0.8333333, -0.5, -0.16666667, 0.16666667, 0.5, 0.8333333]) {
            assert!((a - b).abs() < 1e-7, "{six:?}");
        }
        assert_eq!(base(1), vec![0.0]);
    }
}
