//! The slice wire format and its validation.
//!
//! A slice is a safetensors file holding one 1-D f32 tensor per parameter (Hugging Face
//! name), the values of `theta' = theta_w - eta_w * g` at the window's indices, in index
//! order, with string metadata: `bistro_protocol`, `window`, `hotkey`, `compression`,
//! `hparams_hash`, `model_hash`. Object key: `slice-{window}-{hotkey}.safetensors`.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::Rejection;
use crate::hparams::PROTOCOL_VERSION;

/// The metadata every slice carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceMeta {
    /// Protocol version ([`PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// The window the slice belongs to.
    pub window: u64,
    /// The uploader's hotkey (ss58 or devnet name).
    pub hotkey: String,
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

/// The object key of a slice.
pub fn slice_key(window: u64, hotkey: &str) -> String {
    format!("slice-{window}-{hotkey}.safetensors")
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
    /// Largest accepted object, in bytes.
    pub max_bytes: u64,
}

/// Decode and validate a slice; on success the values per parameter in canonical order.
///
/// Checks, in order: size cap, safetensors structure (header length, JSON, offsets),
/// metadata, exact key set, dtype, 1-D shape and length, finiteness.
pub fn decode(bytes: &[u8], expect: &SliceExpectation) -> Result<Vec<Vec<f32>>, Rejection> {
    if bytes.len() as u64 > expect.max_bytes {
        return Err(Rejection::TooLarge { size: bytes.len() as u64, limit: expect.max_bytes });
    }
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| Rejection::Malformed(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    expect.meta.check(&meta)?;
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let known: std::collections::HashSet<&str> = expect.names.iter().map(String::as_str).collect();
    if let Some(extra) = names.iter().find(|n| !known.contains(n.as_str())) {
        return Err(Rejection::UnexpectedKey(extra.clone()));
    }
    let mut out = Vec::with_capacity(expect.names.len());
    for (name, &len) in expect.names.iter().zip(&expect.lengths) {
        let view = st.tensor(name).map_err(|_| Rejection::MissingKey(name.clone()))?;
        if view.dtype() != Dtype::F32 {
            return Err(Rejection::WrongDtype { name: name.clone(), dtype: format!("{:?}", view.dtype()) });
        }
        if view.shape() != [len] {
            return Err(Rejection::WrongShape { name: name.clone(), expected: len, found: view.shape().to_vec() });
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::NonFinite { name: name.clone(), index: i });
        }
        out.push(values);
    }
    Ok(out)
}

impl SliceMeta {
    /// Metadata for the current protocol version.
    pub fn new(window: u64, hotkey: &str, compression: usize, hparams_hash: &str, model_hash: &str) -> Self {
        SliceMeta {
            protocol_version: PROTOCOL_VERSION,
            window,
            hotkey: hotkey.to_string(),
            compression,
            hparams_hash: hparams_hash.to_string(),
            model_hash: model_hash.to_string(),
        }
    }
}
