//! Encoding and decoding: accounts and signers, the `Data::Raw<N>`/`BigRaw` commitment field, and the
//! extrinsics this client submits.

use subxt::dynamic::{self, Value};
use subxt::utils::AccountId32;
use subxt_signer::sr25519::Keypair;

use crate::{ChainError, Result};

/// Parse an ss58 address into an account id.
pub fn account_id(ss58: &str) -> Result<AccountId32> {
    ss58.parse::<AccountId32>().map_err(|e| ChainError::Config(format!("`{ss58}` is not an ss58 address: {e}")))
}

/// A signer from a Bittensor hotkey file's `secretSeed` (hex, with or without `0x`).
pub fn keypair_from_seed_hex(seed_hex: &str) -> Result<Keypair> {
    let bytes = hex::decode(seed_hex.trim_start_matches("0x"))
        .map_err(|_| ChainError::Wallet("secretSeed is not hex".into()))?;
    let seed: [u8; 32] = bytes.try_into().map_err(|_| ChainError::Wallet("secretSeed must be 32 bytes".into()))?;
    Keypair::from_secret_key(seed).map_err(|e| ChainError::Wallet(format!("bad secretSeed: {e}")))
}

/// The SCALE `Data` value that holds `bytes`: `Raw<N>` up to [`RAW_MAX_BYTES`] (the variant
/// index carries the length, as every subtensor since the commitments pallet reads), else
/// `BigRaw` (a length-prefixed vector) up to [`crate::MAX_COMMITMENT_BYTES`]. An R2 bucket
/// URL with its read key (about 220 bytes) needs `BigRaw`.
pub fn raw_data(bytes: &[u8]) -> Result<Value> {
    crate::check_commitment_len(bytes.len())?;
    if bytes.len() <= RAW_MAX_BYTES {
        return Ok(Value::variant(
            format!("Raw{}", bytes.len()),
            subxt::ext::scale_value::Composite::unnamed([Value::from_bytes(bytes)]),
        ));
    }
    Ok(Value::variant("BigRaw", subxt::ext::scale_value::Composite::unnamed([Value::from_bytes(bytes)])))
}

/// The longest commitment field a `Raw<N>` variant holds.
pub const RAW_MAX_BYTES: usize = 128;

/// The bytes of the first `Raw<N>` or `BigRaw` field of a decoded `Registration`/`CommitmentInfo` value.
pub(super) fn first_raw_field(v: &Value<()>) -> Option<Vec<u8>> {
    use subxt::ext::scale_value::{Composite, Primitive, ValueDef, Variant};
    fn bytes_of(v: &Value<()>) -> Option<Vec<u8>> {
        match &v.value {
            // A newtype around the bytes (BigRaw's `BoundedVec`): look inside.
            ValueDef::Composite(Composite::Unnamed(items))
                if items.len() == 1 && matches!(items[0].value, ValueDef::Composite(_)) =>
            {
                bytes_of(&items[0])
            }
            ValueDef::Composite(Composite::Unnamed(items)) => items
                .iter()
                .map(|x| match &x.value {
                    ValueDef::Primitive(Primitive::U128(b)) => u8::try_from(*b).ok(),
                    _ => None,
                })
                .collect(),
            ValueDef::Composite(Composite::Named(items)) if items.len() == 1 => bytes_of(&items[0].1),
            _ => None,
        }
    }
    fn search(v: &Value<()>) -> Option<Vec<u8>> {
        match &v.value {
            ValueDef::Variant(Variant { name, values }) if name.starts_with("Raw") || name == "BigRaw" => {
                let inner: Vec<&Value<()>> = values.values().collect();
                inner.first().and_then(|x| bytes_of(x)).or_else(|| Some(Vec::new()))
            }
            ValueDef::Variant(Variant { values, .. }) => values.values().find_map(search),
            ValueDef::Composite(c) => c.values().find_map(search),
            _ => None,
        }
    }
    search(v)
}

/// The `SubtensorModule.set_weights(netuid, dests, weights, version_key)` call.
pub fn set_weights_call(
    netuid: u16,
    uids: &[u16],
    weights: &[u16],
    version_key: u64,
) -> subxt::tx::DynamicPayload<Vec<Value>> {
    dynamic::transaction(
        "SubtensorModule",
        "set_weights",
        vec![
            Value::u128(netuid as u128),
            Value::unnamed_composite(uids.iter().map(|&u| Value::u128(u as u128))),
            Value::unnamed_composite(weights.iter().map(|&w| Value::u128(w as u128))),
            Value::u128(version_key as u128),
        ],
    )
}

/// The `SubtensorModule.commit_timelocked_weights(netuid, commit, reveal_round,
/// commit_reveal_version)` call.
pub fn commit_timelocked_weights_call(
    netuid: u16,
    commit: &[u8],
    reveal_round: u64,
    version: u16,
) -> subxt::tx::DynamicPayload<Vec<Value>> {
    dynamic::transaction(
        "SubtensorModule",
        "commit_timelocked_weights",
        vec![
            Value::u128(netuid as u128),
            Value::from_bytes(commit),
            Value::u128(reveal_round as u128),
            Value::u128(version as u128),
        ],
    )
}

/// The `Commitments.set_commitment(netuid, CommitmentInfo { fields: [Raw<N>(url) or BigRaw(url)] })` call.
pub fn set_commitment_call(netuid: u16, data: &str) -> Result<subxt::tx::DynamicPayload<Vec<Value>>> {
    let info = Value::named_composite([("fields", Value::unnamed_composite([raw_data(data.as_bytes())?]))]);
    Ok(dynamic::transaction("Commitments", "set_commitment", vec![Value::u128(netuid as u128), info]))
}
