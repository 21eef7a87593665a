//! Many storage values at one block in one round trip: `state_queryStorageAt` with every
//! key (in chunks of [`CHUNK`]), so that reading a subnet of 256 uids costs a fixed number
//! of calls instead of one per key (scale review: ~2,000 sequential round trips per window
//! at 256 uids).

// These run inside `with_client`, whose closures return `subxt::Error` (it decides whether
// the connection survives); boxing it here would only be unboxed there.
#![allow(clippy::result_large_err)]

use subxt::ext::codec::Decode;
use subxt::rpcs::RpcClient;
use subxt::utils::H256;

/// Keys per `state_queryStorageAt` call (a node's default request limits take this easily).
pub(super) const CHUNK: usize = 1024;

/// The values of `keys` at block `at`, in the keys' order (`None` where unset).
pub(super) async fn query_at(
    rpc: &RpcClient,
    keys: &[Vec<u8>],
    at: H256,
) -> Result<Vec<Option<Vec<u8>>>, subxt::Error> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK) {
        let hex_keys: Vec<String> = chunk.iter().map(|k| format!("0x{}", hex::encode(k))).collect();
        let sets: Vec<ChangeSet> =
            rpc.request("state_queryStorageAt", subxt::rpcs::rpc_params![hex_keys.clone(), at]).await?;
        let mut found = std::collections::HashMap::new();
        for set in sets {
            for (k, v) in set.changes {
                found.insert(k.to_ascii_lowercase(), v);
            }
        }
        for k in &hex_keys {
            let v = match found.get(k).cloned().flatten() {
                Some(hexv) => Some(
                    hex::decode(hexv.trim_start_matches("0x"))
                        .map_err(|e| subxt::Error::other_str(format!("a storage value is not hex: {e}")))?,
                ),
                None => None,
            };
            out.push(v);
        }
    }
    Ok(out)
}

/// One `state_queryStorageAt` answer: the block and `(key, value or null)` pairs, hex.
#[derive(serde::Deserialize)]
struct ChangeSet {
    changes: Vec<(String, Option<String>)>,
}

/// Decode a whole SCALE value.
pub(super) fn decode<T: Decode>(bytes: &[u8]) -> Result<T, subxt::Error> {
    let mut input = bytes;
    let v = T::decode(&mut input).map_err(subxt::Error::OtherCodecError)?;
    if !input.is_empty() {
        return Err(subxt::Error::other_str(format!("{} bytes left after a storage value", input.len())));
    }
    Ok(v)
}

/// Decode `value`, or `default` when it is unset.
pub(super) fn decode_or<T: Decode>(value: &Option<Vec<u8>>, default: T) -> Result<T, subxt::Error> {
    value.as_deref().map(decode).unwrap_or(Ok(default))
}
