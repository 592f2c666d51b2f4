//! Oxford Flowers-102 in the layout of the official archive (Nilsback & Zisserman, 2008).
//!
//! ```text
//! root/jpg/image_00001.jpg … image_08189.jpg
//! root/imagelabels.mat   variable `labels`: 1 × 8189, the class id (1..=102) of every image
//! root/setid.mat         variables `trnid`, `valid`, `tstid`: 1-based image indices
//! ```
//!
//! torchvision's `Flowers102` reads the same files (with `scipy.io.loadmat`) from
//! `<root>/flowers-102/`; here `root` is the folder that holds `jpg/` itself. The class index
//! of an image is its label minus one, and the class names are torchvision's. A split of the
//! dataset is the concatenation, in the listed order, of the official splits named in the spec
//! (`train` → `trnid`, `val` → `valid`, `test` → `tstid`), each in `setid.mat` order; the
//! guide's mapping (the spec's default) trains on `test` and validates on `train` + `val`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sweep_core::spec::FlowersSplit;

use super::{DataError, Dataset, Skipped, check_size, decode_split};
use crate::mat::{MatError, MatFile};

/// Number of classes of Flowers-102.
pub const FLOWERS102_NUM_CLASSES: usize = 102;

/// Class names of Flowers-102, by class index (label − 1), as torchvision names them.
pub const FLOWERS102_CLASSES: [&str; FLOWERS102_NUM_CLASSES] = [
    "pink primrose",
    "hard-leaved pocket orchid",
    "canterbury bells",
    "sweet pea",
    "english marigold",
    "tiger lily",
    "moon orchid",
    "bird of paradise",
    "monkshood",
    "globe thistle",
    "snapdragon",
    "colt's foot",
    "king protea",
    "spear thistle",
    "yellow iris",
    "globe-flower",
    "purple coneflower",
    "peruvian lily",
    "balloon flower",
    "giant white arum lily",
    "fire lily",
    "pincushion flower",
    "fritillary",
    "red ginger",
    "grape hyacinth",
    "corn poppy",
    "prince of wales feathers",
    "stemless gentian",
    "artichoke",
    "sweet william",
    "carnation",
    "garden phlox",
    "love in the mist",
    "mexican aster",
    "alpine sea holly",
    "ruby-lipped cattleya",
    "cape flower",
    "great masterwort",
    "siam tulip",
    "lenten rose",
    "barbeton daisy",
    "daffodil",
    "sword lily",
    "poinsettia",
    "bolero deep blue",
    "wallflower",
    "marigold",
    "buttercup",
    "oxeye daisy",
    "common dandelion",
    "petunia",
    "wild pansy",
    "primula",
    "sunflower",
    "pelargonium",
    "bishop of llandaff",
    "gaura",
    "geranium",
    "orange dahlia",
    "pink-yellow dahlia?",
    "cautleya spicata",
    "japanese anemone",
    "black-eyed susan",
    "silverbush",
    "californian poppy",
    "osteospermum",
    "spring crocus",
    "bearded iris",
    "windflower",
    "tree poppy",
    "gazania",
    "azalea",
    "water lily",
    "rose",
    "thorn apple",
    "morning glory",
    "passion flower",
    "lotus",
    "toad lily",
    "anthurium",
    "frangipani",
    "clematis",
    "hibiscus",
    "columbine",
    "desert-rose",
    "tree mallow",
    "magnolia",
    "cyclamen",
    "watercress",
    "canna lily",
    "hippeastrum",
    "bee balm",
    "ball moss",
    "foxglove",
    "bougainvillea",
    "camellia",
    "mallow",
    "mexican petunia",
    "bromelia",
    "blanket flower",
    "trumpet creeper",
    "blackberry lily",
];

/// What a `flowers102` root must hold.
pub const FLOWERS102_LAYOUT: &str = "a flowers102 dataset needs <root>/jpg/image_00001.jpg …, <root>/imagelabels.mat (variable `labels`) and <root>/setid.mat (variables `trnid`, `valid`, `tstid`), as in the official archive";

/// The `setid.mat` variable of an official split.
pub fn setid_variable(split: FlowersSplit) -> &'static str {
    match split {
        FlowersSplit::Train => "trnid",
        FlowersSplit::Val => "valid",
        FlowersSplit::Test => "tstid",
    }
}

/// The file of image `id` (1-based): `root/jpg/image_{id:05}.jpg`.
pub fn image_path(root: &Path, id: u32) -> PathBuf {
    root.join("jpg").join(format!("image_{id:05}.jpg"))
}

fn not_found(path: &Path, root: &Path) -> DataError {
    let mut expected = FLOWERS102_LAYOUT.to_string();
    let torchvision = root.join("flowers-102");
    if torchvision.join("jpg").is_dir() {
        expected.push_str(&format!(
            "; {} looks like torchvision's copy of the dataset: set dataset.root to it",
            torchvision.display()
        ));
    }
    DataError::NotFound { path: path.to_path_buf(), expected }
}

fn read_mat(path: &Path, root: &Path) -> Result<MatFile, DataError> {
    if !path.is_file() {
        return Err(not_found(path, root));
    }
    MatFile::open(path).map_err(|e| mat_error(path, e))
}

fn mat_error(path: &Path, e: MatError) -> DataError {
    match e {
        MatError::Io(message) => DataError::Unreadable { path: path.to_path_buf(), message },
        e @ (MatError::NotLevel5(_) | MatError::Malformed { .. }) => {
            DataError::Unreadable { path: path.to_path_buf(), message: e.to_string() }
        }
        e @ (MatError::MissingVariable { .. } | MatError::WrongShape { .. }) => {
            DataError::BadContent { path: path.to_path_buf(), message: e.to_string() }
        }
    }
}

