//! A reader for MATLAB level-5 MAT-files (the format of `save -v6` and `save -v7`), limited to
//! what a dataset needs: the numeric arrays of a file, by name.
//!
//! The format (MathWorks, "MAT-File Format", level 5):
//! * a 128-byte header: 116 bytes of descriptive text, 8 bytes of subsystem offset, a 2-byte
//!   version (`0x0100`) and a 2-byte endian indicator, `IM` when the file was written
//!   little-endian and `MI` when big-endian;
//! * then data elements, each an 8-byte tag (`u32` data type, `u32` number of bytes) followed by
//!   its data, padded to a multiple of 8 bytes inside arrays. A *small data element* packs a
//!   type and a size of at most 4 bytes into the first 4 bytes of the tag (size in the upper 16
//!   bits, type in the lower 16) and its data into the other 4;
//! * a variable is an `miMATRIX` element holding, in order, the array flags (`miUINT32`: class
//!   and the complex/global/logical bits), the dimensions (`miINT32`), the name (`miINT8`) and
//!   for numeric classes the real part (then the imaginary part when complex), stored in any
//!   numeric data type — MATLAB saves a `double` array whose values fit in `uint8` as `miUINT8`;
//! * `save -v7` compresses each variable: an `miCOMPRESSED` element whose data is a zlib stream
//!   of one `miMATRIX` element. Top-level elements are not padded.
//!
//! Numeric values of every storage type are read as `f64` (exact for integers up to 2^53).
//! Cells, structs, character and sparse arrays are listed with their class and dimensions but
//! not decoded. MAT-file v7.3 (HDF5) and level-4 files are refused with a message saying so.
//! Every malformed input is an error, never a panic.

use std::io::Read;
use std::path::Path;

/// Largest decompressed size of one compressed variable (a bound against zip bombs).
pub const MAX_DECOMPRESSED_BYTES: u64 = 1 << 30;

const HEADER_BYTES: usize = 128;

/// MAT-file data types (the `type` of a data element tag).
pub mod mi {
    /// 8-bit signed integer.
    pub const INT8: u32 = 1;
    /// 8-bit unsigned integer.
    pub const UINT8: u32 = 2;
    /// 16-bit signed integer.
    pub const INT16: u32 = 3;
    /// 16-bit unsigned integer.
    pub const UINT16: u32 = 4;
    /// 32-bit signed integer.
    pub const INT32: u32 = 5;
    /// 32-bit unsigned integer.
    pub const UINT32: u32 = 6;
    /// IEEE 754 single precision.
    pub const SINGLE: u32 = 7;
    /// IEEE 754 double precision.
    pub const DOUBLE: u32 = 9;
    /// 64-bit signed integer.
    pub const INT64: u32 = 12;
    /// 64-bit unsigned integer.
    pub const UINT64: u32 = 13;
    /// An array (a variable).
    pub const MATRIX: u32 = 14;
    /// A zlib-compressed data element.
    pub const COMPRESSED: u32 = 15;
    /// UTF-8 text.
    pub const UTF8: u32 = 16;
    /// UTF-16 text.
    pub const UTF16: u32 = 17;
    /// UTF-32 text.
    pub const UTF32: u32 = 18;
}

/// Why a MAT-file could not be read. The messages say what is wrong; callers add the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatError {
    /// The file could not be read from disk.
    #[error("{0}")]
    Io(String),
    /// The bytes are not a level-5 MAT-file (too short, no endian indicator, another version).
    #[error("not a MATLAB level-5 MAT-file: {0}")]
    NotLevel5(String),
    /// The file is a level-5 MAT-file but its data elements are inconsistent or truncated.
    #[error("malformed MAT-file at byte {offset}: {message}")]
    Malformed {
        /// Offset of the offending data element (in the decompressed stream for a compressed
        /// variable, which the message then names).
        offset: usize,
        /// What is wrong.
        message: String,
    },
    /// The file has no variable of this name.
    #[error("no variable `{name}` (the file holds: {})", if present.is_empty() { "no variable".to_string() } else { present.join(", ") })]
    MissingVariable {
        /// The variable asked for.
        name: String,
        /// The names the file holds, in file order.
        present: Vec<String>,
    },
    /// The variable exists but is not what the caller needs (not numeric, not a vector).
    #[error("variable `{name}` {message}")]
    WrongShape {
        /// The variable.
        name: String,
        /// What it is instead.
        message: String,
    },
}

