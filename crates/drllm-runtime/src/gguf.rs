//! GGUF (v2/v3) reader and dequantizer.
//!
//! Written by hand on purpose: the crates that parse GGUF are tied to their own tensor types
//! (candle, ggml bindings), while we need a memory-mapped reader with strict bounds checks that
//! names the tensor or key at fault, and dequantization straight into libtorch tensors.
//! Format reference: ggml's `docs/gguf.md`; block layouts from ggml's `ggml-common.h`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements per block of the block-quantized types we decode.
pub const QK: usize = 32;
/// Elements per block of the K-quants (Q4_K, Q5_K, Q6_K).
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit sub-block scales and minima in a Q4_K / Q5_K block.
const K_SCALE_BYTES: usize = 12;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Tensor element types we can decode (named as GGML names them).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32-element blocks: f16 scale + 32 x i8.
    Q8_0,
    /// 32-element blocks: f16 scale + 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// 32-element blocks: f16 scale + f16 minimum + 16 bytes of 4-bit values.
    Q4_1,
    /// 32-element blocks: f16 scale, a 32-bit plane of fifth bits, 16 bytes of low nibbles;
    /// values offset by 16 (in Q5_0 files and in some K-quant mixes' attention matrices).
    Q5_0,
    /// As Q5_0 with an f16 minimum after the scale instead of the offset.
    Q5_1,
    /// 256-element super-blocks: f16 scale and minimum, eight 6-bit sub-block scales and minima,
    /// 4-bit values (the weights of Q4_K_M / Q4_K_S files).
    Q4_K,
    /// As Q4_K with a fifth bit per value held in a separate 32-byte plane.
    Q5_K,
    /// 256-element super-blocks: 4 low + 2 high bits per value, sixteen i8 sub-block scales, f16
    /// scale; values offset by 32.
    Q6_K,
    /// 256-element super-blocks: sixteen 4-bit sub-block scales and minima, 2-bit values, f16
    /// scale and minimum (the matrices of Q2_K files).
    Q2_K,
    /// 256-element super-blocks: a plane of high bits, 2 low bits per value, sixteen 6-bit signed
    /// sub-block scales, f16 scale; values in -4..4 (the matrices of Q3_K_S/M/L files).
    Q3_K,
}

impl GgmlType {
    /// Decodes a GGML type id; `Err` carries the type's name when known.
    pub fn from_id(id: u32) -> std::result::Result<Self, &'static str> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            9 => return Err("Q8_1"),
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => return Err("Q8_K"),
            16..=23 => return Err("IQ*"),
            24 => return Err("I8"),
            25 => return Err("I16"),
            26 => return Err("I32"),
            27 => return Err("I64"),
            28 => return Err("F64"),
            29 => return Err("IQ1_M"),
            _ => return Err("unknown"),
        })
    }
    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::BF16 => 30,
        }
    }
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                QK
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q2_K | GgmlType::Q3_K => {
                QK_K
            }
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 2 + QK,
            GgmlType::Q4_0 => 2 + QK / 2,
            GgmlType::Q4_1 => 4 + QK / 2,
            GgmlType::Q5_0 => 2 + 4 + QK / 2,
            GgmlType::Q5_1 => 4 + 4 + QK / 2,
            GgmlType::Q4_K => 4 + K_SCALE_BYTES + QK_K / 2,
            GgmlType::Q5_K => 4 + K_SCALE_BYTES + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            GgmlType::Q2_K => QK_K / 16 + QK_K / 4 + 2 + 2,
            GgmlType::Q3_K => QK_K / 8 + QK_K / 4 + K_SCALE_BYTES + 2,
        }
    }
}

/// Where a tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions in GGML order (fastest-varying first); torch's shape is the reverse.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data.
    pub start: usize,
    /// Byte length of the data.
    pub len: usize,
}