/// The values of the numeric vector `name` of `mat`, each an integer in `1..=max`, as `u32`.
/// `what` names a value in messages ("class id", "image index").
fn ids(mat: &MatFile, path: &Path, name: &str, max: usize, what: &str, why: &str) -> Result<Vec<u32>, DataError> {
    let values = mat.variable(name).and_then(|v| v.vector()).map_err(|e| mat_error(path, e))?;
    values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if x.fract() == 0.0 && x >= 1.0 && x <= max as f64 {
                Ok(x as u32)
            } else {
                Err(DataError::BadContent {
                    path: path.to_path_buf(),
                    message: format!("{name}({}) = {x} is not {what} in 1..={max}{why}", i + 1),
                })
            }
        })
        .collect()
}

/// The class index (label − 1) of every image, from `imagelabels.mat`.
pub fn read_labels(path: &Path) -> Result<Vec<i64>, DataError> {
    let root = path.parent().unwrap_or(Path::new("."));
    let mat = read_mat(path, root)?;
    let labels = ids(&mat, path, "labels", FLOWERS102_NUM_CLASSES, "a class id", "")?;
    if labels.is_empty() {
        return Err(DataError::BadContent { path: path.to_path_buf(), message: "variable `labels` is empty".into() });
    }
    Ok(labels.into_iter().map(|l| l as i64 - 1).collect())
}

/// The 1-based image indices of `splits`, concatenated in order, from `setid.mat`; every
/// index must be in `1..=images` (the number of labels).
pub fn read_split_ids(path: &Path, splits: &[FlowersSplit], images: usize) -> Result<Vec<u32>, DataError> {
    let root = path.parent().unwrap_or(Path::new("."));
    let mat = read_mat(path, root)?;
    let why = format!(" (imagelabels.mat has {images} labels)");
    let mut out = Vec::new();
    for &split in splits {
        out.extend(ids(&mat, path, setid_variable(split), images, "an image index", &why)?);
    }
    Ok(out)
}

fn split_names(splits: &[FlowersSplit]) -> String {
    format!("[{}]", splits.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "))
}

/// Builds Flowers-102 from `root` (see the module documentation): the training split is the
/// concatenation of `train_split`, the validation split that of `val_split`. Images are decoded
/// in parallel, resized and centre-cropped to `image_size` (see [`super::decode_split`]); with
/// `skip_corrupt`, unreadable images are left out and listed in [`Dataset::skipped`].
///
/// Errors name the file and what is wrong: a missing root, `jpg/` or `.mat` file, a file that is
/// not a level-5 MAT-file, a missing variable, a variable that is not a vector, a label outside
/// `1..=102`, an image index outside the labelled images, an image in both the training and the
/// validation split, an empty split, an unreadable image.
pub fn flowers102(
    root: &Path,
    train_split: &[FlowersSplit],
    val_split: &[FlowersSplit],
    image_size: u32,
    skip_corrupt: bool,
) -> Result<Dataset, DataError> {
    check_size(image_size)?;
    if train_split.is_empty() || val_split.is_empty() {
        return Err(DataError::Unsupported(
            "a flowers102 dataset needs at least one training and one validation split".into(),
        ));
    }
    if !root.is_dir() {
        return Err(not_found(root, root));
    }
    let jpg = root.join("jpg");
    if !jpg.is_dir() {
        return Err(not_found(&jpg, root));
    }
    let labels_path = root.join("imagelabels.mat");
    let setid_path = root.join("setid.mat");
    if !labels_path.is_file() {
        return Err(not_found(&labels_path, root));
    }
    if !setid_path.is_file() {
        return Err(not_found(&setid_path, root));
    }
    let labels = read_labels(&labels_path)?;
    let train_ids = read_split_ids(&setid_path, train_split, labels.len())?;
    let val_ids = read_split_ids(&setid_path, val_split, labels.len())?;
    let in_train: HashSet<u32> = train_ids.iter().copied().collect();
    if let Some(id) = val_ids.iter().find(|id| in_train.contains(id)) {
        return Err(DataError::BadContent {
            path: setid_path,
            message: format!(
                "image {id} ({}) is in both the training splits {} and the validation splits {}",
                image_path(root, *id).display(),
                split_names(train_split),
                split_names(val_split)
            ),
        });
    }
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut split = |ids: &[u32], splits: &[FlowersSplit], role: &str| {
        if ids.is_empty() {
            return Err(DataError::Layout(format!(
                "the {role} splits {} of {} hold no image",
                split_names(splits),
                setid_path.display()
            )));
        }
        let items: Vec<(PathBuf, i64)> =
            ids.iter().map(|&id| (image_path(root, id), labels[id as usize - 1])).collect();
        let before = skipped.len();
        let decoded = decode_split(&items, image_size, skip_corrupt, &mut skipped)?;
        if decoded.is_empty() {
            return Err(DataError::Layout(format!(
                "every image of the {role} splits {} is unreadable ({} skipped)",
                split_names(splits),
                skipped.len() - before
            )));
        }
        Ok(decoded)
    };
    let train = split(&train_ids, train_split, "training")?;
    let val = split(&val_ids, val_split, "validation")?;
    Ok(Dataset { classes: FLOWERS102_CLASSES.iter().map(|c| c.to_string()).collect(), image_size, train, val, skipped })
}
