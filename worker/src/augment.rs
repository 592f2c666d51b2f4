//! Batch-wise data augmentation and normalisation as tensor operations on the training device.
//!
//! Training batches ([`train_batch`]): uint8 `[N, 3, H, W]` → float in `[0, 1]` → per sample a
//! horizontal flip (p = 0.5), one affine warp combining a rotation in `±rotation_deg` and an
//! x-shear in `±shear_deg` (`affine_grid` + bilinear `grid_sample`, zeros outside, like
//! torchvision's `RandomRotation`/`RandomAffine` with fill 0), colour jitter (brightness,
//! contrast, saturation factors in `[1 - j, 1 + j]`, applied in that order with torchvision's
//! formulas) → ImageNet mean/std normalisation. Validation batches ([`eval_batch`]) are only
//! normalised: resizing and cropping happened when the dataset was cached.
//!
//! Every random parameter is drawn from a [`Rng`] stream (six draws per sample, whatever is
//! enabled), so the same seed gives the same parameters on any device. On the CPU, batches are
//! computed by the fused kernel of [`cpu`] (the same formulas in one pass per sample); on other
//! devices by the tensor operations of [`apply`] and [`normalize`], which stay the reference.

use sweep_core::spec::Augment;
use tch::{Device, Kind, TchError, Tensor};

use crate::rng::Rng;

pub mod cpu;

/// ImageNet channel means (torchvision's `Normalize`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Random parameters of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    pub flip: bool,
    /// Radians.
    pub rotation: f64,
    /// Radians.
    pub shear: f64,
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
}

impl SampleParams {
    /// No flip, no warp, factors of 1: what [`Augment::NONE`] applies.
    pub const NEUTRAL: SampleParams =
        SampleParams { flip: false, rotation: 0.0, shear: 0.0, brightness: 1.0, contrast: 1.0, saturation: 1.0 };

    /// Draws one sample's parameters (always six draws, in a fixed order).
    pub fn draw(aug: &Augment, rng: &mut Rng) -> SampleParams {
        let flip = rng.bernoulli(0.5);
        let rotation = rng.uniform_in(-aug.rotation_deg, aug.rotation_deg).to_radians();
        let shear = rng.uniform_in(-aug.shear_deg, aug.shear_deg).to_radians();
        let j = aug.color_jitter;
        let mut factor = || rng.uniform_in((1.0 - j).max(0.0), 1.0 + j);
        let (brightness, contrast, saturation) = (factor(), factor(), factor());
        SampleParams { flip: aug.hflip && flip, rotation, shear, brightness, contrast, saturation }
    }
}

fn channel_tensor(v: [f32; 3], device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(&v)?.f_view([1, 3, 1, 1])?.f_to_device(device)
}

/// `[N]` values as a `[N, 1, 1, 1]` float tensor on `device`.
fn per_sample(v: &[f32], device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(v)?.f_view([-1, 1, 1, 1])?.f_to_device(device)
}

/// uint8 images to float in `[0, 1]` (a new tensor).
pub fn to_unit(images: &Tensor) -> Result<Tensor, TchError> {
    let mut x = images.f_to_dtype(Kind::Float, false, true)?;
    x = x.f_div_scalar_(255.0)?;
    Ok(x)
}

/// ImageNet mean/std normalisation of a float `[N, 3, H, W]` batch in `[0, 1]`.
pub fn normalize(images: &Tensor) -> Result<Tensor, TchError> {
    let d = images.device();
    let mut x = images.f_sub(&channel_tensor(IMAGENET_MEAN, d)?)?;
    x = x.f_div_(&channel_tensor(IMAGENET_STD, d)?)?;
    Ok(x)
}

/// [`normalize`] in place, on a tensor this module owns.
fn normalize_in_place(mut x: Tensor) -> Result<Tensor, TchError> {
    let d = x.device();
    x = x.f_sub_(&channel_tensor(IMAGENET_MEAN, d)?)?;
    x = x.f_div_(&channel_tensor(IMAGENET_STD, d)?)?;
    Ok(x)
}

/// ITU-R 601-2 luma (torchvision's `rgb_to_grayscale`): `[N, 3, H, W]` → `[N, 1, H, W]`.
fn grayscale(x: &Tensor) -> Result<Tensor, TchError> {
    let w = Tensor::f_from_slice(&[0.299f32, 0.587, 0.114])?.f_view([1, 3, 1, 1])?.f_to_device(x.device())?;
    x.f_mul(&w)?.f_sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
}

