//! The real subxt client against an in-process mock node that answers from real recorded
//! subtensor data (`tests/fixtures/golden.json`, bittensor 11.3.0, Apache-2.0): storage
//! keys, decoded values, call data and the signer payload must equal the recording byte
//! for byte, a commitment round-trips (a real-length R2 URL too, also through the devnet),
//! and a wallet file signs what the fixture expects.

mod conformance;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bistro_chain::subtensor::{self, Subtensor};
use bistro_chain::wallet::read_hotkey_file;
use bistro_chain::{Chain, ChainError};
use serde_json::{Value as Json, json};
use subxt::backend::LegacyBackend;
use subxt::dynamic;
use subxt::{OnlineClient, SubstrateConfig};
use subxt_rpcs::client::mock_rpc_client::Json as J;
use subxt_rpcs::client::{MockRpcClient, RpcClient};

fn golden() -> Json {
    serde_json::from_str(include_str!("fixtures/golden.json")).expect("golden.json")
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.trim_start_matches("0x")).expect("hex")
}

/// SCALE compact encoding of a small length.
fn compact(n: usize) -> Vec<u8> {
    assert!(n < 1 << 14);
    if n < 64 { vec![(n as u8) << 2] } else { (((n as u16) << 2) | 1).to_le_bytes().to_vec() }
}

fn scale_str(s: &str) -> Vec<u8> {
    let mut v = compact(s.len());
    v.extend_from_slice(s.as_bytes());
    v
}

/// `RuntimeVersion` as the runtime's `Core_version` returns it.
fn runtime_version(spec: u32, tx: u32) -> Vec<u8> {
    let mut v = scale_str("node-subtensor");
    v.extend(scale_str("node-subtensor"));
    v.extend(1u32.to_le_bytes()); // authoring_version
    v.extend(spec.to_le_bytes());
    v.extend(1u32.to_le_bytes()); // impl_version
    v.extend(compact(0)); // apis
    v.extend(tx.to_le_bytes());
    v.push(1); // system_version
    v
}

type Storage = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

/// RPC calls the mock answered, by method.
type Calls = Arc<Mutex<HashMap<String, usize>>>;

/// A mock node serving golden data plus `storage` (key -> SCALE value).
async fn mock_client(storage: Storage) -> OnlineClient<SubstrateConfig> {
    mock_node(storage).await.0
}

