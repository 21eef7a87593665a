//! The slice wire format and its validation.
//!
//! A slice is a safetensors file holding one 1-D f32 tensor per parameter (Hugging Face
//! name), the values of `theta' = theta_w - eta_w * g` at the window's indices, in index
//! order, with string metadata: `bistro_protocol`, `window`, `hotkey`, `parent` (the
//! [`crate::accepted::state_hash`] of `theta_w` it was built on), `compression`,
//! `hparams_hash`, `model_hash`. Object key: `slice-{window}-{hotkey}.safetensors`.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::Rejection;
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

/// Serialise slice values (one vector per parameter, canonical order) with `meta`.
pub fn encode(meta: &SliceMeta, names: &[String], values: &[Vec<f32>]) -> Result<Vec<u8>, Rejection> {
    if names.len() != values.len() {
        return Err(Rejection::Malformed(format!("{} names for {} tensors", names.len(), values.len())));
    }
    let bytes: Vec<Vec<u8>> = values.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = names
        .iter()
        .zip(&bytes)
        .zip(values)
        .map(|((n, b), v)| {
            TensorView::new(Dtype::F32, vec![v.len()], b)
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
    /// Values per parameter.
    pub lengths: Vec<usize>,
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
/// and 4 bytes per value. A slice over this is rejected before it is downloaded in full.
pub fn size_bound(names: &[String], lengths: &[usize]) -> u64 {
    8 + header_bound(names, SLICE_METADATA_BYTES) + 4 * lengths.iter().map(|&l| l as u64).sum::<u64>()
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
    /// The 1-D f32 tensors `names` with `lengths`, in that order: exactly that key set,
    /// dtype F32, shape `[len]`, every value finite.
    pub(crate) fn f32_tensors(&self, names: &[String], lengths: &[usize]) -> Result<Vec<Vec<f32>>, Rejection> {
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
            if info.dtype != Dtype::F32 {
                return Err(Rejection::WrongDtype { name: name.clone(), dtype: format!("{:?}", info.dtype) });
            }
            if info.shape != [len] {
                return Err(Rejection::WrongShape { name: name.clone(), expected: len, found: info.shape.clone() });
            }
            let (a, b) = info.data_offsets;
            let raw = self.data.get(a..b).ok_or_else(|| Rejection::Malformed(format!("`{name}` out of bounds")))?;
            let values: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Rejection::NonFinite { name: name.clone(), index: i });
            }
            out.push(values);
        }
        Ok(out)
    }
}

/// Decode and validate a slice; on success the values per parameter in canonical order.
///
/// Checks, in order: size cap, header length bound, safetensors structure (JSON, offsets;
/// parsed once), metadata, exact key set, dtype, 1-D shape and length, finiteness.
pub fn decode(bytes: &[u8], expect: &SliceExpectation) -> Result<Vec<Vec<f32>>, Rejection> {
    let parsed = parse_bounded(bytes, expect.max_bytes, header_bound(&expect.names, SLICE_METADATA_BYTES))?;
    expect.meta.check(&parsed.meta)?;
    parsed.f32_tensors(&expect.names, &expect.lengths)
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