impl TensorInfo {
    /// Shape in torch order (slowest-varying first).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A memory-mapped GGUF file with its metadata and tensor directory parsed and validated.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by GGUF name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(Error::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::bad_file(self.path, format!("{} is not valid UTF-8", what())))
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.array::<1>(what)?[0] as u64),
            1 => Value::I64(self.array::<1>(what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.array(what)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.array(what)?) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(i32::from_le_bytes(self.array(what)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.array(what)?) as f64),
            7 => Value::Bool(self.array::<1>(what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(Error::bad_file(
                        self.path,
                        format!("{}: arrays nested too deep", what()),
                    ));
                }
                let elem_ty = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: refuse counts the file cannot hold
                // before allocating for them.
                let remaining = (self.buf.len() - self.pos) as u64;
                if n > remaining {
                    return Err(Error::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("{} ({n} array elements)", what()),
                        offset: self.pos as u64,
                        needed: n,
                        len: self.buf.len() as u64,
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(Error::bad_file(
                    self.path,
                    format!(
                        "{}: unknown metadata value type {other} (expected 0..=12)",
                        what()
                    ),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Opens, maps and validates a GGUF file: every tensor must lie inside the file and have a
    /// type we can decode.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file truncated by another process while mapped would
        // fault, which is the documented risk of every mmap-based model loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: &Path, mmap: Mmap) -> Result<Self> {
        let mut c = Cursor {
            path,
            buf: &mmap,
            pos: 0,
        };
        let magic = c.array::<4>(&|| "magic".into())?;
        if &magic != MAGIC {
            return Err(Error::bad_file(
                path,
                format!(
                    "not a GGUF file: magic {:?}, expected \"GGUF\"",
                    String::from_utf8_lossy(&magic)
                ),
            ));
        }
        let version = c.u32(&|| "version".into())?;
        if !(2..=3).contains(&version) {
            return Err(Error::bad_file(
                path,
                format!("GGUF version {version} is not supported (expected 2 or 3)"),
            ));
        }
        let n_tensors = c.u64(&|| "tensor count".into())?;
        let n_kv = c.u64(&|| "metadata count".into())?;
        // Each tensor info takes at least 32 bytes and each metadata entry 13: a count beyond
        // any real model's (65,536) that cannot fit is a corrupt header, not a file cut short.
        let rest = (c.buf.len() - c.pos) as u64;
        for (what, n, min) in [("tensor", n_tensors, 32u64), ("metadata", n_kv, 13)] {
            if n > 65_536 && n.saturating_mul(min) > rest {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "corrupt header: {what} count {n} cannot fit in the {rest} bytes that follow it"
                    ),
                ));
            }
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let ty = c.u32(&|| format!("type of metadata {key}"))?;
            let v = c.value(ty, &|| format!("metadata {key}"), 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor info #{i}"))?;
            let n_dims = c.u32(&|| format!("tensor {name} dims"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(Error::bad_file(
                    path,
                    format!("tensor {name}: {n_dims} dimensions (expected 1..=4)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&|| format!("tensor {name} dims"))?);
            }
            let type_id = c.u32(&|| format!("tensor {name} type"))?;
            let offset = c.u64(&|| format!("tensor {name} offset"))?;
            raw.push((name, dims, type_id, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::config(
                        path.display().to_string(),
                        "general.alignment",
                        "expected a power of two",
                    ))
                }
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = BTreeMap::new();
        for (name, dims, type_id, offset) in raw {
            let ty =
                GgmlType::from_id(type_id).map_err(|type_name| Error::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    type_id,
                    type_name: type_name.to_string(),
                })?;
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let bad = |msg: String| Error::bad_file(path, format!("tensor {name}: {msg}"));
            let numel = numel.ok_or_else(|| bad(format!("dims {dims:?} overflow")))?;
            let be = ty.block_elems() as u64;
            if dims[0] % be != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {be}-element block",
                    dims[0]
                )));
            }
            let len = numel / be * ty.block_bytes() as u64;
            let start = data_start
                .checked_add(offset)
                .ok_or_else(|| bad("offset overflows".into()))?;
            if start.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(Error::Truncated {
                    path: path.to_path_buf(),
                    what: format!("data of tensor {name}"),
                    offset: start,
                    needed: len,
                    len: file_len,
                });
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ty,
                    start: start as usize,
                    len: len as usize,
                },
            );
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| {
            Error::config(
                self.path.display().to_string(),
                key,
                "missing from GGUF metadata",
            )
        })
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)?.as_u64().ok_or_else(|| {
            Error::config(
                self.path.display().to_string(),
                key,
                "expected an unsigned integer",
            )
        })
    }

    /// A required float.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| Error::config(self.path.display().to_string(), key, "expected a number"))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| Error::config(self.path.display().to_string(), key, "expected a string"))
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self.get(key)?.as_array().ok_or_else(|| {
            Error::config(self.path.display().to_string(), key, "expected an array")
        })?;
        arr.iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    Error::config(
                        self.path.display().to_string(),
                        key,
                        "expected an array of strings",
                    )
                })
            })
            .collect()
    }
}

