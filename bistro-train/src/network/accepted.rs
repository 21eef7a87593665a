//! Protocol v2's accepted set: one aggregate object per window, published by the lead
//! validator and applied, byte for byte, by every node.
//!
//! An aggregate is a safetensors file with one 1-D f32 tensor per parameter (canonical
//! names and order): the combined gradient at the window's slice indices, which every node
//! applies through the public AdamW ([`crate::public_adam`]). Its metadata says which
//! state it applies to and which it produces (both identities, [`crate::lineage`]), who decided it, and
//! every included hotkey with the sha256 of its slice bytes and every excluded hotkey with
//! the reason. Object key: [`crate::protocol::aggregate_key`], in the publishing validator's bucket.
//!
//! A node applies an aggregate only when its own state identity equals the aggregate's
//! `parent`; a mismatch is a fork, repaired from the publisher's verified checkpoint and
//! aggregates ([`crate::history`], in [`crate::node::Node::follow`]).

use std::collections::HashMap;

use bistro_chain::{Metagraph, Neuron};
use bistro_model::Params;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::{AGGREGATE_METADATA_BYTES, PROTOCOL_VERSION, tags};
use crate::public_adam::PublicAdam;
use crate::slices::Rejection;
use crate::slices::format::{header_bound, parse_bounded};

/// Metadata value of `kind` in an aggregate.
const KIND: &str = "aggregate";

/// Hex sha256 of the full shared state (parameters and public optimizer state), from one
/// leaf per parameter computed in parallel: `sha256("bistro/state/v3" || for every
/// parameter in canonical order: name length (u64 LE) || name || element count (u64 LE) ||
/// leaf)`, where `leaf = sha256(values f32 LE || m f32 LE || v f32 LE || t u32 LE)`.
pub fn state_hash(params: &Params, adam: &PublicAdam) -> bistro_model::Result<String> {
    use rayon::prelude::*;
    let specs = params.specs();
    if adam.m.len() != specs.len() {
        return Err(bistro_model::ModelError::Candle(candle_core::Error::Msg(format!(
            "optimizer state has {} parameters, the model {}",
            adam.m.len(),
            specs.len()
        ))));
    }
    let leaves = (0..specs.len())
        .into_par_iter()
        .map(|i| {
            let v = params.to_vec(i)?;
            let mut buf = Vec::with_capacity(v.len() * 16);
            buf.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            adam.leaf_bytes(i, &mut buf);
            Ok((v.len(), Sha256::digest(&buf)))
        })
        .collect::<bistro_model::Result<Vec<_>>>()?;
    let mut h = Sha256::new();
    h.update(tags::STATE);
    for (spec, (n, leaf)) in specs.iter().zip(leaves) {
        h.update((spec.name.len() as u64).to_le_bytes());
        h.update(spec.name.as_bytes());
        h.update((n as u64).to_le_bytes());
        h.update(leaf);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hex sha256 of an object's bytes (how an aggregate names the slices it included).
pub fn bytes_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The validators that may publish the accepted set, in fallback order: neurons with a
/// validator permit, most stake first, ties by lower uid. The first is the lead.
pub fn validators_by_stake(mg: &Metagraph) -> Vec<Neuron> {
    let mut v: Vec<Neuron> = mg.neurons.iter().filter(|n| n.validator_permit).cloned().collect();
    v.sort_by(|a, b| b.stake.cmp(&a.stake).then(a.uid.cmp(&b.uid)));
    v
}

/// One included slice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Included {
    /// The miner.
    pub hotkey: String,
    /// Hex sha256 of the slice object's bytes as the lead fetched them.
    pub sha256: String,
    /// The norm of the slice's decoded gradient.
    pub norm: f64,
    /// `e` when the gradient was recomputed this window and found honest (by the lead, or
    /// under shared verification by the verifiers in `verified_by`: the largest of their
    /// `e`), or `None` when it was included on its record (good standing and a bounded norm).
    pub e: Option<f64>,
    /// Under shared verification, the assigned verifiers whose signed verdicts found this
    /// slice (same sha256) honest; empty when the lead recomputed it itself or included it
    /// on its record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verified_by: Vec<String>,
}

/// One excluded miner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Excluded {
    /// The miner.
    pub hotkey: String,
    /// A stable reason code (`missing`, `timeout`, `dishonest`, `probation`, `outlier`, ...).
    pub reason: String,
    /// Details for people.
    pub detail: String,
}

