//! The slice wire format and its validation.
//!
//! A slice is a safetensors file holding one 1-D u8 tensor per parameter (Hugging Face
//! name): the wire bytes ([`super::quant::Codec::to_bytes`]) of the dithered codes of the
//! miner's gradient at the window's indices, in index order, then one f32 scale per 64
//! values; with string metadata: `bistro_protocol`, `window`, `hotkey`, `parent` (the
//! [`crate::accepted::state_hash`] of the state it was built on), `compression`,
//! `hparams_hash`, `model_hash`. Object key: `slice-{window}-{hotkey}.safetensors`.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::Rejection;
use super::quant::{Codec, Quantised};
use crate::protocol::{HEADER_BYTES_PER_TENSOR, PROTOCOL_VERSION, SLICE_METADATA_BYTES};

/// The metadata every slice carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceMeta {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// The window the slice belongs to.
    pub window: u64,
    /// The uploader's hotkey (ss58 or devnet name).
    pub hotkey: String,
    /// The state hash of `theta_w` the slice was built on.
    pub parent: String,
    /// The compression the indices were drawn with.
    pub compression: usize,
    /// Hash of the network's hyper-parameters.
    pub hparams_hash: String,
    /// Hash of the model config.
    pub model_hash: String,
}

impl SliceMeta {
    fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            ("bistro_protocol".to_string(), self.protocol_version.to_string()),
            ("window".to_string(), self.window.to_string()),
            ("hotkey".to_string(), self.hotkey.clone()),
            ("parent".to_string(), self.parent.clone()),
            ("compression".to_string(), self.compression.to_string()),
            ("hparams_hash".to_string(), self.hparams_hash.clone()),
            ("model_hash".to_string(), self.model_hash.clone()),
        ])
    }

    /// Check a file's metadata map against this expectation, field by field.
    fn check(&self, found: &HashMap<String, String>) -> Result<(), Rejection> {
        let expected = self.to_map();
        let mut fields: Vec<_> = expected.keys().collect();
        fields.sort();
        for field in fields {
            let want = &expected[field];
            match found.get(field) {
                Some(v) if v == want => {}
                Some(v) if field == "parent" => {
                    return Err(Rejection::StaleState { expected: want.clone(), found: v.clone() });
                }
                other => {
                    return Err(Rejection::Metadata {
                        field: field.clone(),
                        expected: want.clone(),
                        found: other.cloned().unwrap_or_else(|| "<absent>".into()),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Serialise a slice's codes (one [`Quantised`] per parameter, canonical order) with `meta`.
pub fn encode(meta: &SliceMeta, names: &[String], codec: &Codec, codes: &[Quantised]) -> Result<Vec<u8>, Rejection> {
    let wires: Vec<Vec<u8>> = codes.iter().map(|q| codec.to_bytes(q)).collect();
    encode_raw(meta, names, &wires)
}

/// Serialise per-parameter byte strings as 1-D u8 tensors with `meta` (what [`encode`]
/// writes; tests and adversaries use it to write what an honest encoder never would).
pub fn encode_raw(meta: &SliceMeta, names: &[String], wires: &[Vec<u8>]) -> Result<Vec<u8>, Rejection> {
    if names.len() != wires.len() {
        return Err(Rejection::Malformed(format!("{} names for {} tensors", names.len(), wires.len())));
    }
    let views = names
        .iter()
        .zip(wires)
        .map(|(n, b)| {
            TensorView::new(Dtype::U8, vec![b.len()], b)
                .map(|t| (n.clone(), t))
                .map_err(|e| Rejection::Malformed(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(meta.to_map())).map_err(|e| Rejection::Malformed(e.to_string()))
}

/// What a valid slice for one (window, hotkey) looks like.
#[derive(Clone, Debug)]
pub struct SliceExpectation {
    /// Parameter names in canonical order.
    pub names: Vec<String>,
    /// Values (codes) per parameter.
    pub lengths: Vec<usize>,
    /// The network's code width.
    pub codec: Codec,
    /// Expected metadata.
    pub meta: SliceMeta,
    /// Largest accepted object, in bytes (see [`size_bound`]).
    pub max_bytes: u64,
}

/// The largest header a file of these tensors can honestly have, plus `metadata_bytes` of
/// metadata: anything longer is rejected before it is parsed (a header bomb costs nothing).
pub fn header_bound(names: &[String], metadata_bytes: u64) -> u64 {
    names.iter().map(|n| n.len() as u64 + HEADER_BYTES_PER_TENSOR).sum::<u64>() + metadata_bytes
}

/// The largest object a slice of these tensors can be: the 8-byte length, the header bound
/// and the wire bytes of `lengths` values. A slice over this is rejected before it is
/// downloaded in full.
pub fn size_bound(names: &[String], lengths: &[usize], codec: &Codec) -> u64 {
    8 + header_bound(names, SLICE_METADATA_BYTES) + lengths.iter().map(|&l| codec.encoded_len(l) as u64).sum::<u64>()
}

/// The parsed header of a bounded safetensors file: its metadata and the tensor table.
pub(crate) struct Parsed<'a> {
    /// String metadata (`__metadata__`).
    pub meta: HashMap<String, String>,
    header: safetensors::tensor::Metadata,
    data: &'a [u8],
}

/// Parse a safetensors header once, after checking the object size against `max_bytes` and
/// the header length against `max_header` (before anything is allocated for it).
pub(crate) fn parse_bounded(bytes: &[u8], max_bytes: u64, max_header: u64) -> Result<Parsed<'_>, Rejection> {
    if bytes.len() as u64 > max_bytes {
        return Err(Rejection::TooLarge { size: bytes.len() as u64, limit: max_bytes });
    }
    let Some(len) = bytes.get(..8) else {
        return Err(Rejection::Malformed("shorter than the 8-byte header length".into()));
    };
    let n = u64::from_le_bytes([len[0], len[1], len[2], len[3], len[4], len[5], len[6], len[7]]);
    if n > max_header {
        return Err(Rejection::Malformed(format!(
            "header of {n} bytes exceeds the bound of {max_header} for this object"
        )));
    }
    let (n, header) = SafeTensors::read_metadata(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    Ok(Parsed { meta, header, data: &bytes[8 + n..] })
}

impl Parsed<'_> {
    /// The raw bytes of the 1-D tensors `names` of `dtype` with `lengths` elements, in that
    /// order: exactly that key set, that dtype, shape `[len]`.
    fn raw_tensors(&self, names: &[String], lengths: &[usize], dtype: Dtype) -> Result<Vec<&[u8]>, Rejection> {
        let table = self.header.tensors();
        let known: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut found: Vec<&String> = table.keys().collect();
        found.sort();
        if let Some(extra) = found.iter().find(|n| !known.contains(n.as_str())) {
            return Err(Rejection::UnexpectedKey((*extra).clone()));
        }
        let mut out = Vec::with_capacity(names.len());
        for (name, &len) in names.iter().zip(lengths) {
            let info = table.get(name).ok_or_else(|| Rejection::MissingKey(name.clone()))?;
            if info.dtype != dtype {
                return Err(Rejection::WrongDtype { name: name.clone(), dtype: format!("{:?}", info.dtype) });
            }
            if info.shape != [len] {
                return Err(Rejection::WrongShape { name: name.clone(), expected: len, found: info.shape.clone() });
            }
            let (a, b) = info.data_offsets;
            out.push(self.data.get(a..b).ok_or_else(|| Rejection::Malformed(format!("`{name}` out of bounds")))?);
        }
        Ok(out)
    }

    /// The 1-D u8 tensors `names` with byte lengths `lengths`, in that order.
    pub(crate) fn u8_tensors(&self, names: &[String], lengths: &[usize]) -> Result<Vec<&[u8]>, Rejection> {
        self.raw_tensors(names, lengths, Dtype::U8)
    }

    /// The 1-D f32 tensors `names` with `lengths`, in that order, every value finite.
    pub(crate) fn f32_tensors(&self, names: &[String], lengths: &[usize]) -> Result<Vec<Vec<f32>>, Rejection> {
        let raw = self.raw_tensors(names, lengths, Dtype::F32)?;
        let mut out = Vec::with_capacity(raw.len());
        for (name, raw) in names.iter().zip(raw) {
            let values: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Rejection::NonFinite { name: name.clone(), index: i });
            }
            out.push(values);
        }
        Ok(out)
    }
}

/// A valid slice: its codes, and the values they stand for (the miner's gradient estimate
/// at the window's indices), per parameter in canonical order.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceUpdate {
    /// Codes and scales.
    pub codes: Vec<Quantised>,
    /// The decoded values ([`Codec::decode`]).
    pub values: Vec<Vec<f32>>,
}

/// Decode and validate a slice.
///
/// Checks, in order: size cap, header length bound, safetensors structure (JSON, offsets;
/// parsed once), metadata, exact key set, dtype (u8), 1-D shape of the exact wire length,
/// every scale finite and non-negative.
pub fn decode(bytes: &[u8], expect: &SliceExpectation) -> Result<SliceUpdate, Rejection> {
    let parsed = parse_bounded(bytes, expect.max_bytes, header_bound(&expect.names, SLICE_METADATA_BYTES))?;
    expect.meta.check(&parsed.meta)?;
    let c = &expect.codec;
    let wire: Vec<usize> = expect.lengths.iter().map(|&l| c.encoded_len(l)).collect();
    let raw = parsed.u8_tensors(&expect.names, &wire)?;
    let mut out = SliceUpdate { codes: Vec::with_capacity(raw.len()), values: Vec::with_capacity(raw.len()) };
    for ((name, bytes), &n) in expect.names.iter().zip(raw).zip(&expect.lengths) {
        let q = c.from_bytes(bytes, n).map_err(|e| match e {
            super::quant::QuantError::Scale { index, .. } => Rejection::NonFinite { name: name.clone(), index },
            other => Rejection::Malformed(format!("`{name}`: {other}")),
        })?;
        out.values.push(c.decode(&q));
        out.codes.push(q);
    }
    Ok(out)
}

impl SliceMeta {
    /// Metadata for the current protocol version of a slice built on state `parent`.
    pub fn new(
        window: u64,
        hotkey: &str,
        parent: &str,
        compression: usize,
        hparams_hash: &str,
        model_hash: &str,
    ) -> Self {
        SliceMeta {
            protocol_version: PROTOCOL_VERSION,
            window,
            hotkey: hotkey.to_string(),
            parent: parent.to_string(),
            compression,
            hparams_hash: hparams_hash.to_string(),
            model_hash: model_hash.to_string(),
        }
    }
}
