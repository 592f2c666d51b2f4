//! Datasets, decoded once into an in-memory cache of resized uint8 images.
//!
//! A [`Dataset`] holds a training and a validation [`Split`]: images as one contiguous
//! `N × 3 × S × S` uint8 buffer (NCHW, RGB, `S` = the spec's `image_size`) and their labels.
//! Images are resized and centre-cropped when the dataset is built, so a training step only
//! gathers a batch, augments it on the device and normalises it ([`prefetch`] assembles the
//! next batch while the model trains on the current one).
//!
//! Kinds:
//! * `synthetic`: procedurally drawn class-dependent images (see [`synthetic`]);
//! * `image_folder`: `root/train/<class>/*.{jpg,jpeg,png}` and `root/val/<class>/*`, decoded in
//!   parallel (see [`image_folder`]);
//! * `flowers102`: the official Oxford Flowers-102 files, `root/jpg/image_NNNNN.jpg`,
//!   `root/imagelabels.mat` and `root/setid.mat` (see [`flowers102()`]).
//!
//! An image that cannot be read or decoded fails the build with an error naming the file, unless
//! the spec sets `skip_corrupt`: then it is left out and listed in [`Dataset::skipped`].
//!
//! [`load`] keeps the most recently used datasets of the process (key: the dataset spec), so
//! several trials in one worker decode a dataset once. Every [`DataError`] is permanent: a
//! missing directory or an unreadable image will fail again on any attempt.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use rayon::prelude::*;
use sweep_core::spec::DatasetSpec;
use tch::{Device, Kind, TchError, Tensor};

use crate::rng::{Rng, STREAM_SYNTHETIC};

pub mod flowers;
pub mod prefetch;

pub use flowers::{FLOWERS102_CLASSES, flowers102};

/// File extensions `image_folder` reads (case-insensitive); other files are ignored.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// How many decoded datasets the process keeps when they are not in use (least recently used
/// ones are dropped first).
pub const CACHE_CAPACITY: usize = 2;

const IMAGE_FOLDER_LAYOUT: &str = "an image_folder dataset needs <root>/train/<class>/*.{jpg,jpeg,png} and <root>/val/<class>/* with the same class subdirectories";

/// Why a dataset could not be built. All of these are permanent failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DataError {
    /// A file or directory the dataset needs does not exist.
    #[error("{path} does not exist: {expected}")]
    NotFound { path: PathBuf, expected: String },
    /// A file or directory exists but cannot be read or decoded.
    #[error("cannot read {path}: {message}")]
    Unreadable { path: PathBuf, message: String },
    /// The files do not have the layout the dataset kind needs.
    #[error("{0}")]
    Layout(String),
    /// A file can be read but its content is not what the dataset needs (a `.mat` variable
    /// missing, of the wrong shape, or with values out of range).
    #[error("{path}: {message}")]
    BadContent { path: PathBuf, message: String },
    /// A setting the worker cannot honour (an unsupported kind, an impossible size).
    #[error("{0}")]
    Unsupported(String),
    /// The decoded images would not fit in this worker's memory (checked before anything is
    /// allocated; an allocation that fails anyway says so too, instead of aborting).
    #[error("{0}")]
    TooLarge(String),
}

impl DataError {
    /// Whether another attempt would fail the same way: always, for dataset errors.
    pub fn is_permanent(&self) -> bool {
        true
    }
}

/// One split of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// `len() × 3 × image_size × image_size` bytes, NCHW, RGB.
    pub images: Vec<u8>,
    /// Class index of each image.
    pub labels: Vec<i64>,
    /// Side of the square images.
    pub image_size: u32,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the split holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image (`3 × S × S`).
    pub fn image_bytes(&self) -> usize {
        3 * self.image_size as usize * self.image_size as usize
    }

    /// The CHW bytes of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_bytes();
        &self.images[i * n..(i + 1) * n]
    }

    /// The images as a uint8 `[N, 3, S, S]` tensor and the labels as an int64 `[N]` tensor, on
    /// `device`.
    pub fn to_tensors(&self, device: Device) -> Result<(Tensor, Tensor), TchError> {
        let s = self.image_size as i64;
        let images = Tensor::f_from_slice(&self.images)?.f_view([self.len() as i64, 3, s, s])?.f_to_device(device)?;
        let labels = Tensor::f_from_slice(&self.labels)?.f_to_device(device)?.f_to_kind(Kind::Int64)?;
        Ok((images, labels))
    }
}