/// Dequantizes `data` of type `ty` into f32 values (row-major, GGML order).
/// `data` must hold a whole number of blocks; F16/BF16/F32 are decoded too so tests and callers
/// share one reference path.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Vec<f32> {
    let bb = ty.block_bytes();
    let n_blocks = data.len() / bb;
    let mut out = Vec::with_capacity(n_blocks * ty.block_elems());
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for block in data.chunks_exact(bb) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([block[0], block[1], block[2], block[3]])),
            GgmlType::F16 => out.push(half(block)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32()),
            GgmlType::Q8_0 => {
                let d = half(&block[0..2]);
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
            GgmlType::Q4_0 => {
                let d = half(&block[0..2]);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            GgmlType::Q4_1 => {
                let d = half(&block[0..2]);
                let m = half(&block[2..4]);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            GgmlType::Q5_0 => dequantize_q5(half(&block[0..2]), None, &block[2..], &mut out),
            GgmlType::Q5_1 => dequantize_q5(
                half(&block[0..2]),
                Some(half(&block[2..4])),
                &block[4..],
                &mut out,
            ),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                dequantize_q45_k(ty == GgmlType::Q5_K, block, &mut out)
            }
            GgmlType::Q6_K => dequantize_q6_k(block, &mut out),
            GgmlType::Q2_K => dequantize_q2_k(block, &mut out),
            GgmlType::Q3_K => dequantize_q3_k(block, &mut out),
        }
    }
    out
}

/// One Q5_0 (no `min`: values offset by 16) or Q5_1 block after its f16 header: `rest` is a
/// little-endian u32 of fifth bits, then 16 bytes whose low nibbles are values 0..16 and high
/// nibbles values 16..32; value `i`'s fifth bit is bit `i` of the u32. Laid out as llama.cpp's
/// `block_q5_0` / `block_q5_1`.
fn dequantize_q5(d: f32, min: Option<f32>, rest: &[u8], out: &mut Vec<f32>) {
    let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let qs = &rest[4..4 + QK / 2];
    let value = |i: usize, nibble: u8| {
        let q = (nibble | ((((qh >> i) & 1) as u8) << 4)) as i32;
        match min {
            Some(m) => q as f32 * d + m,
            None => (q - 16) as f32 * d,
        }
    };
    out.extend(qs.iter().enumerate().map(|(j, &q)| value(j, q & 0x0f)));
    out.extend(
        qs.iter()
            .enumerate()
            .map(|(j, &q)| value(j + QK / 2, q >> 4)),
    );
}

/// Scale and minimum of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K / Q5_K block:
/// sub-blocks 0-3 keep their six bits in the low bits of bytes j and j+4; sub-blocks 4-7 split
/// theirs between a nibble of byte j+4 and the top two bits of bytes j-4 and j.
fn k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// One Q4_K (or, with `five_bits`, Q5_K) block: 256 values in four runs of 64, each run two
/// sub-blocks of 32 (low then high nibbles of the same 32 bytes); value = d*sc*q - dmin*m, with q
/// taking a fifth bit from the qh plane for Q5_K. Laid out as llama.cpp's `block_q4_K`/`block_q5_K`.
fn dequantize_q45_k(five_bits: bool, block: &[u8], out: &mut Vec<f32>) {
    let half = |o: usize| f16::from_le_bytes([block[o], block[o + 1]]).to_f32();
    let (d, dmin) = (half(0), half(2));
    let scales = &block[4..4 + K_SCALE_BYTES];
    let (qh, qs) = if five_bits {
        let qh_start = 4 + K_SCALE_BYTES;
        (
            &block[qh_start..qh_start + QK_K / 8],
            &block[qh_start + QK_K / 8..],
        )
    } else {
        (&[][..], &block[4 + K_SCALE_BYTES..])
    };
    for run in 0..QK_K / 64 {
        let q = &qs[run * 32..run * 32 + 32];
        for half_run in 0..2 {
            let (sc, m) = k_scale_min(2 * run + half_run, scales);
            let (dl, ml) = (d * sc as f32, dmin * m as f32);
            let shift = 4 * half_run;
            let bit = 2 * run + half_run;
            out.extend((0..32).map(|l| {
                let mut v = (q[l] >> shift) & 0x0f;
                if five_bits && qh[l] & (1 << bit) != 0 {
                    v += 16;
                }
                dl * v as f32 - ml
            }));
        }
    }
}