/// The decision part of an aggregate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AcceptedSet {
    /// The window.
    pub window: u64,
    /// Hotkey of the validator that decided it.
    pub lead: String,
    /// Identity ([`crate::lineage`]) of the state it applies to.
    pub parent: String,
    /// Identity of the state it produces ([`crate::lineage::produce`] from `parent`, the
    /// window and the values).
    pub state: String,
    /// At an anchor window ([`crate::lineage::is_anchor`]), the full [`state_hash`] of the
    /// produced state (also inside `state`; here so that a node whose own full hash differs
    /// can say so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<String>,
    /// Included slices, sorted by hotkey.
    pub included: Vec<Included>,
    /// Excluded miners, sorted by hotkey.
    pub excluded: Vec<Excluded>,
    /// Miners the lead recomputed this window.
    pub scored: usize,
    /// The norm a slice included on its record is clipped to before it enters the mean with
    /// weight [`crate::protocol::RECORD_WEIGHT`]: the median listed norm of the slices
    /// included because recomputed this window, or (with none) the lead's recent median.
    pub record_clip: f64,
}

impl AcceptedSet {
    /// The factor an included slice's update is scaled by before the rule combines the
    /// slices: a weighted mean under the plain mean's `1/n`, weight 1 for a slice recomputed
    /// this window and [`crate::protocol::RECORD_WEIGHT`] for one included on its record,
    /// which is also clipped to `record_clip` ([`crate::slices::aggregate::bounded_factor`]).
    /// So the mean is `sum(w_i c_i d_i) / sum(w_i)`; with every slice recomputed, all factors
    /// are exactly 1.
    pub fn factor(&self, inc: &Included) -> f64 {
        record_factor(&self.included, self.record_clip, inc)
    }

    /// The median listed norm of the slices included because recomputed this window.
    pub fn recomputed_median(&self) -> Option<f64> {
        let mut n: Vec<f64> = self.included.iter().filter(|i| i.e.is_some()).map(|i| i.norm).collect();
        if n.is_empty() {
            return None;
        }
        n.sort_by(f64::total_cmp);
        Some(crate::slices::aggregate::median(&n))
    }
}

/// [`AcceptedSet::factor`] of `inc` among `included` with `record_clip`, before the set
/// itself exists (how the deciding validator scales the slices it includes).
pub fn record_factor(included: &[Included], record_clip: f64, inc: &Included) -> f64 {
    let w = crate::protocol::RECORD_WEIGHT;
    let n = included.len() as f64;
    let on_record = included.iter().filter(|i| i.e.is_none()).count() as f64;
    let total = (n - on_record) + w * on_record;
    let own = match inc.e {
        Some(_) => 1.0,
        None => crate::slices::aggregate::bounded_factor(inc.norm, record_clip, w),
    };
    if on_record == 0.0 { own } else { own * n / total }
}

/// A decoded aggregate: the decision and the combined gradient at the window's indices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AggregateObject {
    /// The decision.
    pub set: AcceptedSet,
    /// The combined gradient at the window's indices, per parameter in canonical order.
    pub values: Vec<Vec<f32>>,
}

/// What a valid aggregate of one window looks like.
#[derive(Clone, Debug)]
pub struct AggregateExpectation {
    /// The window.
    pub window: u64,
    /// Parameter names in canonical order.
    pub names: Vec<String>,
    /// Values per parameter (the slice lengths of the window's indices).
    pub lengths: Vec<usize>,
    /// Hash of the network's hyper-parameters.
    pub hparams_hash: String,
    /// Hash of the model config.
    pub model_hash: String,
}