/// An image left out of a dataset because it could not be read (`skip_corrupt: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The image file.
    pub path: PathBuf,
    /// Why it could not be read (the decoder's or the file system's message).
    pub reason: String,
}

/// A decoded dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// Side of the square images.
    pub image_size: u32,
    /// The training split.
    pub train: Split,
    /// The validation split.
    pub val: Split,
    /// Images left out because they could not be read (only with `skip_corrupt: true`;
    /// otherwise such an image is an error): training images first, each split in its order.
    pub skipped: Vec<Skipped>,
}

impl Dataset {
    /// The images left out because they could not be read (see [`Dataset::skipped`]).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// How many images were left out because they could not be read.
    pub fn skipped_count(&self) -> usize {
        self.skipped.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

type Slot = Arc<Mutex<Option<Arc<Dataset>>>>;

/// Most recently used last.
static CACHE: LazyLock<Mutex<Vec<(String, Slot)>>> = LazyLock::new(|| Mutex::new(Vec::new()));

/// The dataset of `spec`, decoded on first use and then served from the process cache. Two
/// threads asking for the same dataset at once decode it once; errors are not cached.
pub fn load(spec: &DatasetSpec) -> Result<Arc<Dataset>, DataError> {
    let key = format!("{spec:?}");
    let slot = {
        let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match cache.iter().position(|(k, _)| *k == key) {
            Some(i) => cache.remove(i).1,
            None => Arc::new(Mutex::new(None)),
        };
        cache.push((key, slot.clone()));
        evict(&mut cache);
        slot
    };
    let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(ds) = guard.as_ref() {
        return Ok(ds.clone());
    }
    let ds = Arc::new(build(spec)?);
    *guard = Some(ds.clone());
    Ok(ds)
}

/// Drops least recently used datasets beyond [`CACHE_CAPACITY`], but never one in use (held by a
/// trial, or being decoded): that memory could not be freed anyway.
fn evict(cache: &mut Vec<(String, Slot)>) {
    let mut i = 0;
    while cache.len() > CACHE_CAPACITY && i < cache.len() {
        let in_use = Arc::strong_count(&cache[i].1) > 1
            || match cache[i].1.try_lock() {
                Ok(guard) => guard.as_ref().is_some_and(|d| Arc::strong_count(d) > 1),
                Err(_) => true,
            };
        if in_use {
            i += 1;
        } else {
            cache.remove(i);
        }
    }
}

/// Drops every cached dataset.
pub fn clear_cache() {
    CACHE.lock().unwrap_or_else(PoisonError::into_inner).clear();
}

/// Builds the dataset of `spec` without the cache. Skipped unreadable images are logged (one
/// warning each) and listed in [`Dataset::skipped`].
pub fn build(spec: &DatasetSpec) -> Result<Dataset, DataError> {
    let dataset = match spec {
        DatasetSpec::Synthetic { classes, train_per_class, val_per_class, image_size, seed } => {
            synthetic(*classes, *train_per_class, *val_per_class, *image_size, *seed)
        }
        DatasetSpec::ImageFolder { root, image_size, skip_corrupt } => {
            image_folder(Path::new(root), *image_size, *skip_corrupt)
        }
        DatasetSpec::Flowers102 { root, train_split, val_split, image_size, skip_corrupt } => {
            flowers102(Path::new(root), train_split, val_split, *image_size, *skip_corrupt)
        }
    }?;
    for s in &dataset.skipped {
        tracing::warn!(file = %s.path.display(), reason = %s.reason, "skipped an unreadable image (skip_corrupt)");
    }
    Ok(dataset)
}

/// The limit set by [`set_memory_limit`] (0: none).
static MEMORY_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Caps the memory this process may fill with decoded images (`sweep-worker --memory-limit`).
pub fn set_memory_limit(bytes: u64) {
    MEMORY_LIMIT.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// The memory this process may use for decoded images: the limit set with
/// [`set_memory_limit`], else the machine's total, or its control group's limit when that is
/// lower (a container). `None` when none can be read.
pub fn memory_limit() -> Option<u64> {
    match MEMORY_LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        0 => system_memory(),
        set => Some(set),
    }
}

fn system_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .min();
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

/// `1.5 MiB`, `28.6 GiB`, `286106.9 GiB`.
fn gib(bytes: u128) -> String {
    let b = bytes as f64;
    match bytes {
        n if n < 1 << 20 => format!("{:.1} KiB", b / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        _ => format!("{:.1} GiB", b / (1u64 << 30) as f64),
    }
}

/// A zeroed buffer of `bytes` for the decoded images of `what`, or an error when it cannot fit:
/// more than this worker's memory (checked first), or an allocation the system refuses.
/// Never aborts the process (`vec![0; n]` does, on a refused allocation).
fn image_buffer(bytes: u128, what: &str) -> Result<Vec<u8>, DataError> {
    let too_large = |why: String| DataError::TooLarge(format!("{what}: {} of decoded images {why}", gib(bytes)));
    if let Some(limit) = memory_limit()
        && bytes > u128::from(limit)
    {
        return Err(too_large(format!("do not fit in this worker's {} of memory", gib(limit.into()))));
    }
    let n = usize::try_from(bytes)
        .ok()
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| too_large("cannot be addressed".into()))?;
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(n).map_err(|e| too_large(format!("could not be allocated ({e})")))?;
    buffer.resize(n, 0);
    Ok(buffer)
}

fn check_size(image_size: u32) -> Result<(), DataError> {
    if image_size == 0 {
        return Err(DataError::Unsupported("image_size must be at least 1 px".into()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Synthetic
// ---------------------------------------------------------------------------------------------

/// What makes a class: two colours and a pattern with an orientation and a frequency.
#[derive(Debug, Clone, Copy)]
struct ClassStyle {
    colour_a: [f64; 3],
    colour_b: [f64; 3],
    /// 0: stripes, 1: rings, 2: plaid.
    pattern: u32,
    angle: f64,
    /// Cycles across the image.
    frequency: f64,
}

const SPLIT_TRAIN: u64 = 1;
const SPLIT_VAL: u64 = 2;

fn class_style(seed: u64, class: u32, classes: u32) -> ClassStyle {
    let mut r = Rng::derive(seed, &[STREAM_SYNTHETIC, 0, class as u64]);
    let mut colour = || [r.uniform_in(0.1, 0.9), r.uniform_in(0.1, 0.9), r.uniform_in(0.1, 0.9)];
    let (colour_a, colour_b) = (colour(), colour());
    // Orientations spread evenly over half a turn, with a little per-class offset.
    let angle = (class as f64 + r.uniform_in(0.0, 0.5)) * std::f64::consts::PI / classes.max(1) as f64;
    let frequency = r.uniform_in(1.5, 4.5);
    ClassStyle { colour_a, colour_b, pattern: class % 3, angle, frequency }
}

/// Draws one image of `style` into `out` (CHW, `3 × s × s`).
fn draw_image(style: &ClassStyle, s: usize, r: &mut Rng, out: &mut [u8]) {
    use std::f64::consts::TAU;
    // Per-image variation: phase, position, orientation and frequency jitter, brightness,
    // a colour cast, pixel noise, and an occluding rectangle.
    let phase = r.uniform_in(0.0, TAU);
    let (dx, dy) = (r.uniform_in(-0.25, 0.25), r.uniform_in(-0.25, 0.25));
    let angle = style.angle + r.uniform_in(-0.2, 0.2);
    let freq = style.frequency * r.uniform_in(0.8, 1.25);
    let brightness = r.uniform_in(0.7, 1.3);
    let cast = [r.uniform_in(-0.12, 0.12), r.uniform_in(-0.12, 0.12), r.uniform_in(-0.12, 0.12)];
    let noise = r.uniform_in(0.04, 0.12);
    let occ_w = r.uniform_in(0.1, 0.4);
    let occ_h = r.uniform_in(0.1, 0.4);
    let occ_x = r.uniform_in(0.0, 1.0 - occ_w);
    let occ_y = r.uniform_in(0.0, 1.0 - occ_h);
    let occ_colour = [r.uniform(), r.uniform(), r.uniform()];
    let (sin_a, cos_a) = angle.sin_cos();
    let plane = s * s;
    for y in 0..s {
        for x in 0..s {
            let fx = (x as f64 + 0.5) / s as f64;
            let fy = (y as f64 + 0.5) / s as f64;
            let (u, v) = (fx - 0.5 - dx, fy - 0.5 - dy);
            let along = u * cos_a + v * sin_a;
            let across = -u * sin_a + v * cos_a;
            let wave = match style.pattern {
                0 => (TAU * freq * along + phase).sin(),
                1 => (TAU * freq * 1.5 * (u * u + v * v).sqrt() + phase).sin(),
                _ => (TAU * freq * along + phase).sin() * (TAU * freq * across + phase).sin(),
            };
            let t = 0.5 + 0.5 * wave;
            let occluded = fx >= occ_x && fx < occ_x + occ_w && fy >= occ_y && fy < occ_y + occ_h;
            for c in 0..3 {
                let base = if occluded {
                    occ_colour[c]
                } else {
                    (style.colour_a[c] * (1.0 - t) + style.colour_b[c] * t + cast[c]) * brightness
                };
                let value = base + noise * r.normal();
                out[c * plane + y * s + x] = (value.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
}

fn synthetic_split(seed: u64, split: u64, styles: &[ClassStyle], per_class: u32, s: usize) -> Result<Split, DataError> {
    let per_class = per_class as usize;
    let n = styles.len() * per_class;
    let bytes = 3 * s * s;
    let what = if split == SPLIT_TRAIN { "the synthetic training split" } else { "the synthetic validation split" };
    let mut images = image_buffer(n as u128 * bytes as u128, what)?;
    images.par_chunks_mut(bytes.max(1)).enumerate().for_each(|(i, out)| {
        let (class, k) = (i / per_class, i % per_class);
        let mut r = Rng::derive(seed, &[STREAM_SYNTHETIC, split, class as u64, k as u64]);
        draw_image(&styles[class], s, &mut r, out);
    });
    let labels = (0..n).map(|i| (i / per_class) as i64).collect();
    Ok(Split { images, labels, image_size: s as u32 })
}

/// A procedurally drawn dataset: `classes` classes, each a pair of colours and a pattern
/// (stripes, rings or plaid) with its own orientation and frequency; every image varies the
/// phase, position, orientation, frequency, brightness and colour cast, adds pixel noise and
/// an occluding rectangle of random colour. Train and validation images are different draws.
/// The same arguments always give the same bytes.
pub fn synthetic(
    classes: u32,
    train_per_class: u32,
    val_per_class: u32,
    image_size: u32,
    seed: u64,
) -> Result<Dataset, DataError> {
    check_size(image_size)?;
    if classes == 0 || train_per_class == 0 {
        return Err(DataError::Unsupported(
            "a synthetic dataset needs at least 1 class and 1 training image per class".into(),
        ));
    }
    let s = image_size as usize;
    // Both splits, checked before either is allocated.
    let bytes = (classes as u128) * (train_per_class as u128 + val_per_class as u128) * 3 * (s as u128) * (s as u128);
    if let Some(limit) = memory_limit()
        && bytes > u128::from(limit)
    {
        return Err(DataError::TooLarge(format!(
            "the synthetic dataset ({classes} classes × {} images of {s} px) needs {} of memory; this worker has {}",
            train_per_class as u64 + val_per_class as u64,
            gib(bytes),
            gib(limit.into())
        )));
    }
    let styles: Vec<ClassStyle> = (0..classes).map(|c| class_style(seed, c, classes)).collect();
    Ok(Dataset {
        classes: (0..classes).map(|c| format!("class{c:03}")).collect(),
        image_size,
        train: synthetic_split(seed, SPLIT_TRAIN, &styles, train_per_class, s)?,
        val: synthetic_split(seed, SPLIT_VAL, &styles, val_per_class, s)?,
        skipped: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Image folder
// ---------------------------------------------------------------------------------------------

fn not_found(path: &Path) -> DataError {
    DataError::NotFound { path: path.to_path_buf(), expected: IMAGE_FOLDER_LAYOUT.into() }
}

fn unreadable(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Unreadable { path: path.to_path_buf(), message: e.to_string() }
}

/// Sorted names of the subdirectories of `dir` (hidden ones skipped).
fn class_dirs(dir: &Path) -> Result<Vec<String>, DataError> {
    if !dir.is_dir() {
        return Err(not_found(dir));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
        let entry = entry.map_err(|e| unreadable(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|n| {
            DataError::Layout(format!("class directory name {n:?} in {} is not valid UTF-8", dir.display()))
        })?;
        if !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Sorted image files of a class directory.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| unreadable(dir, e))? {
        let path = entry.map_err(|e| unreadable(dir, e))?.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Side the shorter image side is resized to before a centre crop of `image_size`:
/// torchvision's `Resize(256)` + `CenterCrop(224)`, scaled.
pub fn resize_side(image_size: u32) -> u32 {
    ((image_size as f64) * 256.0 / 224.0).round() as u32
}

/// Decodes an image file, resizes its shorter side to [`resize_side`] (bilinear with
/// antialiasing, long side as torchvision computes it), centre-crops `image_size` and returns
/// its CHW RGB bytes.
pub fn decode_image(path: &Path, image_size: u32) -> Result<Vec<u8>, DataError> {
    let s = image_size as usize;
    let mut out = vec![0u8; 3 * s * s];
    decode_image_into(path, image_size, &mut out)?;
    Ok(out)
}

/// [`decode_image`] into `out`, which must hold `3 × image_size²` bytes.
pub fn decode_image_into(path: &Path, image_size: u32, out: &mut [u8]) -> Result<(), DataError> {
    let s = image_size as usize;
    if out.len() != 3 * s * s {
        return Err(DataError::Unsupported(format!(
            "decode_image_into: a buffer of {} bytes for {image_size} px images (want {})",
            out.len(),
            3 * s * s
        )));
    }
    let img = decode_rgb(path)?;
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(unreadable(path, "the image is empty"));
    }
    let short_target = resize_side(image_size).max(image_size);
    let (short, long) = (w.min(h), w.max(h));
    let long_target = ((short_target as u64 * long as u64) / short as u64).max(short_target as u64) as u32;
    let (nw, nh) = if w <= h { (short_target, long_target) } else { (long_target, short_target) };
    let resized = if (nw, nh) == (w, h) { img.into_raw() } else { resize_rgb(img.into_raw(), (w, h), (nw, nh), path)? };
    let top = ((nh - image_size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((nw - image_size) as f64 / 2.0).round_ties_even() as usize;
    let nw = nw as usize;
    for y in 0..s {
        let row = &resized[((top + y) * nw + left) * 3..((top + y) * nw + left + s) * 3];
        for (x, p) in row.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * s * s + y * s + x] = p[c];
            }
        }
    }
    Ok(())
}

/// Decodes an image file (its format guessed from its bytes) to RGB at its own size: the decode
/// step of [`decode_image_into`].
pub fn decode_rgb(path: &Path) -> Result<image::RgbImage, DataError> {
    Ok(image::ImageReader::open(path)
        .map_err(|e| unreadable(path, e))?
        .with_guessed_format()
        .map_err(|e| unreadable(path, e))?
        .decode()
        .map_err(|e| unreadable(path, e))?
        .into_rgb8())
}

/// Resizes packed RGB bytes from `from` to `to` (width, height) with an antialiased bilinear
/// (triangle) filter whose support grows with the reduction, as PIL's and torchvision's
/// `Resize(antialias=True)` do; SIMD through `fast_image_resize`.
fn resize_rgb(rgb: Vec<u8>, from: (u32, u32), to: (u32, u32), path: &Path) -> Result<Vec<u8>, DataError> {
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image};
    thread_local! {
        static RESIZER: std::cell::RefCell<Resizer> = std::cell::RefCell::new(Resizer::new());
    }
    let src = Image::from_vec_u8(from.0, from.1, rgb, PixelType::U8x3).map_err(|e| unreadable(path, e))?;
    let mut dst = Image::new(to.0, to.1, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
        .map_err(|e| unreadable(path, format!("resizing to {}×{}: {e}", to.0, to.1)))?;
    Ok(dst.into_vec())
}

/// Decodes `items` (image file, label) in parallel into one split, in order. An image that
/// cannot be read is an error naming it (the first such image in `items` order, whatever the
/// decoding order), unless `skip_corrupt`: then it is left out and appended to `skipped`.
/// Decoding writes straight into the split's buffer, so the peak memory is the split itself.
pub fn decode_split(
    items: &[(PathBuf, i64)],
    image_size: u32,
    skip_corrupt: bool,
    skipped: &mut Vec<Skipped>,
) -> Result<Split, DataError> {
    check_size(image_size)?;
    let bytes = 3 * image_size as usize * image_size as usize;
    let mut images =
        image_buffer(items.len() as u128 * bytes as u128, &format!("{} images of {image_size} px", items.len()))?;
    let results: Vec<Result<(), DataError>> = images
        .par_chunks_mut(bytes)
        .zip(items.par_iter())
        .map(|(out, (path, _))| decode_image_into(path, image_size, out))
        .collect();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let mut labels = Vec::with_capacity(items.len());
    let mut kept = 0;
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok(()) => {
                if kept != i {
                    images.copy_within(i * bytes..(i + 1) * bytes, kept * bytes);
                }
                labels.push(items[i].1);
                kept += 1;
            }
            Err(e) if skip_corrupt => {
                let reason = match e {
                    DataError::Unreadable { message, .. } => message,
                    other => other.to_string(),
                };
                skipped.push(Skipped { path: items[i].0.clone(), reason });
            }
            Err(DataError::Unreadable { path, message }) => {
                let others = match failed - 1 {
                    0 => String::new(),
                    1 => "; 1 more image of the split is unreadable".into(),
                    n => format!("; {n} more images of the split are unreadable"),
                };
                return Err(DataError::Unreadable {
                    path,
                    message: format!("{message}{others} (set dataset.skip_corrupt: true to skip unreadable images)"),
                });
            }
            Err(e) => return Err(e),
        }
    }
    images.truncate(kept * bytes);
    Ok(Split { images, labels, image_size })
}

fn folder_split(
    dir: &Path,
    classes: &[String],
    image_size: u32,
    split: &str,
    skip_corrupt: bool,
    skipped: &mut Vec<Skipped>,
) -> Result<Split, DataError> {
    let mut items: Vec<(PathBuf, i64)> = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let files = image_files(&dir.join(class))?;
        if files.is_empty() && split == "train" {
            return Err(DataError::Layout(format!(
                "class directory {} holds no image ({})",
                dir.join(class).display(),
                IMAGE_EXTENSIONS.join(", ")
            )));
        }
        items.extend(files.into_iter().map(|f| (f, label as i64)));
    }
    if items.is_empty() {
        return Err(DataError::Layout(format!("{} holds no image in any class directory", dir.display())));
    }
    let before = skipped.len();
    let split_data = decode_split(&items, image_size, skip_corrupt, skipped)?;
    if split_data.is_empty() {
        return Err(DataError::Layout(format!(
            "every image of {} is unreadable ({} skipped)",
            dir.display(),
            skipped.len() - before
        )));
    }
    Ok(split_data)
}

/// `root/train/<class>/*` and `root/val/<class>/*`: the classes are the sorted subdirectory
/// names of `train/` (hidden ones skipped), and `val/` must have the same set. Files with an
/// extension of [`IMAGE_EXTENSIONS`] are decoded in parallel (see [`decode_split`]); every
/// training class needs at least one image file. With `skip_corrupt`, unreadable images are
/// left out and listed in [`Dataset::skipped`] instead of failing the build.
pub fn image_folder(root: &Path, image_size: u32, skip_corrupt: bool) -> Result<Dataset, DataError> {
    check_size(image_size)?;
    if !root.is_dir() {
        return Err(not_found(root));
    }
    let (train_dir, val_dir) = (root.join("train"), root.join("val"));
    let classes = class_dirs(&train_dir)?;
    if classes.is_empty() {
        return Err(DataError::Layout(format!(
            "{} has no class subdirectory: {IMAGE_FOLDER_LAYOUT}",
            train_dir.display()
        )));
    }
    let val_classes = class_dirs(&val_dir)?;
    if val_classes != classes {
        let (t, v): (BTreeSet<_>, BTreeSet<_>) = (classes.iter().collect(), val_classes.iter().collect());
        let only_train: Vec<_> = t.difference(&v).map(|s| s.as_str()).collect();
        let only_val: Vec<_> = v.difference(&t).map(|s| s.as_str()).collect();
        return Err(DataError::Layout(format!(
            "{} and {} must have the same class subdirectories; only in train: [{}]; only in val: [{}]",
            train_dir.display(),
            val_dir.display(),
            only_train.join(", "),
            only_val.join(", ")
        )));
    }
    let mut skipped = Vec::new();
    let train = folder_split(&train_dir, &classes, image_size, "train", skip_corrupt, &mut skipped)?;
    let val = folder_split(&val_dir, &classes, image_size, "val", skip_corrupt, &mut skipped)?;
    Ok(Dataset { classes, image_size, train, val, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_splits_differ() {
        let a = synthetic(3, 4, 2, 32, 11).unwrap();
        let b = synthetic(3, 4, 2, 32, 11).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.train.len(), 12);
        assert_eq!(a.val.len(), 6);
        assert_eq!(a.train.images.len(), 12 * 3 * 32 * 32);
        assert_eq!(a.train.labels, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert_ne!(a.train.image(0), a.val.image(0));
        assert_ne!(a.train.image(0), a.train.image(1));
        let c = synthetic(3, 4, 2, 32, 12).unwrap();
        assert_ne!(a.train.images, c.train.images);
    }

    #[test]
    fn synthetic_classes_differ_more_than_images_within_a_class() {
        // Mean colour per image: images of one class are closer to their class mean than to
        // other classes' means on average (the classes carry signal).
        let d = synthetic(4, 16, 0, 32, 3).unwrap();
        let mean = |i: usize| -> [f64; 3] {
            let img = d.train.image(i);
            let p = img.len() / 3;
            [0, 1, 2].map(|c| img[c * p..(c + 1) * p].iter().map(|&v| v as f64).sum::<f64>() / p as f64)
        };
        let means: Vec<[f64; 3]> = (0..d.train.len()).map(mean).collect();
        let class_mean = |c: usize| -> [f64; 3] {
            let m: Vec<_> = means[c * 16..(c + 1) * 16].to_vec();
            [0, 1, 2].map(|k| m.iter().map(|x| x[k]).sum::<f64>() / 16.0)
        };
        let centres: Vec<_> = (0..4).map(class_mean).collect();
        let dist = |a: &[f64; 3], b: &[f64; 3]| (0..3).map(|k| (a[k] - b[k]).powi(2)).sum::<f64>().sqrt();
        let mut correct = 0;
        for (i, m) in means.iter().enumerate() {
            let nearest = (0..4).min_by(|&a, &b| dist(m, &centres[a]).total_cmp(&dist(m, &centres[b]))).unwrap();
            correct += (nearest == i / 16) as usize;
        }
        assert!(correct > 16, "nearest-class-mean accuracy {correct}/64 is at chance");
    }

    #[test]
    fn cache_returns_the_same_dataset() {
        let spec = DatasetSpec::Synthetic { classes: 2, train_per_class: 2, val_per_class: 1, image_size: 8, seed: 99 };
        let a = load(&spec).unwrap();
        let b = load(&spec).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn resize_side_scales_256_over_224() {
        assert_eq!(resize_side(224), 256);
        assert_eq!(resize_side(32), 37);
        assert_eq!(resize_side(64), 73);
    }

    #[test]
    fn split_tensors_have_nchw_shape() {
        let d = synthetic(2, 3, 1, 16, 0).unwrap();
        let (x, y) = d.train.to_tensors(Device::Cpu).unwrap();
        assert_eq!(x.size(), vec![6, 3, 16, 16]);
        assert_eq!(x.kind(), Kind::Uint8);
        assert_eq!(y.kind(), Kind::Int64);
        assert_eq!(Vec::<u8>::try_from(&x.get(4).flatten(0, -1)).unwrap(), d.train.image(4));
    }
}