/// Augments a float batch in `[0, 1]` with the given per-sample parameters; the result is in
/// `[0, 1]`. Steps whose setting is off in `aug` are skipped entirely, so [`Augment::NONE`]
/// returns the input unchanged. `images` itself is never modified.
pub fn apply(images: &Tensor, aug: &Augment, params: &[SampleParams]) -> Result<Tensor, TchError> {
    apply_owned(images.shallow_clone(), false, aug, params)
}

/// [`apply`] on `x`, modifying it in place when `owned` (its storage belongs to the caller's
/// temporary, as in [`train_batch`]); otherwise the first step that changes pixels copies.
/// In-place steps compute exactly what their out-of-place forms do (the same operations in the
/// same order), but save a fresh allocation — and its page faults — per step.
fn apply_owned(mut x: Tensor, mut owned: bool, aug: &Augment, params: &[SampleParams]) -> Result<Tensor, TchError> {
    let size = x.size();
    if size.len() != 4 || size[0] != params.len() as i64 {
        return Err(TchError::Shape(format!("augment: batch of shape {size:?} with {} parameter sets", params.len())));
    }
    let d = x.device();
    let flipped: Vec<i64> = params.iter().enumerate().filter(|(_, p)| p.flip).map(|(i, _)| i as i64).collect();
    if aug.hflip && !flipped.is_empty() {
        // Mirror only the chosen samples.
        if !owned {
            x = x.f_detach_copy()?;
            owned = true;
        }
        let idx = Tensor::f_from_slice(&flipped)?.f_to_device(d)?;
        let mirrored = x.f_index_select(0, &idx)?.f_flip([3])?;
        x = x.f_index_copy_(0, &idx, &mirrored)?;
    }
    if aug.rotation_deg > 0.0 || aug.shear_deg > 0.0 {
        // Output pixel (u, v) samples the input at R(rotation) · Shear_x(shear) · (u, v), in
        // normalised coordinates (the images are square, so angles are preserved).
        let mut theta = Vec::with_capacity(params.len() * 6);
        for p in params {
            let (s, c) = p.rotation.sin_cos();
            let t = p.shear.tan();
            theta.extend_from_slice(&[c as f32, (c * t - s) as f32, 0.0, s as f32, (s * t + c) as f32, 0.0]);
        }
        let theta = Tensor::f_from_slice(&theta)?.f_view([-1, 2, 3])?.f_to_device(d)?;
        let grid = Tensor::f_affine_grid_generator(&theta, size.as_slice(), false)?;
        // interpolation 0 = bilinear, padding 0 = zeros.
        x = x.f_grid_sampler(&grid, 0, 0, false)?;
        owned = true;
    }
    if aug.color_jitter > 0.0 {
        if !owned {
            x = x.f_detach_copy()?;
        }
        let b: Vec<f32> = params.iter().map(|p| p.brightness as f32).collect();
        let c: Vec<f32> = params.iter().map(|p| p.contrast as f32).collect();
        let s: Vec<f32> = params.iter().map(|p| p.saturation as f32).collect();
        // Brightness: blend with black.
        x = x.f_mul_(&per_sample(&b, d)?)?;
        x = x.f_clamp_(0.0, 1.0)?;
        // Contrast: blend with the mean of the grayscale image.
        let c = per_sample(&c, d)?;
        let mean = grayscale(&x)?.f_mean_dim([1i64, 2, 3].as_slice(), true, Kind::Float)?;
        let mean_part = mean.f_mul(&c.f_neg()?.f_add_scalar(1.0)?)?;
        x = x.f_mul_(&c)?;
        x = x.f_add_(&mean_part)?;
        x = x.f_clamp_(0.0, 1.0)?;
        // Saturation: blend with the grayscale image.
        let s = per_sample(&s, d)?;
        let mut gray_part = grayscale(&x)?;
        gray_part = gray_part.f_mul_(&s.f_neg()?.f_add_scalar(1.0)?)?;
        x = x.f_mul_(&s)?;
        x = x.f_add_(&gray_part)?;
        x = x.f_clamp_(0.0, 1.0)?;
    }
    Ok(x)
}

/// A training batch: uint8 `[N, 3, H, W]` → augmented, normalised float batch. Draws the
/// parameters of every sample from `rng`.
pub fn train_batch(images: &Tensor, aug: &Augment, rng: &mut Rng) -> Result<Tensor, TchError> {
    let n = images.size().first().copied().unwrap_or(0).max(0) as usize;
    let params: Vec<SampleParams> = (0..n).map(|_| SampleParams::draw(aug, rng)).collect();
    train_batch_with(images, aug, &params)
}