/// [`mock_client`], with the RPC client under it and a count of the calls it answered.
async fn mock_node(storage: Storage) -> (OnlineClient<SubstrateConfig>, RpcClient, Calls) {
    let calls: Calls = Arc::default();
    let g = golden();
    let genesis = g["network"]["genesis_hash"].as_str().unwrap().to_string();
    let head = g["block"]["block_hash"].as_str().unwrap().to_string();
    let spec = g["network"]["spec_version"].as_u64().unwrap() as u32;
    let txv = g["network"]["transaction_version"].as_u64().unwrap() as u32;
    let mut header = g["block"]["decoded_header"].clone();
    let number = header["number"].as_u64().unwrap();
    header["number"] = json!(format!("0x{number:x}"));
    if let Some(o) = header.as_object_mut() {
        o.remove("hash");
    }
    let metadata_v15 = g["metadata"]["v15_hex"].as_str().unwrap().to_string();
    for v in g["storage_values"].as_array().unwrap() {
        // Absent values are recorded as null.
        if let Some(raw) = v["raw_hex"].as_str() {
            storage.lock().unwrap().insert(unhex(v["key_hex"].as_str().unwrap()), unhex(raw));
        }
    }
    let (g1, h1, h2, h3) = (genesis.clone(), head.clone(), head.clone(), head.clone());
    let version_json = json!({"specName": "node-subtensor", "implName": "node-subtensor", "authoringVersion": 1,
        "specVersion": spec, "implVersion": 1, "apis": [], "transactionVersion": txv, "stateVersion": 1});
    let v2 = version_json.clone();
    let count = |calls: &Calls, method: &str| *calls.lock().unwrap().entry(method.to_string()).or_default() += 1;
    let (c1, c2, c3) = (calls.clone(), calls.clone(), calls.clone());
    let batch_storage = storage.clone();
    let mock = MockRpcClient::builder()
        .method_handler("chain_getBlockHash", move |params| {
            let (g1, h1) = (g1.clone(), h1.clone());
            count(&c1, "chain_getBlockHash");
            async move {
                let n = params
                    .and_then(|p| serde_json::from_str::<Vec<Json>>(p.get()).ok())
                    .and_then(|v| v.first().and_then(|x| x.as_u64()));
                J(match n {
                    Some(0) => g1,
                    Some(n) if n < number => format!("0x{}", hex::encode(sha_block(n))),
                    _ => h1,
                })
            }
        })
        .method_handler("chain_getFinalizedHead", move |_| {
            let h = h2.clone();
            async move { J(h) }
        })
        .method_handler("chain_getHeader", move |_| {
            let h = header.clone();
            async move { J(h) }
        })
        .method_handler("state_getRuntimeVersion", move |_| {
            let v = version_json.clone();
            async move { J(v) }
        })
        .method_handler("system_accountNextIndex", |_| async { J(7u64) })
        .method_handler("state_call", move |params| {
            let md = metadata_v15.clone();
            async move {
                let p: Vec<Json> = params.and_then(|p| serde_json::from_str(p.get()).ok()).unwrap_or_default();
                let name = p.first().and_then(|x| x.as_str()).unwrap_or_default().to_string();
                let out = match name.as_str() {
                    "Core_version" => format!("0x{}", hex::encode(runtime_version(spec, txv))),
                    "Metadata_metadata_versions" => "0x080e0000000f000000".to_string(),
                    "Metadata_metadata_at_version" => md,
                    "AccountNonceApi_account_nonce" => "0x07000000".to_string(),
                    other => panic!("unexpected runtime call {other}"),
                };
                J(out)
            }
        })
        .method_handler("state_getStorage", move |params| {
            let storage = storage.clone();
            count(&c2, "state_getStorage");
            async move {
                let p: Vec<Json> = params.and_then(|p| serde_json::from_str(p.get()).ok()).unwrap_or_default();
                let key = unhex(p.first().and_then(|x| x.as_str()).unwrap_or("0x"));
                J(storage.lock().unwrap().get(&key).map(|v| format!("0x{}", hex::encode(v))))
            }
        })
        .method_handler("state_getKeysPaged", |_| async { J(Vec::<String>::new()) })
        .method_handler("state_queryStorageAt", move |params| {
            let storage = batch_storage.clone();
            count(&c3, "state_queryStorageAt");
            async move {
                let p: Vec<Json> = params.and_then(|p| serde_json::from_str(p.get()).ok()).unwrap_or_default();
                let keys: Vec<String> =
                    p.first().and_then(|k| serde_json::from_value(k.clone()).ok()).unwrap_or_default();
                let s = storage.lock().unwrap();
                let changes: Vec<(String, Option<String>)> = keys
                    .into_iter()
                    .map(|k| {
                        let v = s.get(&unhex(&k)).map(|v| format!("0x{}", hex::encode(v)));
                        (k, v)
                    })
                    .collect();
                J(json!([{ "block": p.get(1).cloned().unwrap_or(Json::Null), "changes": changes }]))
            }
        })
        .subscription_handler("state_subscribeRuntimeVersion", move |_, _| {
            let v = v2.clone();
            async move { vec![J(v)] }
        })
        .subscription_handler("chain_subscribeFinalizedHeads", move |_, _| {
            let _ = h3.clone();
            async move { Vec::<J<Json>>::new() }
        })
        .build();
    let rpc = RpcClient::new(mock);
    let backend = LegacyBackend::builder().build(rpc.clone());
    let client = OnlineClient::<SubstrateConfig>::from_backend(Arc::new(backend)).await.expect("client over the mock");
    (client, rpc, calls)
}