impl AggregateExpectation {
    /// The largest object such an aggregate can be.
    pub fn max_bytes(&self) -> u64 {
        8 + header_bound(&self.names, AGGREGATE_METADATA_BYTES)
            + 4 * self.lengths.iter().map(|&l| l as u64).sum::<u64>()
    }

    fn meta(&self, set: &AcceptedSet) -> Result<HashMap<String, String>, Rejection> {
        let json = serde_json::to_string(set).map_err(|e| Rejection::Malformed(format!("accepted set: {e}")))?;
        Ok(HashMap::from([
            ("bistro_protocol".to_string(), PROTOCOL_VERSION.to_string()),
            ("kind".to_string(), KIND.to_string()),
            ("window".to_string(), self.window.to_string()),
            ("hparams_hash".to_string(), self.hparams_hash.clone()),
            ("model_hash".to_string(), self.model_hash.clone()),
            ("accepted".to_string(), json),
        ]))
    }
}

/// Serialise an aggregate.
pub fn encode(expect: &AggregateExpectation, obj: &AggregateObject) -> Result<Vec<u8>, Rejection> {
    if obj.values.len() != expect.names.len() {
        return Err(Rejection::Malformed(format!("{} tensors for {} names", obj.values.len(), expect.names.len())));
    }
    let bytes: Vec<Vec<u8>> = obj.values.iter().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = expect
        .names
        .iter()
        .zip(&bytes)
        .zip(&obj.values)
        .map(|((n, b), v)| {
            TensorView::new(Dtype::F32, vec![v.len()], b)
                .map(|t| (n.clone(), t))
                .map_err(|e| Rejection::Malformed(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(expect.meta(&obj.set)?)).map_err(|e| Rejection::Malformed(e.to_string()))
}

/// Decode and validate an aggregate: bounded size and header, parsed once, metadata equal
/// to the expectation (protocol, kind, window, hashes), the accepted set well-formed, and
/// exactly the expected finite f32 tensors.
pub fn decode(bytes: &[u8], expect: &AggregateExpectation) -> Result<AggregateObject, Rejection> {
    let parsed = parse_bounded(bytes, expect.max_bytes(), header_bound(&expect.names, AGGREGATE_METADATA_BYTES))?;
    let m = &parsed.meta;
    let want = [
        ("bistro_protocol", PROTOCOL_VERSION.to_string()),
        ("kind", KIND.to_string()),
        ("window", expect.window.to_string()),
        ("hparams_hash", expect.hparams_hash.clone()),
        ("model_hash", expect.model_hash.clone()),
    ];
    for (field, value) in want {
        if m.get(field) != Some(&value) {
            return Err(Rejection::Metadata {
                field: field.to_string(),
                expected: value,
                found: m.get(field).cloned().unwrap_or_else(|| "<absent>".into()),
            });
        }
    }
    let json = m.get("accepted").ok_or_else(|| Rejection::Metadata {
        field: "accepted".into(),
        expected: "the accepted set".into(),
        found: "<absent>".into(),
    })?;
    let set: AcceptedSet =
        serde_json::from_str(json).map_err(|e| Rejection::Malformed(format!("accepted set is not valid: {e}")))?;
    if set.window != expect.window {
        return Err(Rejection::Metadata {
            field: "accepted.window".into(),
            expected: expect.window.to_string(),
            found: set.window.to_string(),
        });
    }
    let is_hash = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hash(&set.parent) || !is_hash(&set.state) || set.full.as_deref().is_some_and(|f| !is_hash(f)) {
        return Err(Rejection::Malformed("parent, state and full must be hex sha256 hashes".into()));
    }
    let values = parsed.f32_tensors(&expect.names, &expect.lengths)?;
    Ok(AggregateObject { set, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expect() -> AggregateExpectation {
        AggregateExpectation {
            window: 7,
            names: vec!["a".into(), "b".into()],
            lengths: vec![2, 1],
            hparams_hash: "h".into(),
            model_hash: "m".into(),
        }
    }

    fn object() -> AggregateObject {
        AggregateObject {
            set: AcceptedSet {
                window: 7,
                lead: "v".into(),
                parent: "0".repeat(64),
                state: "1".repeat(64),
                full: None,
                included: vec![Included {
                    hotkey: "m1".into(),
                    sha256: "ab".into(),
                    norm: 0.5,
                    e: Some(1e-7),
                    verified_by: Vec::new(),
                }],
                excluded: vec![Excluded { hotkey: "m2".into(), reason: "missing".into(), detail: String::new() }],
                scored: 1,
                record_clip: 0.0,
            },
            values: vec![vec![1.0, 2.0], vec![3.0]],
        }
    }

    #[test]
    fn round_trip_and_every_field_checked() {
        let e = expect();
        let bytes = encode(&e, &object()).unwrap();
        assert_eq!(decode(&bytes, &e).unwrap(), object());
        let other_window = AggregateExpectation { window: 8, ..e.clone() };
        assert_eq!(decode(&bytes, &other_window).unwrap_err().code(), "metadata");
        let other_model = AggregateExpectation { model_hash: "x".into(), ..e.clone() };
        assert_eq!(decode(&bytes, &other_model).unwrap_err().code(), "metadata");
        let other_len = AggregateExpectation { lengths: vec![2, 2], ..e.clone() };
        assert_eq!(decode(&bytes, &other_len).unwrap_err().code(), "shape");
        let mut bad = object();
        bad.set.parent = "not a hash".into();
        assert_eq!(decode(&encode(&e, &bad).unwrap(), &e).unwrap_err().code(), "malformed");
        let mut nan = object();
        nan.values[0][1] = f32::NAN;
        assert_eq!(decode(&encode(&e, &nan).unwrap(), &e).unwrap_err().code(), "nan");
    }

    /// Every node computes the weights of a weighted mean from the floats in the accepted
    /// set (norms, the record clip): they must parse back bit for bit.
    #[test]
    fn floats_in_the_accepted_set_round_trip_exactly() {
        let e = expect();
        let mut o = object();
        let awkward: Vec<f64> = (1..200).map(|i| (i as f64 * 0.1 + 0.2).sqrt() / 3.0 + 1e-17 * i as f64).collect();
        o.set.record_clip = awkward[7];
        o.set.included = awkward
            .iter()
            .enumerate()
            .map(|(i, &n)| Included {
                hotkey: format!("m{i:03}"),
                sha256: "ab".into(),
                norm: n,
                e: None,
                verified_by: Vec::new(),
            })
            .collect();
        let back = decode(&encode(&e, &o).unwrap(), &e).unwrap();
        assert_eq!(back.set.record_clip.to_bits(), o.set.record_clip.to_bits());
        for (a, b) in back.set.included.iter().zip(&o.set.included) {
            assert_eq!(a.norm.to_bits(), b.norm.to_bits());
            assert_eq!(back.set.factor(a).to_bits(), o.set.factor(b).to_bits());
        }
    }

    #[test]
    fn header_bomb_is_rejected_before_parsing() {
        let e = expect();
        let mut bytes = (50_000_000u64).to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(b' ', 1000));
        let r = decode(&bytes, &e).unwrap_err();
        assert_eq!(r.code(), "malformed", "{r}");
        assert!(r.to_string().contains("exceeds the bound"), "{r}");
    }

    #[test]
    fn lead_is_most_stake_then_lowest_uid() {
        let n = |uid, stake, permit| Neuron {
            uid,
            hotkey: format!("h{uid}"),
            stake,
            validator_permit: permit,
            incentive: 0.0,
        };
        let mg = Metagraph {
            netuid: 1,
            block: 0,
            neurons: vec![n(0, 5, true), n(1, 9, false), n(2, 7, true), n(3, 7, true)],
        };
        let order: Vec<u16> = validators_by_stake(&mg).iter().map(|n| n.uid).collect();
        assert_eq!(order, vec![2, 3, 0]);
        assert_eq!(crate::protocol::parse_aggregate_key(&crate::protocol::aggregate_key(12)), Some(12));
        assert_eq!(crate::protocol::parse_aggregate_key("aggregate-x.safetensors"), None);
    }
}
