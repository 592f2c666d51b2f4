//! `image_folder` datasets on fixtures written by the test, and the dataset errors.

use std::path::Path;

use image::{Rgb, RgbImage};
use sweep_core::spec::DatasetSpec;
use sweep_worker::data::{self, DataError};

fn save(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// `w × h`, left half `left`, right half `right`.
fn halves(w: u32, h: u32, left: [u8; 3], right: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |x, _| Rgb(if x < w / 2 { left } else { right }))
}

const RED: [u8; 3] = [255, 0, 0];
const BLUE: [u8; 3] = [0, 0, 255];
const GREEN: [u8; 3] = [0, 255, 0];

fn fixture(root: &Path) {
    save(&root.join("train/dog/b.png"), &halves(64, 64, RED, BLUE));
    save(&root.join("train/dog/a.jpg"), &halves(40, 30, GREEN, GREEN));
    save(&root.join("train/cat/x.PNG"), &halves(30, 60, BLUE, RED));
    save(&root.join("val/cat/v.jpeg"), &halves(48, 48, RED, RED));
    save(&root.join("val/dog/w.png"), &halves(33, 90, BLUE, BLUE));
    std::fs::write(root.join("train/dog/notes.txt"), "not an image").unwrap();
    std::fs::create_dir_all(root.join("train/.hidden")).unwrap();
}

fn pixel(split: &data::Split, i: usize, x: usize, y: usize) -> [u8; 3] {
    let s = split.image_size as usize;
    let img = split.image(i);
    [0, 1, 2].map(|c| img[c * s * s + y * s + x])
}

#[test]
fn image_folder_decodes_resizes_and_crops() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let d = data::image_folder(dir.path(), 32, false).unwrap();
    assert_eq!(d.classes, ["cat", "dog"]);
    assert_eq!(d.image_size, 32);
    // Sorted by class, then by file name.
    assert_eq!(d.train.labels, [0, 1, 1]);
    assert_eq!(d.val.labels, [0, 1]);
    assert_eq!(d.train.images.len(), 3 * 3 * 32 * 32);
    // train/dog/b.png: red | blue, 64 -> 37 -> centre 32: left columns red, right ones blue.
    assert_eq!(pixel(&d.train, 2, 1, 16), RED);
    assert_eq!(pixel(&d.train, 2, 30, 16), BLUE);
    // train/dog/a.jpg: plain green (JPEG, so nearly).
    let g = pixel(&d.train, 1, 16, 16);
    assert!(g[1] > 240 && g[0] < 20 && g[2] < 20, "{g:?}");
    // train/cat/x.PNG, 30 x 60 portrait: resized to 37 x 74, cropped to the middle 32 x 32.
    assert_eq!(pixel(&d.train, 0, 2, 0), BLUE);
    assert_eq!(pixel(&d.train, 0, 29, 31), RED);
    // Through the spec and the cache.
    let spec = DatasetSpec::ImageFolder { root: dir.path().display().to_string(), image_size: 32, skip_corrupt: false };
    assert_eq!(*data::load(&spec).unwrap(), d);
}

#[test]
fn an_unreadable_image_is_an_error_naming_it() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let bad = dir.path().join("train/cat/broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff garbage, not a JPEG").unwrap();
    let e = data::image_folder(dir.path(), 32, false).unwrap_err();
    assert!(e.is_permanent());
    assert!(matches!(&e, DataError::Unreadable { path, .. } if *path == bad), "{e}");
    assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
}

#[test]
fn layout_errors_name_the_directory_and_the_expected_layout() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let e = data::image_folder(&missing, 32, false).unwrap_err();
    assert!(matches!(&e, DataError::NotFound { path, .. } if *path == missing), "{e}");
    assert!(e.to_string().contains("<root>/train/<class>/"), "{e}");

    // No val/.
    save(&dir.path().join("train/a/1.png"), &halves(8, 8, RED, RED));
    let e = data::image_folder(dir.path(), 32, false).unwrap_err();
    assert!(e.to_string().contains(&dir.path().join("val").display().to_string()), "{e}");

    // val/ with other classes.
    save(&dir.path().join("val/b/1.png"), &halves(8, 8, RED, RED));
    let e = data::image_folder(dir.path(), 32, false).unwrap_err().to_string();
    assert!(e.contains("only in train: [a]") && e.contains("only in val: [b]"), "{e}");

    // A training class without images.
    std::fs::create_dir_all(dir.path().join("train/b")).unwrap();
    std::fs::create_dir_all(dir.path().join("val/a")).unwrap();
    let e = data::image_folder(dir.path(), 32, false).unwrap_err().to_string();
    assert!(e.contains(&dir.path().join("train/b").display().to_string()) && e.contains("no image"), "{e}");
}