/// A training batch with given per-sample parameters (one per image, drawn by the caller):
/// uint8 `[N, 3, H, W]` → augmented, normalised float batch. [`train_batch`] is this with
/// parameters drawn from its stream; a data-parallel replica draws those of the whole global
/// batch and passes its shard's, so a sample is augmented the same way whatever the number of
/// replicas.
pub fn train_batch_with(images: &Tensor, aug: &Augment, params: &[SampleParams]) -> Result<Tensor, TchError> {
    train_batch_on(images, aug, params, true)
}

/// [`train_batch_with`]; on the CPU the samples are spread over rayon's pool when `parallel`,
/// else computed on the calling thread ([`cpu::batch_on`]), with the same bits.
pub fn train_batch_on(
    images: &Tensor,
    aug: &Augment,
    params: &[SampleParams],
    parallel: bool,
) -> Result<Tensor, TchError> {
    if cpu::applies(images) {
        return cpu::batch_on(images, aug, params, parallel);
    }
    train_batch_tensor_ops(images, aug, params)
}

/// [`train_batch_with`] by tensor operations on any device: what CUDA devices run, and the
/// reference the CPU kernel is tested against.
pub fn train_batch_tensor_ops(images: &Tensor, aug: &Augment, params: &[SampleParams]) -> Result<Tensor, TchError> {
    normalize_in_place(apply_owned(to_unit(images)?, true, aug, params)?)
}