/// One Q6_K block: two halves of 128 values; value = d * scale[sub-block] * (q - 32), where q's
/// low four bits come from ql and its high two from qh. Laid out as llama.cpp's `block_q6_K`.
fn dequantize_q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (ql_all, rest) = block.split_at(QK_K / 2);
    let (qh_all, rest) = rest.split_at(QK_K / 4);
    let (sc_all, d) = rest.split_at(QK_K / 16);
    let d = f16::from_le_bytes([d[0], d[1]]).to_f32();
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let start = out.len();
        out.resize(start + 128, 0.0);
        let y = &mut out[start..];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &qk) in q.iter().enumerate() {
                let s = sc[is + 2 * k] as i8 as f32;
                y[l + 32 * k] = d * s * (qk as i32 - 32) as f32;
            }
        }
    }
}

/// The 2-bit values of a Q2_K / Q3_K block in output order: two halves of 128 values, each four
/// runs of 32 taking bits 0-1, 2-3, 4-5 and 6-7 of the half's 32 bytes of `qs`.
fn k_two_bits(qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    (0..QK_K).map(move |v| (qs[(v / 128) * 32 + v % 32] >> (2 * ((v % 128) / 32))) & 3)
}

/// One Q2_K block (sixteen scale bytes, 64 bytes of 2-bit values, f16 scale, f16 minimum): value
/// = d * (scale & 15) * q - dmin * (scale >> 4), one scale byte per 16 values. Laid out as
/// llama.cpp's `block_q2_K`.
fn dequantize_q2_k(block: &[u8], out: &mut Vec<f32>) {
    let (scales, rest) = block.split_at(QK_K / 16);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let d = f16::from_le_bytes([rest[0], rest[1]]).to_f32();
    let dmin = f16::from_le_bytes([rest[2], rest[3]]).to_f32();
    out.extend(k_two_bits(qs).enumerate().map(|(v, q)| {
        let sc = scales[v / 16];
        let (dl, ml) = (d * (sc & 0x0f) as f32, dmin * (sc >> 4) as f32);
        dl * q as f32 - ml
    }));
}

/// Signed 6-bit scale `i` (0..16) of a Q3_K block: its low nibble from byte `i % 8` (bits 0-3
/// for i < 8, 4-7 above), its top two bits from byte `8 + i % 4` (bits `2 * (i / 4)`), minus 32.
fn q3_k_scale(i: usize, s: &[u8]) -> f32 {
    let low = (s[i % 8] >> (4 * (i / 8))) & 0x0f;
    let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    ((low | (high << 4)) as i8 - 32) as f32
}