fn malformed(offset: usize, message: impl Into<String>) -> MatError {
    MatError::Malformed { offset, message: message.into() }
}

/// MATLAB array classes (`mxCLASS` in the array flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Cell array (not decoded).
    Cell,
    /// Structure (not decoded).
    Struct,
    /// Object (not decoded).
    Object,
    /// Character array (not decoded).
    Char,
    /// Sparse array (not decoded).
    Sparse,
    /// `double`.
    Double,
    /// `single`.
    Single,
    /// `int8`.
    Int8,
    /// `uint8` (also `logical`, with the logical flag).
    Uint8,
    /// `int16`.
    Int16,
    /// `uint16`.
    Uint16,
    /// `int32`.
    Int32,
    /// `uint32`.
    Uint32,
    /// `int64`.
    Int64,
    /// `uint64`.
    Uint64,
    /// Any other class code (function handles, opaque objects).
    Other(u8),
}

impl Class {
    fn from_code(code: u8) -> Class {
        match code {
            1 => Class::Cell,
            2 => Class::Struct,
            3 => Class::Object,
            4 => Class::Char,
            5 => Class::Sparse,
            6 => Class::Double,
            7 => Class::Single,
            8 => Class::Int8,
            9 => Class::Uint8,
            10 => Class::Int16,
            11 => Class::Uint16,
            12 => Class::Int32,
            13 => Class::Uint32,
            14 => Class::Int64,
            15 => Class::Uint64,
            c => Class::Other(c),
        }
    }

    /// True for the numeric classes, whose values this reader decodes.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            Class::Double
                | Class::Single
                | Class::Int8
                | Class::Uint8
                | Class::Int16
                | Class::Uint16
                | Class::Int32
                | Class::Uint32
                | Class::Int64
                | Class::Uint64
        )
    }

    /// MATLAB's name of the class.
    pub fn name(self) -> String {
        match self {
            Class::Cell => "cell".into(),
            Class::Struct => "struct".into(),
            Class::Object => "object".into(),
            Class::Char => "char".into(),
            Class::Sparse => "sparse".into(),
            Class::Double => "double".into(),
            Class::Single => "single".into(),
            Class::Int8 => "int8".into(),
            Class::Uint8 => "uint8".into(),
            Class::Int16 => "int16".into(),
            Class::Uint16 => "uint16".into(),
            Class::Int32 => "int32".into(),
            Class::Uint32 => "uint32".into(),
            Class::Int64 => "int64".into(),
            Class::Uint64 => "uint64".into(),
            Class::Other(c) => format!("class {c}"),
        }
    }
}

/// One variable of a MAT-file.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// Variable name.
    pub name: String,
    /// Array class.
    pub class: Class,
    /// Dimensions (at least two, MATLAB order: rows, columns, …).
    pub dims: Vec<usize>,
    /// True when the array has an imaginary part (read and checked, not kept).
    pub complex: bool,
    /// True for `logical` arrays.
    pub logical: bool,
    /// The real part in column-major order for numeric classes; `None` for other classes.
    pub real: Option<Vec<f64>>,
}

impl Array {
    /// Number of elements (product of the dimensions).
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// True when the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `"1×8189"`.
    pub fn shape(&self) -> String {
        self.dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("×")
    }

    /// The values of a real numeric vector (`1×N`, `N×1`, or any shape with at most one
    /// dimension other than 1), in order.
    pub fn vector(&self) -> Result<&[f64], MatError> {
        let wrong = |message: String| MatError::WrongShape { name: self.name.clone(), message };
        let Some(real) = self.real.as_deref() else {
            return Err(wrong(format!("is a {} {} array, not a numeric vector", self.shape(), self.class.name())));
        };
        if self.complex {
            return Err(wrong(format!("is a complex {} array, not a real vector", self.shape())));
        }
        if self.dims.iter().filter(|&&d| d != 1).count() > 1 {
            return Err(wrong(format!("is a {} matrix, not a vector", self.shape())));
        }
        Ok(real)
    }
}

