//! `flowers102` datasets on small fixtures written by the test: a few JPEGs in `jpg/` and
//! `imagelabels.mat` / `setid.mat` written by a minimal MAT-file level-5 writer (compressed, as
//! MATLAB's `save -v7` writes them, and uncompressed). The MAT reader itself is also tested on
//! files written byte by byte from the specification (`sweep_worker::mat`'s unit tests).

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use sweep_core::spec::{self, DatasetSpec, FlowersSplit};
use sweep_worker::data::{self, DataError, Skipped, flowers};
use sweep_worker::mat::{Class, MatFile};

// ---------------------------------------------------------------------------------------------
// A minimal MAT-file level-5 writer (little-endian).
// ---------------------------------------------------------------------------------------------

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_DOUBLE: u32 = 9;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MX_DOUBLE: u32 = 6;
const MX_UINT8: u32 = 9;

/// A data element: the small format for at most 4 bytes, else a tag and data padded to 8.
fn element(ty: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if data.len() <= 4 {
        out.extend_from_slice(&(ty | ((data.len() as u32) << 16)).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(8, 0);
    } else {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(8 + data.len().div_ceil(8) * 8, 0);
    }
    out
}

/// A variable of class `class` and dimensions `dims`, its values stored as `storage`.
fn matrix(name: &str, class: u32, dims: &[i32], storage: u32, values: &[f64]) -> Vec<u8> {
    let data: Vec<u8> = match storage {
        MI_DOUBLE => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        MI_UINT8 => values.iter().map(|&v| v as u8).collect(),
        MI_UINT16 => values.iter().flat_map(|&v| (v as u16).to_le_bytes()).collect(),
        MI_INT32 => values.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect(),
        _ => panic!("storage type {storage}"),
    };
    let mut body = element(MI_UINT32, &[class.to_le_bytes(), 0u32.to_le_bytes()].concat());
    body.extend(element(MI_INT32, &dims.iter().flat_map(|d| d.to_le_bytes()).collect::<Vec<u8>>()));
    body.extend(element(MI_INT8, name.as_bytes()));
    body.extend(element(storage, &data));
    let mut out = MI_MATRIX.to_le_bytes().to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// A row vector of doubles stored as `storage` (MATLAB picks the smallest integer type).
fn row(name: &str, storage: u32, values: &[f64]) -> Vec<u8> {
    matrix(name, MX_DOUBLE, &[1, values.len() as i32], storage, values)
}

/// A file of `variables`, each compressed (miCOMPRESSED, unpadded) or not.
fn mat_file(variables: &[Vec<u8>], compressed: bool) -> Vec<u8> {
    let mut f = b"MATLAB 5.0 MAT-file, written by sweep's tests".to_vec();
    f.resize(116, b' ');
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&[0x00, 0x01, b'I', b'M']);
    for v in variables {
        if compressed {
            let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(v).unwrap();
            let z = enc.finish().unwrap();
            f.extend_from_slice(&MI_COMPRESSED.to_le_bytes());
            f.extend_from_slice(&(z.len() as u32).to_le_bytes());
            f.extend(z);
        } else {
            f.extend_from_slice(v);
        }
    }
    f
}

#[test]
fn the_writer_and_the_reader_agree() {
    let _bound = sweep_tests::bound(600);
    for compressed in [false, true] {
        let f = mat_file(
            &[
                row("labels", MI_UINT8, &[1.0, 102.0, 77.0]),
                row("trnid", MI_UINT16, &[8189.0, 1.0]),
                row("valid", MI_DOUBLE, &[2.5]),
                matrix("m", MX_UINT8, &[2, 2], MI_UINT8, &[1.0, 2.0, 3.0, 4.0]),
                matrix("big", MX_DOUBLE, &[1, 3], MI_INT32, &[-7.0, 100_000.0, 0.0]),
            ],
            compressed,
        );
        let m = MatFile::parse(&f).unwrap();
        assert_eq!(m.variable("labels").unwrap().vector().unwrap(), [1.0, 102.0, 77.0]);
        assert_eq!(m.variable("trnid").unwrap().vector().unwrap(), [8189.0, 1.0]);
        assert_eq!(m.variable("valid").unwrap().vector().unwrap(), [2.5]);
        assert_eq!(m.variable("big").unwrap().vector().unwrap(), [-7.0, 100_000.0, 0.0]);
        let mm = m.variable("m").unwrap();
        assert_eq!((mm.class, mm.dims.clone()), (Class::Uint8, vec![2, 2]));
        assert!(mm.vector().is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Class ids (1-based) of images 1..=12.
const LABELS: [u32; 12] = [1, 2, 3, 102, 1, 2, 3, 102, 50, 1, 2, 3];
const TRNID: [u32; 3] = [1, 2, 3];
const VALID: [u32; 3] = [5, 4, 6];
/// Not in order, and not every image: setid order is the split's order.
const TSTID: [u32; 5] = [12, 9, 11, 10, 8];

/// The colour of class id `label`.
fn colour(label: u32) -> [u8; 3] {
    [(label * 2) as u8, 255 - (label * 2) as u8, ((label * 97) % 256) as u8]
}

fn write_image(root: &Path, id: u32, w: u32, h: u32) {
    let c = colour(LABELS[id as usize - 1]);
    RgbImage::from_fn(w, h, |_, _| Rgb(c)).save(flowers::image_path(root, id)).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// The official layout with 12 JPEGs of varied sizes (landscape and portrait, like the real
/// ones), `imagelabels.mat` compressed with the labels stored as miUINT8 (as MATLAB stores a
/// double array of small integers), `setid.mat` uncompressed with the indices as miUINT16.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("flowers");
    std::fs::create_dir_all(root.join("jpg")).unwrap();
    for id in 1..=12u32 {
        let (w, h) = if id % 3 == 0 { (40, 56) } else { (50 + id, 38) };
        write_image(&root, id, w, h);
    }
    let labels: Vec<f64> = LABELS.iter().map(|&l| l as f64).collect();
    std::fs::write(root.join("imagelabels.mat"), mat_file(&[row("labels", MI_UINT8, &labels)], true)).unwrap();
    write_setid(&root, &TRNID, &VALID, &TSTID);
    Fixture { _dir: dir, root }
}

fn write_setid(root: &Path, trn: &[u32], val: &[u32], tst: &[u32]) {
    let f = |v: &[u32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let vars = [row("trnid", MI_UINT16, &f(trn)), row("valid", MI_UINT16, &f(val)), row("tstid", MI_DOUBLE, &f(tst))];
    std::fs::write(root.join("setid.mat"), mat_file(&vars, false)).unwrap();
}

fn spec_of(root: &Path, splits: &str, extra: &str) -> DatasetSpec {
    let yaml = format!(
        "name: f
dataset: {{ kind: flowers102, root: '{}', image_size: 32{splits}{extra} }}
grid: {{ backbone: [resnet18], lr_decay: [{{ strategy: exponential, head_lr: 1.0e-4, factor: 3 }}], epoch_split: [[1, 1]] }}
",
        root.display()
    );
    spec::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}")).dataset
}

fn centre(split: &data::Split, i: usize) -> [u8; 3] {
    let s = split.image_size as usize;
    let img = split.image(i);
    [0, 1, 2].map(|c| img[c * s * s + (s / 2) * s + s / 2])
}

fn labels_of(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| LABELS[id as usize - 1] as i64 - 1).collect()
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(&x, y)| (x as i32 - y as i32).abs() <= 6)
}

/// Every image of `split` has the colour of its label.
fn assert_colours(split: &data::Split) {
    for i in 0..split.len() {
        let want = colour(split.labels[i] as u32 + 1);
        assert!(close(centre(split, i), want), "image {i}: {:?} vs {want:?}", centre(split, i));
    }
}

// ---------------------------------------------------------------------------------------------
// Datasets
// ---------------------------------------------------------------------------------------------

#[test]
fn the_default_mapping_trains_on_test_and_validates_on_train_and_val() {
    let _bound = sweep_tests::bound(600);
    let f = fixture();
    let spec = spec_of(&f.root, "", "");
    let d = data::load(&spec).unwrap();
    assert_eq!(d.classes.len(), 102);
    assert_eq!((d.classes[0].as_str(), d.classes[101].as_str()), ("pink primrose", "blackberry lily"));
    assert_eq!(d.image_size, 32);
    assert_eq!(d.train.labels, labels_of(&TSTID), "the test split, in setid order");
    assert_eq!(d.val.labels, labels_of(&[TRNID.as_slice(), &VALID].concat()), "train, then val");
    assert_eq!(d.train.images.len(), TSTID.len() * 3 * 32 * 32);
    assert_colours(&d.train);
    assert_colours(&d.val);
    assert!(d.skipped().is_empty() && d.skipped_count() == 0);
    // The same through the free function.
    let direct =
        data::flowers102(&f.root, &[FlowersSplit::Test], &[FlowersSplit::Train, FlowersSplit::Val], 32, false).unwrap();
    assert_eq!(*d, direct);
}

#[test]
fn a_custom_mapping_is_honoured() {
    let _bound = sweep_tests::bound(600);
    let f = fixture();
    let spec = spec_of(&f.root, ", train_split: [val, train], val_split: [test]", "");
    let d = data::build(&spec).unwrap();
    assert_eq!(d.train.labels, labels_of(&[VALID.as_slice(), &TRNID].concat()));
    assert_eq!(d.val.labels, labels_of(&TSTID));
    assert_colours(&d.train);
    // Pixels are the decoded images: the same image gives the same bytes in either split.
    let dflt = data::build(&spec_of(&f.root, "", "")).unwrap();
    assert_eq!(d.val.images, dflt.train.images);
}

#[test]
fn unreadable_images_fail_the_build_unless_skip_corrupt() {
    let _bound = sweep_tests::bound(600);
    let f = fixture();
    // Image 10 is in the training split (test), image 5 in the validation split (val).
    for id in [10, 5] {
        std::fs::write(flowers::image_path(&f.root, id), b"\xff\xd8\xff not a JPEG at all").unwrap();
    }
    let bad10 = flowers::image_path(&f.root, 10);
    let e = data::build(&spec_of(&f.root, "", "")).unwrap_err();
    assert!(e.is_permanent());
    assert!(matches!(&e, DataError::Unreadable { path, .. } if *path == bad10), "{e}");
    assert!(e.to_string().contains("skip_corrupt"), "{e}");
    // An image listed in setid.mat but missing from jpg/ is unreadable too.
    std::fs::remove_file(flowers::image_path(&f.root, 9)).unwrap();
    let bad9 = flowers::image_path(&f.root, 9);
    let e = data::build(&spec_of(&f.root, "", ", skip_corrupt: false")).unwrap_err();
    assert!(matches!(&e, DataError::Unreadable { path, .. } if *path == bad9), "the first in split order: {e}");
    assert!(e.to_string().contains("1 more image of the split is unreadable"), "{e}");

    let d = data::build(&spec_of(&f.root, "", ", skip_corrupt: true")).unwrap();
    let paths: Vec<&PathBuf> = d.skipped().iter().map(|s: &Skipped| &s.path).collect();
    assert_eq!(paths, [&bad9, &bad10, &flowers::image_path(&f.root, 5)], "training images first, in split order");
    assert_eq!(d.skipped_count(), 3);
    assert!(d.skipped().iter().all(|s| !s.reason.is_empty()));
    assert_eq!(d.train.labels, labels_of(&[12, 11, 8]));
    assert_eq!(d.val.labels, labels_of(&[1, 2, 3, 4, 6]));
    assert_colours(&d.train);
    assert_colours(&d.val);

    // A split whose every image is unreadable is an error even with skip_corrupt.
    for id in TRNID {
        std::fs::write(flowers::image_path(&f.root, id), b"garbage").unwrap();
    }
    let e = data::build(&spec_of(&f.root, ", train_split: [train], val_split: [test]", ", skip_corrupt: true"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("every image of the training splits [train] is unreadable (3 skipped)"), "{e}");
}

#[test]
fn image_folder_skips_corrupt_images_too() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    for (path, c) in [("train/a/1.png", [200, 0, 0]), ("train/b/1.png", [0, 200, 0]), ("val/a/1.png", [0, 0, 200])] {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        RgbImage::from_fn(20, 20, |_, _| Rgb(c)).save(&p).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("val/b")).unwrap();
    let bad = dir.path().join("train/a/0.jpg");
    std::fs::write(&bad, b"nope").unwrap();
    let e = data::image_folder(dir.path(), 8, false).unwrap_err();
    assert!(matches!(&e, DataError::Unreadable { path, .. } if *path == bad), "{e}");
    let d = data::image_folder(dir.path(), 8, true).unwrap();
    assert_eq!(d.skipped().len(), 1);
    assert_eq!(d.skipped()[0].path, bad);
    assert_eq!(d.train.labels, [0, 1]);
    // Through the spec: the dataset reports its skipped images.
    let spec = DatasetSpec::ImageFolder { root: dir.path().display().to_string(), image_size: 8, skip_corrupt: true };
    assert_eq!(data::build(&spec).unwrap().skipped_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

fn build_err(root: &Path) -> DataError {
    data::flowers102(root, &[FlowersSplit::Test], &[FlowersSplit::Train, FlowersSplit::Val], 16, false).unwrap_err()
}

#[test]
fn missing_files_are_named() {
    let _bound = sweep_tests::bound(600);
    let f = fixture();
    let missing = f.root.join("nope");
    let e = build_err(&missing);
    assert!(matches!(&e, DataError::NotFound { path, .. } if *path == missing), "{e}");
    assert!(e.to_string().contains("<root>/jpg/image_00001.jpg") && e.to_string().contains("setid.mat"), "{e}");

    for file in ["setid.mat", "imagelabels.mat"] {
        let path = f.root.join(file);
        let saved = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let e = build_err(&f.root);
        assert!(matches!(&e, DataError::NotFound { path: p, .. } if *p == path), "{e}");
        std::fs::write(&path, saved).unwrap();
    }

    std::fs::rename(f.root.join("jpg"), f.root.join("images")).unwrap();
    let e = build_err(&f.root);
    assert!(matches!(&e, DataError::NotFound { path, .. } if *path == f.root.join("jpg")), "{e}");

    // torchvision's layout one level down: the message says where the dataset is.
    let parent = f.root.parent().unwrap().join("tv");
    std::fs::create_dir_all(parent.join("flowers-102/jpg")).unwrap();
    let e = build_err(&parent).to_string();
    assert!(e.contains(&format!("{} looks like torchvision's copy", parent.join("flowers-102").display())), "{e}");
}

#[test]
fn bad_mat_content_is_an_error_naming_the_file_and_the_problem() {
    let _bound = sweep_tests::bound(600);
    let f = fixture();
    let labels_path = f.root.join("imagelabels.mat");
    let setid_path = f.root.join("setid.mat");
    let with_labels = |vars: &[Vec<u8>]| std::fs::write(&labels_path, mat_file(vars, true)).unwrap();
    let labels: Vec<f64> = LABELS.iter().map(|&l| l as f64).collect();
    let expect = |path: &Path, what: &str| {
        let e = build_err(&f.root);
        assert!(e.is_permanent());
        let text = e.to_string();
        assert!(text.starts_with(&path.display().to_string()) || text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains(what), "want {what:?} in: {text}");
    };

    std::fs::write(&labels_path, "labels = [1 2 3]").unwrap();
    expect(&labels_path, "not a MATLAB level-5 MAT-file");
    std::fs::write(&labels_path, &mat_file(&[row("labels", MI_UINT8, &labels)], false)[..150]).unwrap();
    expect(&labels_path, "truncated");
    with_labels(&[row("lbl", MI_UINT8, &labels)]);
    expect(&labels_path, "no variable `labels` (the file holds: lbl)");
    with_labels(&[matrix("labels", MX_DOUBLE, &[3, 4], MI_UINT8, &labels)]);
    expect(&labels_path, "variable `labels` is a 3×4 matrix, not a vector");
    let mut bad = labels.clone();
    bad[3] = 103.0;
    with_labels(&[row("labels", MI_UINT8, &bad)]);
    expect(&labels_path, "labels(4) = 103 is not a class id in 1..=102");
    bad[3] = 0.0;
    with_labels(&[row("labels", MI_UINT8, &bad)]);
    expect(&labels_path, "labels(4) = 0 is not a class id in 1..=102");
    bad[3] = 1.5;
    with_labels(&[row("labels", MI_DOUBLE, &bad)]);
    expect(&labels_path, "labels(4) = 1.5 is not a class id");
    with_labels(&[row("labels", MI_UINT8, &[])]);
    expect(&labels_path, "variable `labels` is empty");
    with_labels(&[row("labels", MI_UINT8, &labels)]);

    // setid.mat.
    write_setid(&f.root, &TRNID, &VALID, &[12, 13]);
    expect(&setid_path, "tstid(2) = 13 is not an image index in 1..=12 (imagelabels.mat has 12 labels)");
    std::fs::write(&setid_path, mat_file(&[row("trnid", MI_UINT16, &[1.0]), row("valid", MI_UINT16, &[2.0])], true))
        .unwrap();
    expect(&setid_path, "no variable `tstid` (the file holds: trnid, valid)");
    write_setid(&f.root, &TRNID, &VALID, &[7, 3]);
    expect(&setid_path, "image 3 (");
    expect(&setid_path, "is in both the training splits [test] and the validation splits [train, val]");
    write_setid(&f.root, &TRNID, &VALID, &[]);
    let e = build_err(&f.root).to_string();
    assert!(e.contains("the training splits [test] of") && e.contains("hold no image"), "{e}");
}

#[test]
fn the_cache_key_includes_the_split_mapping() {
    let _bound = sweep_tests::bound(600);
    let f = fixture();
    let a = data::load(&spec_of(&f.root, "", "")).unwrap();
    let b = data::load(&spec_of(&f.root, ", train_split: [train], val_split: [val]", "")).unwrap();
    assert_ne!(a.train.len(), b.train.len());
    assert_eq!(b.train.labels, labels_of(&TRNID));
}