/// A `Commitments.CommitmentOf` value as the chain stores it: `Registration { deposit,
/// block, info: { fields: [Raw<N>(url)] } }`.
fn raw_registration(url: &str) -> Vec<u8> {
    let mut reg = 0u64.to_le_bytes().to_vec();
    reg.extend(60u32.to_le_bytes());
    reg.extend(compact(1));
    reg.push(url.len() as u8 + 1);
    reg.extend(url.as_bytes());
    reg
}

/// The storage key of `who`'s commitment on `netuid`, from the recorded metadata.
fn commitment_key<C: subxt::client::OfflineClientAtBlockT<SubstrateConfig>>(
    at: &subxt::client::ClientAtBlock<SubstrateConfig, C>,
    netuid: u16,
    who: [u8; 32],
) -> Vec<u8> {
    at.storage()
        .entry(dynamic::storage::<(u16, [u8; 32]), dynamic::Value>("Commitments", "CommitmentOf"))
        .unwrap()
        .fetch_key((netuid, who))
        .unwrap()
}

fn sha_block(n: u64) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(n.to_le_bytes()).into()
}

const ALICE: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
const BOB: &str = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty";
/// Alice's well-known development mini-secret (`//Alice`).
const ALICE_SEED: &str = "0xe5be9a5092b81bca64be81d212e7f2f9eba183bb7a90954f7b76361f6edb5c0a";

#[tokio::test]
async fn storage_keys_values_and_call_data_equal_the_recording() {
    let g = golden();
    let client = mock_client(Arc::new(Mutex::new(HashMap::new()))).await;
    assert_eq!(format!("{:?}", client.genesis_hash()), g["network"]["genesis_hash"].as_str().unwrap());
    let at = client.at_current_block().await.unwrap();
    assert_eq!(at.block_number(), 67);
    // Storage keys, byte for byte.
    for k in g["storage_keys"].as_array().unwrap() {
        let (pallet, entry) = (k["pallet"].as_str().unwrap(), k["storage_function"].as_str().unwrap());
        let want = k["key_hex"].as_str().unwrap();
        let got = match (pallet, entry) {
            ("SubtensorModule", "Tempo" | "NetworksAdded" | "BlocksSinceLastStep") => {
                let p = k["params"][0].as_u64().unwrap() as u16;
                at.storage()
                    .entry(dynamic::storage::<(u16,), dynamic::Value>(pallet, entry))
                    .unwrap()
                    .fetch_key((p,))
                    .unwrap()
            }
            ("SubtensorModule", "Keys" | "Bonds") => {
                let (a, b) = (k["params"][0].as_u64().unwrap() as u16, k["params"][1].as_u64().unwrap() as u16);
                at.storage()
                    .entry(dynamic::storage::<(u16, u16), dynamic::Value>(pallet, entry))
                    .unwrap()
                    .fetch_key((a, b))
                    .unwrap()
            }
            ("System", "Account") => {
                let who = subtensor::account_id(k["params"][0].as_str().unwrap()).unwrap();
                at.storage()
                    .entry(dynamic::storage::<([u8; 32],), dynamic::Value>(pallet, entry))
                    .unwrap()
                    .fetch_key((who.0,))
                    .unwrap()
            }
            ("System", "Events") | ("Timestamp", "Now") => at
                .storage()
                .entry(dynamic::storage::<(), dynamic::Value>(pallet, entry))
                .unwrap()
                .fetch_key(())
                .unwrap(),
            _ => continue,
        };
        assert_eq!(format!("0x{}", hex::encode(got)), want, "{pallet}.{entry}");
    }
    // Values, decoded.
    let tempo = at
        .storage()
        .fetch(dynamic::storage::<(u16,), u16>("SubtensorModule", "Tempo"), (1,))
        .await
        .unwrap()
        .decode()
        .unwrap();
    assert_eq!(tempo, 100);
    let now = at.storage().fetch(dynamic::storage::<(), u64>("Timestamp", "Now"), ()).await.unwrap().decode().unwrap();
    let want_now =
        g["storage_values"].as_array().unwrap().iter().find(|v| v["storage_function"] == "Now").unwrap()["decoded"]
            .as_u64()
            .unwrap();
    assert_eq!(now, want_now);
    // set_weights call data, byte for byte.
    let golden_call = g["calls"].as_array().unwrap().iter().find(|c| c["function"] == "set_weights").unwrap();
    let data = at.transactions().call_data(&subtensor::set_weights_call(1, &[0, 1], &[100, 200], 0)).unwrap();
    assert_eq!(format!("0x{}", hex::encode(data)), golden_call["data_hex"].as_str().unwrap());

    // commit_timelocked_weights through the recorded metadata: the same pallet index as the
    // recorded set_weights (byte 0), call index 113, then netuid u16, the commit as a
    // compact-length byte vector, reveal_round u64 and commit_reveal_version u16, SCALE.
    let commit: Vec<u8> = (0u8..70).collect();
    let data = at.transactions().call_data(&subtensor::commit_timelocked_weights_call(1, &commit, 1000, 4)).unwrap();
    let set_weights_pallet = unhex(golden_call["data_hex"].as_str().unwrap())[0];
    let mut expected = vec![set_weights_pallet, 113];
    expected.extend(1u16.to_le_bytes());
    expected.extend(compact(commit.len()));
    expected.extend(&commit);
    expected.extend(1000u64.to_le_bytes());
    expected.extend(4u16.to_le_bytes());
    assert_eq!(hex::encode(data), hex::encode(expected));
}