/// The variables of a MAT-file, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct MatFile {
    /// The descriptive text of the header (`MATLAB 5.0 MAT-file, Platform: …`), trimmed.
    pub description: String,
    /// True when the file was written big-endian (`MI`).
    pub big_endian: bool,
    /// The variables.
    pub variables: Vec<Array>,
}

impl MatFile {
    /// Reads and parses the file at `path`.
    pub fn open(path: &Path) -> Result<MatFile, MatError> {
        let bytes = std::fs::read(path).map_err(|e| MatError::Io(e.to_string()))?;
        MatFile::parse(&bytes)
    }

    /// Parses the bytes of a MAT-file.
    pub fn parse(bytes: &[u8]) -> Result<MatFile, MatError> {
        if bytes.len() < HEADER_BYTES {
            return Err(MatError::NotLevel5(format!(
                "the file has {} bytes, fewer than the {HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        let text = String::from_utf8_lossy(&bytes[..116]).trim_end_matches(['\0', ' ']).to_string();
        let big_endian = match &bytes[126..128] {
            b"IM" => false,
            b"MI" => true,
            other => {
                let hdf5 = bytes.len() >= 520 && &bytes[512..520] == b"\x89HDF\r\n\x1a\n";
                return Err(MatError::NotLevel5(if hdf5 {
                    "it is an HDF5 (MAT-file v7.3) file; save it with -v7 or -v6".into()
                } else if text.starts_with("MATLAB") {
                    format!("bad endian indicator {other:?} at bytes 126-127 (want \"IM\" or \"MI\")")
                } else {
                    "no `MATLAB 5.0 MAT-file` header and no endian indicator (a level-4 or another file?)".into()
                }));
            }
        };
        let r = Reader { bytes, big_endian, context: "" };
        let version = r.u16_at(124);
        if version != 0x0100 {
            return Err(MatError::NotLevel5(if version == 0x0200 {
                "it is a MAT-file v7.3 (HDF5); save it with -v7 or -v6".into()
            } else {
                format!("version {version:#06x} in the header (want 0x0100)")
            }));
        }
        let mut variables = Vec::new();
        let mut pos = HEADER_BYTES;
        while pos < bytes.len() {
            if bytes.len() - pos < 8 {
                if bytes[pos..].iter().all(|&b| b == 0) {
                    break;
                }
                return Err(malformed(pos, format!("{} stray bytes after the last data element", bytes.len() - pos)));
            }
            let el = r.element(pos, false)?;
            match el.ty {
                mi::MATRIX => {
                    if let Some(a) = r.matrix(pos, el.data_start, el.data)? {
                        variables.push(a);
                    }
                }
                mi::COMPRESSED => variables.extend(decompressed_matrix(pos, el.data, big_endian)?),
                ty => {
                    return Err(malformed(
                        pos,
                        format!(
                            "data element of type {ty} at the top level (want a variable: miMATRIX or miCOMPRESSED)"
                        ),
                    ));
                }
            }
            pos = el.next;
        }
        Ok(MatFile { description: text.trim().to_string(), big_endian, variables })
    }

    /// The variable `name`.
    pub fn get(&self, name: &str) -> Option<&Array> {
        self.variables.iter().find(|v| v.name == name)
    }

    /// The variable `name`, or an error listing the variables the file holds.
    pub fn variable(&self, name: &str) -> Result<&Array, MatError> {
        self.get(name).ok_or_else(|| MatError::MissingVariable {
            name: name.to_string(),
            present: self.variables.iter().map(|v| v.name.clone()).collect(),
        })
    }
}

/// The `miMATRIX` in the zlib stream of an `miCOMPRESSED` element at `offset`.
fn decompressed_matrix(offset: usize, data: &[u8], big_endian: bool) -> Result<Option<Array>, MatError> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_DECOMPRESSED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| malformed(offset, format!("compressed variable does not decompress: {e}")))?;
    if out.len() as u64 > MAX_DECOMPRESSED_BYTES {
        return Err(malformed(offset, format!("compressed variable is larger than {MAX_DECOMPRESSED_BYTES} bytes")));
    }
    let r = Reader { bytes: &out, big_endian, context: " of the compressed variable" };
    let context = |e: MatError| match e {
        MatError::Malformed { offset: inner, message } => malformed(
            offset,
            format!("{message} (at byte {inner} of the decompressed data of the variable compressed here)"),
        ),
        other => other,
    };
    let el = r.element(0, false).map_err(context)?;
    if el.ty != mi::MATRIX {
        return Err(malformed(
            offset,
            format!("compressed element holds a data element of type {} (want miMATRIX)", el.ty),
        ));
    }
    r.matrix(0, el.data_start, el.data).map_err(context)
}

/// A data element: its type, its data and where the next element starts.
struct Element<'a> {
    ty: u32,
    data: &'a [u8],
    data_start: usize,
    next: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    big_endian: bool,
    /// Appended to messages about positions.
    context: &'static str,
}

impl<'a> Reader<'a> {
    fn u16_at(&self, pos: usize) -> u16 {
        let b = [self.bytes[pos], self.bytes[pos + 1]];
        if self.big_endian { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) }
    }