/// A validation batch: uint8 `[N, 3, H, W]` → normalised float batch. Exactly a training batch
/// without augmentation ([`Augment::NONE`]), on every device.
pub fn eval_batch(images: &Tensor) -> Result<Tensor, TchError> {
    if cpu::applies(images) {
        let n = images.size()[0].max(0) as usize;
        return cpu::batch(images, &Augment::NONE, &vec![SampleParams::NEUTRAL; n]);
    }
    normalize_in_place(to_unit(images)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: i64, s: i64) -> Tensor {
        let mut r = Rng::new(5);
        let v: Vec<u8> = (0..n * 3 * s * s).map(|_| r.below(256) as u8).collect();
        Tensor::from_slice(&v).view([n, 3, s, s])
    }

    #[test]
    fn none_is_the_identity_before_normalisation() {
        let x = to_unit(&batch(4, 16)).unwrap();
        let mut rng = Rng::new(1);
        let params: Vec<_> = (0..4).map(|_| SampleParams::draw(&Augment::NONE, &mut rng)).collect();
        let y = apply(&x, &Augment::NONE, &params).unwrap();
        assert!(y.equal(&x));
        // And train_batch with NONE is exactly eval_batch.
        let u = batch(4, 16);
        assert!(train_batch(&u, &Augment::NONE, &mut Rng::new(2)).unwrap().equal(&eval_batch(&u).unwrap()));
    }

    #[test]
    fn flip_mirrors_exactly_the_chosen_samples() {
        let x = to_unit(&batch(3, 8)).unwrap();
        let aug = Augment { hflip: true, ..Augment::NONE };
        let p =
            |flip| SampleParams { flip, rotation: 0.0, shear: 0.0, brightness: 1.0, contrast: 1.0, saturation: 1.0 };
        let y = apply(&x, &aug, &[p(true), p(false), p(true)]).unwrap();
        assert!(y.get(0).equal(&x.get(0).flip([2])));
        assert!(y.get(1).equal(&x.get(1)));
        assert!(y.get(2).equal(&x.get(2).flip([2])));
        // Pixel by pixel: column j of the flipped image is column W-1-j of the original.
        let a = Vec::<f32>::try_from(&y.get(0).flatten(0, -1)).unwrap();
        let b = Vec::<f32>::try_from(&x.get(0).flatten(0, -1)).unwrap();
        for c in 0..3 {
            for i in 0..8 {
                for j in 0..8 {
                    assert_eq!(a[(c * 8 + i) * 8 + j], b[(c * 8 + i) * 8 + (7 - j)]);
                }
            }
        }
    }

    #[test]
    fn zero_angle_warp_is_close_to_identity_and_rotation_changes_pixels() {
        let x = to_unit(&batch(2, 16)).unwrap();
        let aug = Augment { rotation_deg: 10.0, ..Augment::NONE };
        let p = |rotation| SampleParams {
            flip: false,
            rotation,
            shear: 0.0,
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
        };
        let y = apply(&x, &aug, &[p(0.0), p(0.3)]).unwrap();
        let d0 = (y.get(0) - x.get(0)).abs().max().double_value(&[]);
        assert!(d0 < 1e-5, "identity warp moved pixels by {d0}");
        let d1 = (y.get(1) - x.get(1)).abs().mean(Kind::Float).double_value(&[]);
        assert!(d1 > 0.05, "rotation changed too little: {d1}");
    }

    #[test]
    fn jitter_stays_in_range_and_neutral_factors_keep_the_image() {
        let x = to_unit(&batch(2, 8)).unwrap();
        let aug = Augment { color_jitter: 0.4, ..Augment::NONE };
        let neutral =
            SampleParams { flip: false, rotation: 0.0, shear: 0.0, brightness: 1.0, contrast: 1.0, saturation: 1.0 };
        let strong = SampleParams { brightness: 1.4, contrast: 0.6, saturation: 1.4, ..neutral };
        let y = apply(&x, &aug, &[neutral, strong]).unwrap();
        assert!((y.get(0) - x.get(0)).abs().max().double_value(&[]) < 1e-6);
        assert!(y.min().double_value(&[]) >= 0.0 && y.max().double_value(&[]) <= 1.0);
        assert!((y.get(1) - x.get(1)).abs().mean(Kind::Float).double_value(&[]) > 0.01);
    }

    #[test]
    fn same_seed_same_batch() {
        let u = batch(4, 16);
        let aug = Augment::default();
        let a = train_batch(&u, &aug, &mut Rng::new(9)).unwrap();
        let b = train_batch(&u, &aug, &mut Rng::new(9)).unwrap();
        let c = train_batch(&u, &aug, &mut Rng::new(10)).unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
    }

    #[test]
    fn normalisation_uses_imagenet_statistics() {
        let x = Tensor::ones([1, 3, 2, 2], (Kind::Float, Device::Cpu)) * 0.485;
        let y = normalize(&x).unwrap();
        assert!(y.get(0).get(0).abs().max().double_value(&[]) < 1e-6);
        let want = (0.485 - 0.456) / 0.224;
        assert!((y.get(0).get(1).mean(Kind::Float).double_value(&[]) - want).abs() < 1e-5);
    }

    /// Parameter sets that exercise every step, drawn from the default augmentation.
    fn params(n: usize, seed: u64) -> Vec<SampleParams> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| SampleParams::draw(&Augment { color_jitter: 0.4, ..Augment::default() }, &mut rng)).collect()
    }

    /// The largest and the mean absolute difference.
    fn diffs(a: &Tensor, b: &Tensor) -> (f64, f64) {
        assert_eq!(a.size(), b.size());
        let d = (a - b).abs();
        (d.max().double_value(&[]), d.mean(Kind::Float).double_value(&[]))
    }

    #[test]
    fn cpu_kernel_matches_the_tensor_operations() {
        // In normalised units, where one grey level is 1 / 255 / 0.229 ≈ 0.017. Both paths round
        // the warp's source coordinates in f32, by different operations: a coordinate that lands
        // near a pixel boundary differs in its last bits, so single pixels differ by up to ~5e-4
        // (0.03 grey level); on average by 1e-5.
        let (most, mean) = (1e-3, 2e-5);
        let square = batch(6, 24);
        let wide = Tensor::cat(&[batch(3, 28).narrow(2, 0, 20), batch(3, 28).narrow(2, 8, 20)], 0).contiguous();
        let full = batch(6, 224);
        let p = params(6, 3);
        let augs = [
            Augment::default(),
            Augment { color_jitter: 0.4, ..Augment::default() },
            Augment { hflip: false, ..Augment::default() },
            Augment { rotation_deg: 15.0, ..Augment::NONE },
            Augment { shear_deg: 10.0, hflip: true, ..Augment::NONE },
            Augment { color_jitter: 0.4, ..Augment::NONE },
            // The most the spec allows.
            Augment { hflip: true, rotation_deg: 180.0, shear_deg: 60.0, color_jitter: 1.0 },
        ];
        for images in [&square, &wide, &full] {
            for aug in &augs {
                let mut rng = Rng::new(7);
                let p: Vec<_> = if aug.color_jitter == 1.0 {
                    (0..6).map(|_| SampleParams::draw(aug, &mut rng)).collect()
                } else {
                    p.clone()
                };
                let fused = cpu::batch(images, aug, &p).unwrap();
                let reference = train_batch_tensor_ops(images, aug, &p).unwrap();
                let (d, m) = diffs(&fused, &reference);
                assert!(
                    d < most && m < mean,
                    "{aug:?} on {:?}: the CPU kernel differs by {d} (mean {m})",
                    images.size()
                );
                assert_eq!(fused.kind(), Kind::Float);
            }
        }
        // Saturated images: every clamp engages.
        for v in [0u8, 255] {
            let flat = Tensor::full([2, 3, 16, 16], v as i64, (Kind::Uint8, Device::Cpu));
            let aug = Augment { color_jitter: 0.4, ..Augment::default() };
            let (d, _) = diffs(
                &cpu::batch(&flat, &aug, &p[..2]).unwrap(),
                &train_batch_tensor_ops(&flat, &aug, &p[..2]).unwrap(),
            );
            assert!(d < 2e-5, "a flat image of {v} differs by {d}");
        }
        // A large image, contrast 0: every pixel is the mean grey level, summed as exactly as the
        // tensor path sums it.
        let big = Tensor::randint(256, [1, 3, 1024, 1024], (Kind::Uint8, Device::Cpu));
        let aug = Augment { color_jitter: 1.0, ..Augment::NONE };
        let grey = [SampleParams { contrast: 0.0, saturation: 0.0, ..SampleParams::NEUTRAL }];
        let (d, _) =
            diffs(&cpu::batch(&big, &aug, &grey).unwrap(), &train_batch_tensor_ops(&big, &aug, &grey).unwrap());
        assert!(d < 5e-6, "the mean grey level of a 1024 px image differs by {d}");
    }

    #[test]
    fn cpu_kernel_without_warp_or_jitter_is_the_tensor_path_bit_for_bit() {
        let images = batch(5, 12);
        let p = params(5, 8);
        assert!(p.iter().any(|p| p.flip) && p.iter().any(|p| !p.flip));
        for aug in [Augment::NONE, Augment { hflip: true, ..Augment::NONE }] {
            assert!(cpu::batch(&images, &aug, &p).unwrap().equal(&train_batch_tensor_ops(&images, &aug, &p).unwrap()));
        }
        assert!(eval_batch(&images).unwrap().equal(&normalize(&to_unit(&images).unwrap()).unwrap()));
    }

    #[test]
    fn cpu_kernel_computes_each_sample_by_itself() {
        let images = batch(6, 20);
        let p = params(6, 11);
        let aug = Augment { color_jitter: 0.4, ..Augment::default() };
        let whole = cpu::batch(&images, &aug, &p).unwrap();
        // A sample's pixels are the same alone, at another place in a batch, and on one thread.
        let one = cpu::batch(&images.narrow(0, 4, 1), &aug, &p[4..5]).unwrap();
        assert!(one.get(0).equal(&whole.get(4)));
        let idx = Tensor::from_slice(&[5i64, 0, 3]);
        let shuffled = cpu::batch(&images.index_select(0, &idx), &aug, &[p[5], p[0], p[3]]).unwrap();
        assert!(shuffled.get(0).equal(&whole.get(5)) && shuffled.get(2).equal(&whole.get(3)));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let (mine, pp) = (images.copy(), p.clone());
        assert!(pool.install(move || cpu::batch(&mine, &aug, &pp).unwrap()).equal(&whole));
        // On the calling thread alone.
        assert!(cpu::batch_on(&images, &aug, &p, false).unwrap().equal(&whole));
        assert!(train_batch_on(&images, &aug, &p, false).unwrap().equal(&whole));
        // And train_batch_with takes this path on the CPU.
        assert!(train_batch_with(&images, &aug, &p).unwrap().equal(&whole));
    }

    #[test]
    fn cpu_kernel_rejects_a_batch_it_cannot_read() {
        let p = params(2, 1);
        let aug = Augment::default();
        for (images, what) in [
            (batch(3, 8), "parameter sets"),
            (to_unit(&batch(2, 8)).unwrap(), "Float"),
            (Tensor::zeros([2, 1, 8, 8], (Kind::Uint8, Device::Cpu)), "[N, 3, H, W]"),
        ] {
            let e = cpu::batch(&images, &aug, &p).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        // An empty batch is an empty float batch.
        let empty = cpu::batch(&Tensor::zeros([0, 3, 8, 8], (Kind::Uint8, Device::Cpu)), &aug, &[]).unwrap();
        assert_eq!((empty.size(), empty.kind()), (vec![0, 3, 8, 8], Kind::Float));
    }
}