/// One Q3_K block (32-byte high-bit plane, 64 bytes of low 2-bit values, 12 bytes of packed
/// scales, f16 scale): value = d * scale * q with q = low - 4 when its high bit is clear (llama.cpp
/// stores the bit inverted), one scale per 16 values. Laid out as llama.cpp's `block_q3_K`.
fn dequantize_q3_k(block: &[u8], out: &mut Vec<f32>) {
    let (hmask, rest) = block.split_at(QK_K / 8);
    let (qs, rest) = rest.split_at(QK_K / 4);
    let (scales, d) = rest.split_at(K_SCALE_BYTES);
    let d = f16::from_le_bytes([d[0], d[1]]).to_f32();
    out.extend(k_two_bits(qs).enumerate().map(|(v, low)| {
        let high = (hmask[v % 32] >> (v / 32)) & 1;
        let q = low as i32 - if high == 0 { 4 } else { 0 };
        (d * q3_k_scale(v / 16, scales)) * q as f32
    }));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds GGUF bytes in memory: the writer half of the oracle for parser tests.
    #[derive(Default)]
    pub struct GgufBuilder {
        pub kv: Vec<(String, u32, Vec<u8>)>,
        pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        pub version: u32,
    }

    impl GgufBuilder {
        pub fn new() -> Self {
            GgufBuilder {
                version: 3,
                ..Default::default()
            }
        }
        fn s(v: &str) -> Vec<u8> {
            let mut b = (v.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(v.as_bytes());
            b
        }
        pub fn kv_str(mut self, k: &str, v: &str) -> Self {
            self.kv.push((k.into(), 8, Self::s(v)));
            self
        }
        pub fn kv_u32(mut self, k: &str, v: u32) -> Self {
            self.kv.push((k.into(), 4, v.to_le_bytes().to_vec()));
            self
        }
        pub fn kv_f32(mut self, k: &str, v: f32) -> Self {
            self.kv.push((k.into(), 6, v.to_le_bytes().to_vec()));
            self
        }
        pub fn kv_str_array(mut self, k: &str, v: &[&str]) -> Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend((v.len() as u64).to_le_bytes());
            for s in v {
                b.extend(Self::s(s));
            }
            self.kv.push((k.into(), 9, b));
            self
        }
        pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), dims.to_vec(), ty, data));
            self
        }
        pub fn build(&self) -> Vec<u8> {
            let mut b = b"GGUF".to_vec();
            b.extend(self.version.to_le_bytes());
            b.extend((self.tensors.len() as u64).to_le_bytes());
            b.extend((self.kv.len() as u64).to_le_bytes());
            for (k, t, v) in &self.kv {
                b.extend(Self::s(k));
                b.extend(t.to_le_bytes());
                b.extend(v);
            }
            let mut offset = 0u64;
            let mut offsets = vec![];
            for (name, dims, ty, data) in &self.tensors {
                b.extend(Self::s(name));
                b.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    b.extend(d.to_le_bytes());
                }
                b.extend(ty.to_le_bytes());
                b.extend(offset.to_le_bytes());
                offsets.push(offset);
                offset += (data.len() as u64).div_ceil(32) * 32;
            }
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
            for (_, _, _, data) in &self.tensors {
                b.extend(data);
                while !b.len().is_multiple_of(32) {
                    b.push(0);
                }
            }
            b
        }
        pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, self.build()).unwrap();
            p
        }
    }

    /// Straightforward per-element reference dequantizer (the oracle), written independently of
    /// the block loops above: element i of block b.
    fn reference(ty: GgmlType, data: &[u8], i: usize) -> f32 {
        let bb = ty.block_bytes();
        let (b, j) = (i / QK, i % QK);
        let blk = &data[b * bb..(b + 1) * bb];
        let h = |o: usize| f16::from_bits(u16::from_le_bytes([blk[o], blk[o + 1]])).to_f32();
        let nib = |qs: &[u8]| if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 } as f32;
        match ty {
            GgmlType::Q8_0 => h(0) * (blk[2 + j] as i8 as f32),
            GgmlType::Q4_0 => h(0) * (nib(&blk[2..]) - 8.0),
            GgmlType::Q4_1 => h(0) * nib(&blk[4..]) + h(2),
            _ => unreachable!(),
        }
    }

    fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let mut out = vec![];
        for _ in 0..n_blocks {
            let mut blk: Vec<u8> = (0..ty.block_bytes()).map(|_| next()).collect();
            // Finite, moderate scales (random bits could be NaN/inf).
            let d = f16::from_f32((next() as f32 - 128.0) / 1000.0).to_le_bytes();
            blk[0..2].copy_from_slice(&d);
            if ty == GgmlType::Q4_1 {
                let m = f16::from_f32((next() as f32 - 128.0) / 100.0).to_le_bytes();
                blk[2..4].copy_from_slice(&m);
            }
            out.extend(blk);
        }
        out
    }

    #[test]
    fn quantized_blocks_match_reference() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let data = random_blocks(ty, 37, ty.id() as u64);
            let got = dequantize(ty, &data);
            assert_eq!(got.len(), 37 * QK);
            for (i, g) in got.iter().enumerate() {
                assert_eq!(*g, reference(ty, &data, i), "{ty:?} element {i}");
            }
        }
    }

    #[test]
    fn parses_synthetic_file() {
        let dir = tempfile::tempdir().unwrap();
        let f32s: Vec<u8> = [1.0f32, -2.0, 3.5, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let q = random_blocks(GgmlType::Q4_1, 2, 7);
        let p = GgufBuilder::new()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_f32("llama.rope.freq_base", 10000.0)
            .kv_str_array("tokenizer.ggml.tokens", &["a", "b"])
            .tensor("x", &[3, 2], 0, f32s)
            .tensor("q", &[32, 2], 3, q.clone())
            .write(dir.path(), "m.gguf");
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens").unwrap(),
            vec!["a", "b"]
        );
        let x = &g.tensors["x"];
        assert_eq!(x.shape(), vec![2, 3]);
        assert_eq!(
            dequantize(x.ty, g.tensor_bytes(x)),
            vec![1.0, -2.0, 3.5, 4.0, 5.0, 6.0]
        );
        let qi = &g.tensors["q"];
        assert_eq!(g.tensor_bytes(qi), &q[..]);
    }

    #[test]
    fn rejects_bad_files_with_names() {
        let dir = tempfile::tempdir().unwrap();
        let good = GgufBuilder::new()
            .kv_str("general.architecture", "llama")
            .tensor("blk.0.attn_q.weight", &[4, 2], 0, vec![0u8; 32])
            .build();
        // Every truncation of a valid file is an error, never a panic.
        for cut in 0..good.len() - 1 {
            let p = dir.path().join("cut.gguf");
            std::fs::write(&p, &good[..cut]).unwrap();
            let err = GgufFile::open(&p)
                .err()
                .unwrap_or_else(|| panic!("cut at {cut} accepted"));
            let msg = err.to_string();
            assert!(msg.contains("cut.gguf"), "{msg}");
        }
        let p = dir.path().join("bad.gguf");
        std::fs::write(&p, b"GGML....").unwrap();
        assert!(GgufFile::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("not a GGUF file"));
        let unk = GgufBuilder::new()
            .tensor("blk.0.ffn_up.weight", &[256, 1], 15, vec![0u8; 292])
            .write(dir.path(), "k.gguf");
        let msg = GgufFile::open(&unk).err().unwrap().to_string();
        assert!(
            msg.contains("blk.0.ffn_up.weight") && msg.contains("Q8_K") && msg.contains("Q6_K"),
            "{msg}"
        );
        // K-quant rows are 256-element blocks.
        let short = GgufBuilder::new()
            .tensor("blk.0.ffn_up.weight", &[128, 2], 12, vec![0u8; 144])
            .write(dir.path(), "short.gguf");
        let msg = GgufFile::open(&short).err().unwrap().to_string();
        assert!(
            msg.contains("not a multiple of the 256-element block"),
            "{msg}"
        );
        // A tensor count that cannot fit the file: a corrupt header, said so.
        let mut corrupt = good.clone();
        corrupt[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &corrupt).unwrap();
        let msg = GgufFile::open(&p).err().unwrap().to_string();
        assert!(
            msg.contains("bad.gguf") && msg.contains("corrupt header: tensor count"),
            "{msg}"
        );
        let mut v1 = GgufBuilder::new();
        v1.version = 1;
        let msg = GgufFile::open(v1.write(dir.path(), "v1.gguf"))
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("version 1"), "{msg}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Arbitrary bytes behind a valid magic never panic the parser.
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let dir = tempfile::tempdir().unwrap();
            let mut b = b"GGUF\x03\x00\x00\x00".to_vec();
            b.extend(tail);
            let p = dir.path().join("f.gguf");
            std::fs::write(&p, b).unwrap();
            let _ = GgufFile::open(&p);
        }
    }
}