#[tokio::test]
async fn signer_payload_equals_the_recording_and_a_wallet_file_signs_it() {
    let g = golden();
    let client = mock_client(Arc::new(Mutex::new(HashMap::new()))).await;
    let at = client.at_current_block().await.unwrap();
    let sp = &g["signature_payloads"][0];
    // transfer_keep_alive(Bob, 12345), immortal, nonce 7, no tip.
    let call = dynamic::transaction(
        "Balances",
        "transfer_keep_alive",
        vec![
            dynamic::Value::unnamed_variant("Id", [dynamic::Value::from_bytes(subtensor::account_id(BOB).unwrap().0)]),
            dynamic::Value::u128(12345),
        ],
    );
    assert_eq!(
        format!("0x{}", hex::encode(at.transactions().call_data(&call).unwrap())),
        sp["call_data_hex"].as_str().unwrap()
    );
    let params = subxt::config::DefaultExtrinsicParamsBuilder::<SubstrateConfig>::new().immortal().nonce(7).build();
    let signable = at.transactions().create_v4_signable_offline(&call, params).unwrap();
    let payload = signable.signer_payload().unwrap();
    assert_eq!(format!("0x{}", hex::encode(&payload)), sp["payload_hex"].as_str().unwrap());

    // A Bittensor hotkey file holding Alice's seed: its key is Alice's and its signature verifies.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice");
    std::fs::write(
        &path,
        json!({"secretSeed": ALICE_SEED, "ss58Address": ALICE, "publicKey": g["ss58"][0]["public_key_hex"]})
            .to_string(),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let file = read_hotkey_file(&path).unwrap();
    let key = subtensor::keypair_from_seed_hex(file.secret_seed().unwrap()).unwrap();
    assert_eq!(format!("0x{}", hex::encode(key.public_key().0)), g["ss58"][0]["public_key_hex"].as_str().unwrap());
    assert_eq!(subxt::utils::AccountId32::from(key.public_key().0).to_string(), ALICE);
    let sig = key.sign(&payload);
    assert!(subxt_signer::sr25519::verify(&sig, &payload, &key.public_key()));
    // The fixture's signed extrinsic carries a signature by the same key over the same payload.
    let ext = &g["extrinsics"][0];
    assert_eq!(ext["public_key_hex"].as_str().unwrap(), g["ss58"][0]["public_key_hex"].as_str().unwrap());
}

#[tokio::test]
async fn metagraph_and_commitment_through_the_chain_trait() {
    let storage: Storage = Arc::new(Mutex::new(HashMap::new()));
    let (client, rpc, _) = mock_node(storage.clone()).await;
    let at = client.at_current_block().await.unwrap();
    let key = |entry: &str, parts: Vec<u8>| -> Vec<u8> {
        // Recompute keys with subxt from the real metadata.
        match entry {
            "SubnetworkN"
            | "ValidatorPermit"
            | "Incentive"
            | "CommitRevealWeightsEnabled"
            | "Tempo"
            | "RevealPeriodEpochs" => {
                let n = u16::from_le_bytes([parts[0], parts[1]]);
                at.storage()
                    .entry(dynamic::storage::<(u16,), dynamic::Value>("SubtensorModule", entry))
                    .unwrap()
                    .fetch_key((n,))
                    .unwrap()
            }
            _ => unreachable!(),
        }
    };
    let alice = subtensor::account_id(ALICE).unwrap();
    let bob = subtensor::account_id(BOB).unwrap();
    let url = "s3://bistro-bob/miner?endpoint=https://r2.example.com";
    {
        let mut s = storage.lock().unwrap();
        s.insert(key("SubnetworkN", 1u16.to_le_bytes().to_vec()), 2u16.to_le_bytes().to_vec());
        s.insert(key("ValidatorPermit", 1u16.to_le_bytes().to_vec()), vec![0x08, 1, 0]);
        s.insert(
            key("Incentive", 1u16.to_le_bytes().to_vec()),
            [vec![0x08], 0u16.to_le_bytes().to_vec(), 65535u16.to_le_bytes().to_vec()].concat(),
        );
        s.insert(key("CommitRevealWeightsEnabled", 1u16.to_le_bytes().to_vec()), vec![1]);
        s.insert(key("Tempo", 1u16.to_le_bytes().to_vec()), 99u16.to_le_bytes().to_vec());
        s.insert(key("RevealPeriodEpochs", 1u16.to_le_bytes().to_vec()), 1u64.to_le_bytes().to_vec());
        for (pallet, item, value) in [
            ("Drand", "LastStoredRound", 5000u64.to_le_bytes().to_vec()),
            ("SubtensorModule", "CommitRevealWeightsVersion", 4u16.to_le_bytes().to_vec()),
        ] {
            let k = at
                .storage()
                .entry(dynamic::storage::<(), dynamic::Value>(pallet, item))
                .unwrap()
                .fetch_key(())
                .unwrap();
            s.insert(k, value);
        }
        for (uid, who) in [(0u16, &alice), (1, &bob)] {
            let k = at
                .storage()
                .entry(dynamic::storage::<(u16, u16), dynamic::Value>("SubtensorModule", "Keys"))
                .unwrap()
                .fetch_key((1, uid))
                .unwrap();
            s.insert(k, who.0.to_vec());
            let k = at
                .storage()
                .entry(dynamic::storage::<(u16, [u8; 32]), dynamic::Value>("SubtensorModule", "Uids"))
                .unwrap()
                .fetch_key((1, who.0))
                .unwrap();
            s.insert(k, uid.to_le_bytes().to_vec());
        }
        let k = at
            .storage()
            .entry(dynamic::storage::<([u8; 32], u16), dynamic::Value>("SubtensorModule", "TotalHotkeyAlpha"))
            .unwrap()
            .fetch_key((alice.0, 1))
            .unwrap();
        s.insert(k, 5_000_000_000u64.to_le_bytes().to_vec());
        // Bob's commitment: Registration { deposit, block, info: { fields: [Raw(url)] } }.
        s.insert(commitment_key(&at, 1, bob.0), raw_registration(url));
    }

    let chain = Subtensor::from_client("golden mock", client.clone(), rpc.clone(), None, Duration::from_secs(10));
    assert_eq!(chain.block_number().await.unwrap(), 67);
    assert!(matches!(chain.block_hash(68).await, Err(ChainError::FutureBlock(68))));
    let mg = chain.metagraph(1).await.unwrap();
    assert_eq!(mg.neurons.len(), 2);
    assert_eq!(mg.neurons[0].hotkey, ALICE);
    assert_eq!(mg.neurons[0].stake, 5_000_000_000);
    assert!(mg.neurons[0].validator_permit && !mg.neurons[1].validator_permit);
    assert!((mg.neurons[1].incentive - 1.0).abs() < 1e-12);
    assert_eq!(chain.commitment(1, BOB).await.unwrap().as_deref(), Some(url));
    // Read at an earlier block through the same storage keys (the recording holds one state).
    assert_eq!(chain.metagraph_at(1, 60).await.unwrap().neurons, mg.neurons);
    assert_eq!(chain.commitment_at(1, BOB, 60).await.unwrap().as_deref(), Some(url));
    assert_eq!(chain.commitment(1, ALICE).await.unwrap(), None);
    assert_eq!(chain.ensure_registered(1, BOB, 0).await.unwrap(), 1);
    let e = chain.ensure_registered(2, BOB, 0).await.unwrap_err().to_string();
    assert!(e.contains("not registered") && e.contains("btcli"), "{e}");
    // Commit-reveal is on for netuid 1: set_weights is a clear error, nothing submitted...
    let e = chain.set_weights(1, ALICE, &[1], &[65535], 1).await.unwrap_err().to_string();
    assert!(e.contains("CommitRevealEnabled"), "{e}");
    // ... and the commit parameters follow from the chain's state: block 67, tempo 99,
    // netuid 1 -> the epoch ends in 31 blocks; 31 + 3 blocks of 12 s = 136 rounds of 3 s.
    let bistro_chain::WeightsMode::CommitReveal(p) = chain.weights_mode(1).await.unwrap() else {
        panic!("commit-reveal is on")
    };
    assert_eq!((p.reveal_block, p.reveal_round, p.version), (67 + 31, 5000 + 136, 4));
    assert_eq!(hex::encode(&p.beacon_public_key), bistro_chain::commit_reveal::QUICKNET_PUBLIC_KEY);
    assert_eq!(chain.account_bytes(ALICE).unwrap(), alice.0.to_vec());
    // The same suite the devnet passes.
    conformance::run(&chain, 1, ALICE).await;
    // The commitment call encodes as Commitments (18).set_commitment (0), netuid, one Raw<N> field.
    let data = at.transactions().call_data(&subtensor::set_commitment_call(1, url).unwrap()).unwrap();
    let mut want = vec![18u8, 0, 1, 0];
    want.extend(compact(1));
    want.push(url.len() as u8 + 1);
    want.extend(url.as_bytes());
    assert_eq!(data, want);
    assert!(subtensor::set_commitment_call(1, &"x".repeat(513)).is_err());
}

/// A real-length R2 bucket URL with its read-only key: a 32-hex account id, a 32-character
/// key id and a 64-character secret. 223 bytes, over `Raw<N>`'s 128.
fn r2_url() -> String {
    let account = "0123456789abcdef0123456789abcdef";
    let key_id = "fedcba9876543210fedcba9876543210";
    let secret = "a".repeat(32) + &"b".repeat(32);
    let url = format!(
        "s3://bistro/miner?endpoint=https://{account}.r2.cloudflarestorage.com&region=auto\
         &read_key={key_id}&read_secret={secret}"
    );
    assert_eq!(url.len(), 223);
    url
}

#[tokio::test]
async fn a_real_length_r2_url_commits_as_big_raw_and_reads_back() {
    // The recorded runtime's `Data` enum: BigRaw is variant 136, after None, Raw0..Raw128,
    // BlakeTwo256, Sha256, Keccak256, ShaThree256, TimelockEncrypted and ResetBondsFlag.
    let storage: Storage = Arc::new(Mutex::new(HashMap::new()));
    let (client, rpc, _) = mock_node(storage.clone()).await;
    let at = client.at_current_block().await.unwrap();
    let url = r2_url();
    // The call encodes through the recorded metadata (an unknown variant would fail here):
    // Commitments (18).set_commitment (0), netuid 1, one field: BigRaw (136), compact
    // length, bytes.
    let data = at.transactions().call_data(&subtensor::set_commitment_call(1, &url).unwrap()).unwrap();
    let mut want = vec![18u8, 0, 1, 0];
    want.extend(compact(1));
    want.push(136);
    want.extend(compact(url.len()));
    want.extend(url.as_bytes());
    assert_eq!(data, want);
    // A 128-byte URL still goes out as Raw128 (variant 129), as older nodes read it.
    let short = "s".repeat(128);
    let data = at.transactions().call_data(&subtensor::set_commitment_call(1, &short).unwrap()).unwrap();
    assert_eq!(data[5], 129);
    // Bob's commitment as the chain stores it: Registration { deposit, block, info: { fields:
    // [BigRaw(url)] } }, read back through the Chain trait.
    let bob = subtensor::account_id(BOB).unwrap();
    let mut reg = 0u64.to_le_bytes().to_vec();
    reg.extend(60u32.to_le_bytes());
    reg.extend(compact(1));
    reg.push(136);
    reg.extend(compact(url.len()));
    reg.extend(url.as_bytes());
    let k = at
        .storage()
        .entry(dynamic::storage::<(u16, [u8; 32]), dynamic::Value>("Commitments", "CommitmentOf"))
        .unwrap()
        .fetch_key((1, bob.0))
        .unwrap();
    storage.lock().unwrap().insert(k, reg);
    let chain = Subtensor::from_client("golden mock", client.clone(), rpc.clone(), None, Duration::from_secs(10));
    assert_eq!(chain.commitment(1, BOB).await.unwrap().as_deref(), Some(url.as_str()));
    // Over the BigRaw bound: a clear error before anything is submitted.
    let e = subtensor::set_commitment_call(1, &"x".repeat(bistro_chain::MAX_COMMITMENT_BYTES + 1)).unwrap_err();
    assert!(e.to_string().contains("513 bytes") && e.to_string().contains("512-byte"), "{e}");
}

#[tokio::test]
async fn a_real_length_r2_url_round_trips_through_the_devnet() {
    let dir = tempfile::tempdir().unwrap();
    let d = bistro_chain::devnet::Devnet::open(dir.path(), Duration::from_millis(50)).unwrap();
    d.ensure_registered(1, "alice", 0).await.unwrap();
    let url = r2_url();
    d.set_commitment(1, "alice", &url).await.unwrap();
    assert_eq!(d.commitment(1, "alice").await.unwrap().as_deref(), Some(url.as_str()));
    // A second process reads what the first committed.
    let again = bistro_chain::devnet::Devnet::open(dir.path(), Duration::from_millis(50)).unwrap();
    assert_eq!(again.commitment(1, "alice").await.unwrap().as_deref(), Some(url.as_str()));
    let e = d.set_commitment(1, "alice", &"x".repeat(513)).await.unwrap_err().to_string();
    assert!(e.contains("512-byte commitment limit"), "{e}");
    assert_eq!(d.commitment(1, "alice").await.unwrap().as_deref(), Some(url.as_str()), "the old one stays");
}

#[tokio::test]
async fn unreachable_endpoint_is_a_clear_error_within_the_timeout() {
    let start = std::time::Instant::now();
    let e = Subtensor::connect("ws://127.0.0.1:9", None, Duration::from_secs(2)).await.expect_err("must fail");
    assert!(start.elapsed() < Duration::from_secs(10));
    let text = e.to_string();
    assert!(text.contains("127.0.0.1:9") && text.contains("cannot connect"), "{text}");
}

/// Fill `storage` with a subnet 2 of `n` neurons (hotkey i = [i, i+1, ...], stake 1000 + i,
/// permits for every 8th, a `Raw` commitment each) through keys computed from the
/// recorded metadata.
async fn subnet_of(client: &OnlineClient<SubstrateConfig>, storage: &Storage, n: u16) {
    use subxt::ext::codec::Encode;
    let at = client.at_current_block().await.unwrap();
    let mut s = storage.lock().unwrap();
    let subnet_key = |item: &str| {
        at.storage()
            .entry(dynamic::storage::<(u16,), dynamic::Value>("SubtensorModule", item))
            .unwrap()
            .fetch_key((2,))
            .unwrap()
    };
    s.insert(subnet_key("SubnetworkN"), n.encode());
    s.insert(subnet_key("ValidatorPermit"), (0..n).map(|i| i % 8 == 0).collect::<Vec<bool>>().encode());
    s.insert(subnet_key("Incentive"), (0..n).map(|i| i * 10).collect::<Vec<u16>>().encode());
    for uid in 0..n {
        let who: [u8; 32] = std::array::from_fn(|j| (uid as usize + j) as u8 ^ (uid >> 8) as u8 ^ 0x5a);
        let k = at
            .storage()
            .entry(dynamic::storage::<(u16, u16), dynamic::Value>("SubtensorModule", "Keys"))
            .unwrap()
            .fetch_key((2, uid))
            .unwrap();
        s.insert(k, who.to_vec());
        let k = at
            .storage()
            .entry(dynamic::storage::<([u8; 32], u16), dynamic::Value>("SubtensorModule", "TotalHotkeyAlpha"))
            .unwrap()
            .fetch_key((who, 2))
            .unwrap();
        s.insert(k, (1000 + uid as u64).encode());
        s.insert(commitment_key(&at, 2, who), raw_registration(&format!("s3://bucket-{uid}")));
    }
}

/// A window's registry and commitments cost the same number of calls at 16 uids and at 256:
/// every value is read in bulk (`state_queryStorageAt`), none one key per call.
#[tokio::test]
async fn registry_reads_cost_a_constant_number_of_calls() {
    let mut costs = Vec::new();
    for n in [16u16, 256] {
        let storage: Storage = Arc::new(Mutex::new(HashMap::new()));
        let (client, rpc, calls) = mock_node(storage.clone()).await;
        subnet_of(&client, &storage, n).await;
        let chain = Subtensor::from_client("golden mock", client.clone(), rpc, None, Duration::from_secs(10));
        calls.lock().unwrap().clear();
        let mg = chain.metagraph_at(2, 60).await.unwrap();
        let urls = chain.commitments_at(&mg, 60).await.unwrap();
        assert_eq!(mg.neurons.len(), n as usize);
        assert_eq!(urls.len(), n as usize);
        for (i, nr) in mg.neurons.iter().enumerate() {
            assert_eq!(nr.uid, i as u16);
            assert_eq!(nr.stake, 1000 + i as u64);
            assert_eq!(nr.validator_permit, i % 8 == 0);
            assert!((nr.incentive - (i * 10) as f64 / 65535.0).abs() < 1e-12);
            assert_eq!(urls[&nr.uid], format!("s3://bucket-{i}"));
        }
        // The bulk read agrees with reading key by key.
        assert_eq!(
            chain.commitment_at(2, &mg.neurons[n as usize - 1].hotkey, 60).await.unwrap(),
            Some(format!("s3://bucket-{}", n - 1))
        );
        let counted = calls.lock().unwrap().clone();
        eprintln!("{n} uids: {counted:?}");
        costs.push(counted);
    }
    assert_eq!(costs[0], costs[1], "the calls grew with the subnet");
    let total: usize = costs[1].values().sum();
    assert!(costs[1].get("state_queryStorageAt").copied().unwrap_or(0) <= 4, "{:?}", costs[1]);
    assert!(total <= 16, "{total} calls for a window's registry at 256 uids: {:?}", costs[1]);
}