    fn u32_of(&self, b: &[u8]) -> u32 {
        let b = [b[0], b[1], b[2], b[3]];
        if self.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
    }

    /// The data element whose tag starts at `pos`; `padded` when elements are aligned to 8
    /// bytes (inside an array).
    fn element(&self, pos: usize, padded: bool) -> Result<Element<'a>, MatError> {
        let len = self.bytes.len();
        if pos.checked_add(8).is_none_or(|end| end > len) {
            return Err(malformed(
                pos,
                format!("truncated: a data element tag needs 8 bytes, {} left", len.saturating_sub(pos)),
            ));
        }
        let first = self.u32_of(&self.bytes[pos..]);
        if first >> 16 != 0 {
            // Small data element: size in the upper 16 bits, type in the lower 16.
            let (ty, n) = (first & 0xffff, (first >> 16) as usize);
            if n > 4 {
                return Err(malformed(pos, format!("small data element of {n} bytes (at most 4)")));
            }
            return Ok(Element { ty, data: &self.bytes[pos + 4..pos + 4 + n], data_start: pos + 4, next: pos + 8 });
        }
        let n = self.u32_of(&self.bytes[pos + 4..]) as usize;
        let start = pos + 8;
        let Some(end) = start.checked_add(n).filter(|&e| e <= len) else {
            return Err(malformed(
                pos,
                format!(
                    "truncated: data element of type {first} declares {n} bytes, {} left{}",
                    len - start,
                    self.context
                ),
            ));
        };
        // Padding to 8 bytes counts from the data's start; a missing final pad is tolerated.
        let next = if padded { start.saturating_add(n.div_ceil(8) * 8).min(len) } else { end };
        Ok(Element { ty: first, data: &self.bytes[start..end], data_start: start, next })
    }

    /// The array of the `miMATRIX` element at `pos` whose data is `data` (starting at
    /// `data_start`); `None` for an empty element (an empty cell entry).
    fn matrix(&self, pos: usize, data_start: usize, data: &[u8]) -> Result<Option<Array>, MatError> {
        if data.is_empty() {
            return Ok(None);
        }
        // The array's elements must lie inside the array.
        let all: &'a [u8] = self.bytes;
        let sub = Reader { bytes: &all[..data_start + data.len()], big_endian: self.big_endian, context: self.context };
        let mut at = data_start;
        let mut next = |what: &str| -> Result<Element<'a>, MatError> {
            if at >= sub.bytes.len() {
                return Err(malformed(pos, format!("array ends before its {what}")));
            }
            let el = sub.element(at, true)?;
            at = el.next;
            Ok(el)
        };
        let flags = next("array flags")?;
        if flags.ty != mi::UINT32 || flags.data.len() != 8 {
            return Err(malformed(
                pos,
                format!("array flags are type {} with {} bytes (want miUINT32, 8 bytes)", flags.ty, flags.data.len()),
            ));
        }
        let f = self.u32_of(flags.data);
        let class = Class::from_code((f & 0xff) as u8);
        let complex = f & 0x800 != 0;
        let logical = f & 0x200 != 0;
        let dims_el = next("dimensions")?;
        if dims_el.ty != mi::INT32 || dims_el.data.len() % 4 != 0 || dims_el.data.len() < 8 {
            return Err(malformed(
                pos,
                format!(
                    "dimensions are type {} with {} bytes (want miINT32, at least 2 values)",
                    dims_el.ty,
                    dims_el.data.len()
                ),
            ));
        }
        let mut dims = Vec::with_capacity(dims_el.data.len() / 4);
        for chunk in dims_el.data.chunks_exact(4) {
            let d = self.u32_of(chunk) as i32;
            if d < 0 {
                return Err(malformed(pos, format!("negative dimension {d}")));
            }
            dims.push(d as usize);
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| malformed(pos, "dimensions overflow"))?;
        let name_el = next("name")?;
        if name_el.ty != mi::INT8 && name_el.ty != mi::UINT8 {
            return Err(malformed(pos, format!("array name is of type {} (want miINT8)", name_el.ty)));
        }
        let name = String::from_utf8_lossy(name_el.data).trim_end_matches('\0').to_string();
        if !class.is_numeric() {
            return Ok(Some(Array { name, class, dims, complex, logical, real: None }));
        }
        let real = numbers(&next(&format!("real part (variable `{name}`)"))?, numel, self.big_endian)
            .map_err(|m| malformed(pos, format!("variable `{name}`: real part {m}")))?;
        if complex {
            numbers(&next(&format!("imaginary part (variable `{name}`)"))?, numel, self.big_endian)
                .map_err(|m| malformed(pos, format!("variable `{name}`: imaginary part {m}")))?;
        }
        Ok(Some(Array { name, class, dims, complex, logical, real: Some(real) }))
    }
}