#[test]
fn synthetic_spec_goes_through_the_cache() {
    let _bound = sweep_tests::bound(600);
    let spec = DatasetSpec::Synthetic { classes: 3, train_per_class: 2, val_per_class: 2, image_size: 16, seed: 4 };
    let a = data::load(&spec).unwrap();
    assert_eq!(a.classes.len(), 3);
    assert_eq!(*a, data::build(&spec).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Prefetching batch producer
// ---------------------------------------------------------------------------------------------

use sweep_core::spec::Augment;
use sweep_worker::augment;
use sweep_worker::data::prefetch::TrainBatches;
use sweep_worker::rng::{Rng, STREAM_AUGMENT};
use tch::{Device, Tensor};

fn pass(x: &Tensor, y: &Tensor, batches: &[Vec<i64>], depth: usize) -> Vec<(Tensor, Tensor)> {
    let rng = Rng::derive(3, &[STREAM_AUGMENT, 1]);
    let producer = TrainBatches::new(x, y, batches.to_vec(), Augment::default(), rng, depth);
    assert_eq!(producer.is_prefetching(), depth > 0 && batches.len() > 1);
    producer
        .map(|b| {
            let b = b.unwrap();
            assert_eq!(b.len as i64, b.images.size()[0]);
            (b.images, b.labels)
        })
        .collect()
}

#[test]
fn prefetching_gives_the_same_batches_bit_for_bit() {
    let _bound = sweep_tests::bound(600);
    let d = data::synthetic(3, 10, 1, 32, 7).unwrap();
    let (x, y) = d.train.to_tensors(Device::Cpu).unwrap();
    let order = Rng::new(1).permutation(30);
    let batches: Vec<Vec<i64>> = order.chunks(8).map(|c| c.to_vec()).collect();
    // The reference: gather and augment inline, drawing from one stream in batch order.
    let mut rng = Rng::derive(3, &[STREAM_AUGMENT, 1]);
    let want: Vec<(Tensor, Tensor)> = batches
        .iter()
        .map(|idx| {
            let t = Tensor::from_slice(idx);
            (
                augment::train_batch(&x.index_select(0, &t), &Augment::default(), &mut rng).unwrap(),
                y.index_select(0, &t),
            )
        })
        .collect();
    for depth in [0, 1, 2, 8] {
        let got = pass(&x, &y, &batches, depth);
        assert_eq!(got.len(), want.len());
        for ((a, la), (b, lb)) in got.iter().zip(&want) {
            assert!(a.equal(b) && la.equal(lb), "depth {depth}: a batch differs");
        }
    }
}

#[test]
fn a_producer_dropped_early_or_failing_ends_cleanly() {
    let _bound = sweep_tests::bound(600);
    let d = data::synthetic(2, 8, 1, 32, 1).unwrap();
    let (x, y) = d.train.to_tensors(Device::Cpu).unwrap();
    let batches: Vec<Vec<i64>> = (0..16).map(|i| vec![i, (i + 1) % 16]).collect();
    // Dropped after one batch while the thread is blocked on the full channel: no hang.
    let mut p = TrainBatches::new(&x, &y, batches.clone(), Augment::default(), Rng::new(0), 1);
    assert!(p.next().unwrap().is_ok());
    assert_eq!(p.remaining(), 15);
    drop(p);
    // An index out of range is an error, and the pass ends there.
    for depth in [0, 2] {
        let mut bad = batches.clone();
        bad[2] = vec![0, 99];
        let results: Vec<_> = TrainBatches::new(&x, &y, bad, Augment::default(), Rng::new(0), depth).collect();
        assert_eq!(results.len(), 3, "depth {depth}");
        assert!(results[0].is_ok() && results[1].is_ok());
        let e = results[2].as_ref().unwrap_err().to_string();
        assert!(e.contains("out of range") || e.contains("index"), "{e}");
    }
}