/// The `numel` values of a numeric data element as `f64`.
fn numbers(el: &Element<'_>, numel: usize, big_endian: bool) -> Result<Vec<f64>, String> {
    let width = match el.ty {
        mi::INT8 | mi::UINT8 => 1,
        mi::INT16 | mi::UINT16 => 2,
        mi::INT32 | mi::UINT32 | mi::SINGLE => 4,
        mi::DOUBLE | mi::INT64 | mi::UINT64 => 8,
        ty => return Err(format!("has data type {ty}, not a numeric type")),
    };
    if el.data.len() != numel.saturating_mul(width) {
        return Err(format!(
            "holds {} bytes of type {} ({width} bytes each), but the dimensions need {numel} values",
            el.data.len(),
            el.ty
        ));
    }
    macro_rules! conv {
        ($t:ty, $n:literal) => {
            el.data
                .chunks_exact($n)
                .map(|c| {
                    let b: [u8; $n] = c.try_into().unwrap_or([0; $n]);
                    (if big_endian { <$t>::from_be_bytes(b) } else { <$t>::from_le_bytes(b) }) as f64
                })
                .collect()
        };
    }
    Ok(match el.ty {
        mi::INT8 => conv!(i8, 1),
        mi::UINT8 => conv!(u8, 1),
        mi::INT16 => conv!(i16, 2),
        mi::UINT16 => conv!(u16, 2),
        mi::INT32 => conv!(i32, 4),
        mi::UINT32 => conv!(u32, 4),
        mi::SINGLE => conv!(f32, 4),
        mi::DOUBLE => conv!(f64, 8),
        mi::INT64 => conv!(i64, 8),
        _ => conv!(u64, 8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 128-byte header: text padded with spaces, 8 bytes of subsystem offset, version and
    /// endian indicator.
    fn header(big_endian: bool) -> Vec<u8> {
        let mut h = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Feb 19 15:43:33 2009".to_vec();
        h.resize(116, b' ');
        h.extend_from_slice(&[0; 8]);
        if big_endian {
            h.extend_from_slice(&[0x01, 0x00, b'M', b'I']);
        } else {
            h.extend_from_slice(&[0x00, 0x01, b'I', b'M']);
        }
        assert_eq!(h.len(), 128);
        h
    }

    /// A little-endian file written byte by byte from the specification: `labels` (double,
    /// 1×3, stored as miUINT8 in a small data element, as MATLAB stores small integers),
    /// `ids` (double 1×4 stored as miUINT16, with a small-element name) and `note` (char).
    fn little_endian_fixture() -> Vec<u8> {
        let mut f = header(false);
        #[rustfmt::skip]
        let body: [u8; 8 + 56 + 8 + 56 + 8 + 48] = [
            // labels: miMATRIX, 56 bytes.
            0x0e, 0, 0, 0, 0x38, 0, 0, 0,
            //   array flags: miUINT32, 8 bytes: class 6 (double), no flag; nzmax 0.
            0x06, 0, 0, 0, 0x08, 0, 0, 0, 0x06, 0, 0, 0, 0, 0, 0, 0,
            //   dimensions: miINT32, 8 bytes: 1 × 3.
            0x05, 0, 0, 0, 0x08, 0, 0, 0, 0x01, 0, 0, 0, 0x03, 0, 0, 0,
            //   name: miINT8, 6 bytes, "labels", 2 bytes of padding.
            0x01, 0, 0, 0, 0x06, 0, 0, 0, b'l', b'a', b'b', b'e', b'l', b's', 0, 0,
            //   real part: small data element, miUINT8, 3 bytes: 1, 102, 7.
            0x02, 0, 0x03, 0, 0x01, 0x66, 0x07, 0,
            // ids: miMATRIX, 56 bytes.
            0x0e, 0, 0, 0, 0x38, 0, 0, 0,
            0x06, 0, 0, 0, 0x08, 0, 0, 0, 0x06, 0, 0, 0, 0, 0, 0, 0,
            0x05, 0, 0, 0, 0x08, 0, 0, 0, 0x01, 0, 0, 0, 0x04, 0, 0, 0,
            //   name: small data element, miINT8, 3 bytes "ids".
            0x01, 0, 0x03, 0, b'i', b'd', b's', 0,
            //   real part: miUINT16, 8 bytes: 1, 2, 3, 8189.
            0x04, 0, 0, 0, 0x08, 0, 0, 0, 0x01, 0, 0x02, 0, 0x03, 0, 0xfd, 0x1f,
            // note: miMATRIX, 48 bytes; class 4 (char), 1 × 2, "hi" as miUINT16.
            0x0e, 0, 0, 0, 0x30, 0, 0, 0,
            0x06, 0, 0, 0, 0x08, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0,
            0x05, 0, 0, 0, 0x08, 0, 0, 0, 0x01, 0, 0, 0, 0x02, 0, 0, 0,
            0x01, 0, 0x04, 0, b'n', b'o', b't', b'e',
            0x04, 0, 0x04, 0, b'h', 0, b'i', 0,
        ];
        f.extend_from_slice(&body);
        f
    }

    /// A big-endian file: `trnid` (double 1×2 as miDOUBLE: 3, 1) and `x` (int8 1×1: -5, all
    /// small data elements).
    fn big_endian_fixture() -> Vec<u8> {
        let mut f = header(true);
        #[rustfmt::skip]
        let body: [u8; 8 + 72 + 8 + 48] = [
            0, 0, 0, 0x0e, 0, 0, 0, 0x48,
            0, 0, 0, 0x06, 0, 0, 0, 0x08, 0, 0, 0, 0x06, 0, 0, 0, 0,
            0, 0, 0, 0x05, 0, 0, 0, 0x08, 0, 0, 0, 0x01, 0, 0, 0, 0x02,
            0, 0, 0, 0x01, 0, 0, 0, 0x05, b't', b'r', b'n', b'i', b'd', 0, 0, 0,
            0, 0, 0, 0x09, 0, 0, 0, 0x10,
            0x40, 0x08, 0, 0, 0, 0, 0, 0, // 3.0
            0x3f, 0xf0, 0, 0, 0, 0, 0, 0, // 1.0
            0, 0, 0, 0x0e, 0, 0, 0, 0x30,
            0, 0, 0, 0x06, 0, 0, 0, 0x08, 0, 0, 0, 0x08, 0, 0, 0, 0,
            0, 0, 0, 0x05, 0, 0, 0, 0x08, 0, 0, 0, 0x01, 0, 0, 0, 0x01,
            // Small elements, big-endian: size in the first two bytes, type in the next two.
            0, 0x01, 0, 0x01, b'x', 0, 0, 0,
            0, 0x01, 0, 0x01, 0xfb, 0, 0, 0,
        ];
        f.extend_from_slice(&body);
        f
    }

    /// RFC 1950 zlib stream holding `data` in one stored (uncompressed) deflate block.
    fn zlib_stored(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 65536);
        let mut z = vec![0x78, 0x01, 0x01];
        let len = data.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(data);
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        z.extend_from_slice(&((b << 16) | a).to_be_bytes());
        z
    }

    #[test]
    fn reads_a_hand_written_little_endian_file() {
        let m = MatFile::parse(&little_endian_fixture()).unwrap();
        assert!(!m.big_endian);
        assert!(m.description.starts_with("MATLAB 5.0 MAT-file, Platform: GLNXA64"));
        let names: Vec<&str> = m.variables.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["labels", "ids", "note"]);
        let labels = m.variable("labels").unwrap();
        assert_eq!((labels.class, labels.dims.clone(), labels.shape()), (Class::Double, vec![1, 3], "1×3".into()));
        assert_eq!(labels.vector().unwrap(), [1.0, 102.0, 7.0]);
        assert_eq!(m.variable("ids").unwrap().vector().unwrap(), [1.0, 2.0, 3.0, 8189.0]);
        let note = m.variable("note").unwrap();
        assert_eq!((note.class, note.real.as_ref()), (Class::Char, None));
        let e = note.vector().unwrap_err().to_string();
        assert_eq!(e, "variable `note` is a 1×2 char array, not a numeric vector");
        let e = m.variable("valid").unwrap_err().to_string();
        assert_eq!(e, "no variable `valid` (the file holds: labels, ids, note)");
    }

    #[test]
    fn reads_a_hand_written_big_endian_file() {
        let m = MatFile::parse(&big_endian_fixture()).unwrap();
        assert!(m.big_endian);
        assert_eq!(m.variable("trnid").unwrap().vector().unwrap(), [3.0, 1.0]);
        let x = m.variable("x").unwrap();
        assert_eq!((x.class, x.vector().unwrap()), (Class::Int8, [-5.0].as_slice()));
    }

    #[test]
    fn reads_compressed_variables() {
        // The little-endian fixture with each variable wrapped in miCOMPRESSED (a stored
        // deflate block, written by hand, and not padded: top-level elements are not).
        let plain = little_endian_fixture();
        let mut f = header(false);
        let mut pos = 128;
        while pos < plain.len() {
            let n = u32::from_le_bytes(plain[pos + 4..pos + 8].try_into().unwrap()) as usize;
            let z = zlib_stored(&plain[pos..pos + 8 + n]);
            f.extend_from_slice(&15u32.to_le_bytes());
            f.extend_from_slice(&(z.len() as u32).to_le_bytes());
            f.extend_from_slice(&z);
            pos += 8 + n;
        }
        assert_ne!(f.len() % 8, 0, "the test wants unpadded elements");
        let m = MatFile::parse(&f).unwrap();
        assert_eq!(m.variables, MatFile::parse(&plain).unwrap().variables);
        // flate2's compressed stream of the same variable reads the same.
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut enc, &plain[128..128 + 64]).unwrap();
        let z = enc.finish().unwrap();
        let mut g = header(false);
        g.extend_from_slice(&15u32.to_le_bytes());
        g.extend_from_slice(&(z.len() as u32).to_le_bytes());
        g.extend_from_slice(&z);
        assert_eq!(MatFile::parse(&g).unwrap().variable("labels").unwrap().vector().unwrap(), [1.0, 102.0, 7.0]);
        // A damaged stream is an error that says so.
        let last = g.len() - 3;
        g[last] ^= 0xff;
        let e = MatFile::parse(&g).unwrap_err().to_string();
        assert!(e.contains("compressed variable does not decompress"), "{e}");
    }

    #[test]
    fn rejects_files_that_are_not_level_5() {
        let e = MatFile::parse(b"hello").unwrap_err().to_string();
        assert_eq!(e, "not a MATLAB level-5 MAT-file: the file has 5 bytes, fewer than the 128-byte header");
        let e = MatFile::parse(&[b'x'; 200]).unwrap_err().to_string();
        assert!(e.contains("no `MATLAB 5.0 MAT-file` header"), "{e}");
        let mut v73 = header(false);
        v73[124] = 0x00;
        v73[125] = 0x02;
        let e = MatFile::parse(&v73).unwrap_err().to_string();
        assert!(e.contains("v7.3 (HDF5)"), "{e}");
        let mut hdf5 = header(false);
        hdf5[126] = 0;
        hdf5.resize(512, 0);
        hdf5.extend_from_slice(b"\x89HDF\r\n\x1a\n");
        let e = MatFile::parse(&hdf5).unwrap_err().to_string();
        assert!(e.contains("HDF5"), "{e}");
        let mut bad = header(false);
        bad[126..128].copy_from_slice(b"XX");
        let e = MatFile::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("bad endian indicator"), "{e}");
        // A header alone is an empty file.
        assert!(MatFile::parse(&header(false)).unwrap().variables.is_empty());
    }

    #[test]
    fn malformed_elements_are_errors() {
        let good = little_endian_fixture();
        // Truncated in the middle of the first variable.
        let e = MatFile::parse(&good[..150]).unwrap_err().to_string();
        assert!(e.starts_with("malformed MAT-file at byte 128: truncated"), "{e}");
        // The real part does not match the dimensions (1×4 with 3 values).
        let mut f = good.clone();
        f[128 + 8 + 16 + 12] = 4;
        let e = MatFile::parse(&f).unwrap_err().to_string();
        assert!(e.contains("variable `labels`: real part holds 3 bytes of type 2"), "{e}");
        // A small data element claiming 5 bytes.
        let mut f = good.clone();
        f[128 + 8 + 48 + 2] = 5;
        let e = MatFile::parse(&f).unwrap_err().to_string();
        assert!(e.contains("small data element of 5 bytes"), "{e}");
        // An unknown top-level element.
        let mut f = good.clone();
        f[128] = 3;
        let e = MatFile::parse(&f).unwrap_err().to_string();
        assert!(e.contains("type 3 at the top level"), "{e}");
        // Negative dimension.
        let mut f = good.clone();
        f[128 + 8 + 16 + 8..128 + 8 + 16 + 12].copy_from_slice(&(-1i32).to_le_bytes());
        let e = MatFile::parse(&f).unwrap_err().to_string();
        assert!(e.contains("negative dimension -1"), "{e}");
    }

    #[test]
    fn never_panics_on_truncated_or_corrupted_bytes() {
        for fixture in [little_endian_fixture(), big_endian_fixture()] {
            for n in 0..fixture.len() {
                let _ = MatFile::parse(&fixture[..n]);
            }
            for i in 0..fixture.len() {
                for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                    let mut f = fixture.clone();
                    f[i] = v;
                    let _ = MatFile::parse(&f);
                }
            }
        }
    }

    #[test]
    fn vector_accepts_rows_columns_and_rejects_matrices() {
        let a = |dims: Vec<usize>, complex| Array {
            name: "v".into(),
            class: Class::Double,
            real: Some(vec![0.0; dims.iter().product()]),
            dims,
            complex,
            logical: false,
        };
        assert_eq!(a(vec![1, 3], false).vector().unwrap().len(), 3);
        assert_eq!(a(vec![3, 1], false).vector().unwrap().len(), 3);
        assert_eq!(a(vec![1, 1, 3], false).vector().unwrap().len(), 3);
        assert_eq!(a(vec![1, 0], false).vector().unwrap().len(), 0);
        assert_eq!(
            a(vec![2, 3], false).vector().unwrap_err().to_string(),
            "variable `v` is a 2×3 matrix, not a vector"
        );
        assert!(a(vec![1, 3], true).vector().unwrap_err().to_string().contains("complex"));
    }
}
