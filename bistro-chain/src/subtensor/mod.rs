//! Bittensor's subtensor chain through `subxt` (dynamic API; metadata is fetched from the
//! node at run time, so no generated code has to match the runtime).
//!
//! Storage read: `System.Number` (via the block header), `Timestamp.Now`,
//! `SubtensorModule.{SubnetworkN, Keys, Uids, ValidatorPermit, Incentive, Weights,
//! TotalHotkeyAlpha, CommitRevealWeightsEnabled, RevealPeriodEpochs, Tempo,
//! CommitRevealWeightsVersion, WeightsSetRateLimit, LastUpdate}`, `Drand.LastStoredRound`,
//! `Commitments.CommitmentOf`. Extrinsics: `Commitments.set_commitment` (one field holding
//! the bucket URL: `Raw<N>`, whose variant index carries the length, up to 128 bytes, else
//! `BigRaw` up to 512),
//! `SubtensorModule.set_weights` and, on commit-reveal subnets,
//! `SubtensorModule.commit_timelocked_weights` (see [`crate::commit_reveal`]).
//!
//! A window's registry and commitments are read in bulk (`state_queryStorageAt`
//! with every key), a fixed number of round trips whatever the subnet's size.
//!
//! Every call has a timeout; a failed connection is dropped and re-established on the next
//! call with exponential backoff, so a node never hangs on a dead endpoint.

mod bulk;
mod codec;
mod connection;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use subxt::dynamic::{self, Value};
use subxt::utils::AccountId32;
use subxt::{OnlineClient, SubstrateConfig};
use subxt_signer::sr25519::Keypair;
use tokio::sync::Mutex;

use codec::first_raw_field;
pub use codec::{
    RAW_MAX_BYTES, account_id, commit_timelocked_weights_call, keypair_from_seed_hex, raw_data, set_commitment_call,
    set_weights_call,
};
use connection::{Conn, Connector};

use crate::{BlockHash, Chain, ChainError, CommitRevealParams, Metagraph, Neuron, Result, WeightsMode, commit_reveal};

/// Subtensor's nominal block time.
pub const BLOCK_TIME: Duration = Duration::from_secs(12);

/// A connection to a subtensor node.
pub struct Subtensor {
    endpoint: String,
    client: Mutex<Option<Conn>>,
    connector: Connector,
    signer: Option<Arc<Keypair>>,
    timeout: Duration,
}

impl std::fmt::Debug for Subtensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subtensor")
            .field("endpoint", &self.endpoint)
            .field("signer", &self.signer.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Subtensor {
    /// Connect to `endpoint` (`ws://` or `wss://`), signing with `signer` when given.
    /// Fails within `timeout` when the endpoint cannot be reached.
    pub async fn connect(endpoint: &str, signer: Option<Keypair>, timeout: Duration) -> Result<Self> {
        let s = Subtensor {
            endpoint: endpoint.to_string(),
            client: Mutex::new(None),
            connector: Connector::Url(endpoint.to_string()),
            signer: signer.map(Arc::new),
            timeout,
        };
        s.client().await?;
        Ok(s)
    }

    /// Use a ready client and the RPC client under it (an in-process mock in tests).
    pub fn from_client(
        name: &str,
        client: OnlineClient<SubstrateConfig>,
        rpc: subxt::rpcs::RpcClient,
        signer: Option<Keypair>,
        timeout: Duration,
    ) -> Self {
        let conn = Conn { client, rpc };
        Subtensor {
            endpoint: name.to_string(),
            client: Mutex::new(Some(conn.clone())),
            connector: Connector::Fixed(conn),
            signer: signer.map(Arc::new),
            timeout,
        }
    }

    /// A block not produced yet is [`ChainError::FutureBlock`], never a guess.
    async fn check_exists(&self, block: Option<u64>) -> Result<()> {
        match block {
            Some(b) if b > self.block_number().await? => Err(ChainError::FutureBlock(b)),
            _ => Ok(()),
        }
    }

    /// The metagraph at `block` (the newest block when `None`), in a fixed number of round
    /// trips whatever the subnet's size ([`bulk`]): the subnet's size, permits and
    /// incentives; every uid's hotkey (`Keys`); every hotkey's stake (`TotalHotkeyAlpha`).
    #[allow(clippy::result_large_err)] // closures inside `with_client` return `subxt::Error`
    async fn metagraph_in(&self, netuid: u16, block: Option<u64>) -> Result<Metagraph> {
        self.check_exists(block).await?;
        self.with_client("metagraph", move |c| async move {
            let at = match block {
                Some(b) => c.at_block(b).await,
                None => c.at_current_block().await,
            }
            .map_err(subxt::Error::from)?;
            let block = at.block_number();
            let hash = at.block_hash();
            let st = at.storage();
            let subnet_key = |item: &str| {
                st.entry(dynamic::storage::<(u16,), Value>("SubtensorModule", item))
                    .and_then(|e| e.fetch_key((netuid,)))
                    .map_err(subxt::Error::from)
            };
            let head_keys = vec![subnet_key("SubnetworkN")?, subnet_key("ValidatorPermit")?, subnet_key("Incentive")?];
            let head = bulk::query_at(&c.rpc, &head_keys, hash).await?;
            let n: u16 = bulk::decode_or(&head[0], 0)?;
            let permits: Vec<bool> = bulk::decode_or(&head[1], Vec::new())?;
            let incentive: Vec<u16> = bulk::decode_or(&head[2], Vec::new())?;
            let keys_entry = st
                .entry(dynamic::storage::<(u16, u16), Value>("SubtensorModule", "Keys"))
                .map_err(subxt::Error::from)?;
            let uid_keys =
                (0..n).map(|uid| keys_entry.fetch_key((netuid, uid))).collect::<std::result::Result<Vec<_>, _>>();
            let hotkeys = bulk::query_at(&c.rpc, &uid_keys.map_err(subxt::Error::from)?, hash).await?;
            let hotkeys: Vec<(u16, [u8; 32])> = hotkeys
                .iter()
                .enumerate()
                .filter_map(|(uid, v)| v.as_ref().map(|b| (uid as u16, b)))
                .map(|(uid, b)| bulk::decode::<[u8; 32]>(b).map(|k| (uid, k)))
                .collect::<std::result::Result<_, _>>()?;
            let stake_entry = st
                .entry(dynamic::storage::<([u8; 32], u16), Value>("SubtensorModule", "TotalHotkeyAlpha"))
                .map_err(subxt::Error::from)?;
            let stake_keys = hotkeys
                .iter()
                .map(|(_, k)| stake_entry.fetch_key((*k, netuid)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(subxt::Error::from)?;
            let stakes = bulk::query_at(&c.rpc, &stake_keys, hash).await?;
            let mut neurons = Vec::with_capacity(hotkeys.len());
            for ((uid, key), stake) in hotkeys.into_iter().zip(&stakes) {
                neurons.push(Neuron {
                    uid,
                    hotkey: AccountId32::from(key).to_string(),
                    stake: bulk::decode_or(stake, 0u64)?,
                    validator_permit: permits.get(uid as usize).copied().unwrap_or(false),
                    incentive: incentive.get(uid as usize).map(|&x| x as f64 / 65535.0).unwrap_or(0.0),
                });
            }
            Ok(Metagraph { netuid, block, neurons })
        })
        .await
    }

    /// The commitments of `metagraph`'s neurons at `block`, in one round trip ([`bulk`]).
    async fn commitments_in(&self, metagraph: &Metagraph, block: u64) -> Result<HashMap<u16, String>> {
        self.check_exists(Some(block)).await?;
        let who: Vec<(u16, [u8; 32])> =
            metagraph.neurons.iter().map(|n| Ok((n.uid, account_id(&n.hotkey)?.0))).collect::<Result<_>>()?;
        let netuid = metagraph.netuid;
        self.with_client("commitments", move |c| async move {
            let at = c.at_block(block).await.map_err(subxt::Error::from)?;
            let entry = at
                .storage()
                .entry(dynamic::storage::<(u16, [u8; 32]), Value>("Commitments", "CommitmentOf"))
                .map_err(subxt::Error::from)?;
            let keys = who
                .iter()
                .map(|(_, k)| entry.fetch_key((netuid, *k)))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(subxt::Error::from)?;
            let values = bulk::query_at(&c.rpc, &keys, at.block_hash()).await?;
            let md = at.metadata();
            let ty = md
                .pallet_by_name("Commitments")
                .and_then(|p| p.storage())
                .and_then(|s| s.entry_by_name("CommitmentOf"))
                .map(|e| e.value_ty())
                .ok_or_else(|| subxt::Error::other_str("the runtime has no Commitments.CommitmentOf"))?;
            let mut out = HashMap::new();
            for ((uid, _), v) in who.iter().zip(values) {
                let Some(bytes) = v else { continue };
                // A value that does not decode is that neuron's problem: no commitment.
                let Ok(value) = subxt::ext::scale_value::scale::decode_as_type(&mut &bytes[..], ty, md.types()) else {
                    continue;
                };
                if let Some(url) = first_raw_field(&value.remove_context()).and_then(|b| String::from_utf8(b).ok()) {
                    out.insert(*uid, url);
                }
            }
            Ok(out)
        })
        .await
    }

    /// `hotkey`'s commitment at `block` (the newest block when `None`).
    async fn commitment_in(&self, netuid: u16, hotkey: &str, block: Option<u64>) -> Result<Option<String>> {
        let who = account_id(hotkey)?;
        self.check_exists(block).await?;
        self.with_client("commitment", move |c| async move {
            let at = match block {
                Some(b) => c.at_block(b).await,
                None => c.at_current_block().await,
            }
            .map_err(subxt::Error::from)?;
            let addr = dynamic::storage::<(u16, [u8; 32]), Value>("Commitments", "CommitmentOf");
            let Some(v) = at.storage().try_fetch(addr, (netuid, who.0)).await.map_err(subxt::Error::from)? else {
                return Ok(None);
            };
            let value: Value<()> = v.decode_as::<Value<()>>().map_err(subxt::Error::from)?;
            Ok(first_raw_field(&value).and_then(|b| String::from_utf8(b).ok()))
        })
        .await
    }
}

#[async_trait]
impl Chain for Subtensor {
    fn describe(&self) -> String {
        format!("subtensor at {}", self.endpoint)
    }

    fn block_time(&self) -> Duration {
        BLOCK_TIME
    }

    async fn block_number(&self) -> Result<u64> {
        self.with_client("block number", |c| async move {
            let at = c.at_current_block().await.map_err(subxt::Error::from)?;
            Ok(at.block_number())
        })
        .await
    }

    async fn block_hash(&self, number: u64) -> Result<BlockHash> {
        let current = self.block_number().await?;
        if number > current {
            return Err(ChainError::FutureBlock(number));
        }
        self.with_client("block hash", |c| async move {
            let at = c.at_block(number).await.map_err(subxt::Error::from)?;
            Ok(at.block_hash().0)
        })
        .await
    }

    async fn block_time_unix_ms(&self, number: u64) -> Result<u64> {
        let current = self.block_number().await?;
        let known = number.min(current);
        let ts: u64 = self
            .with_client("block timestamp", |c| async move {
                let at = c.at_block(known).await.map_err(subxt::Error::from)?;
                let v = at
                    .storage()
                    .fetch(dynamic::storage::<(), u64>("Timestamp", "Now"), ())
                    .await
                    .map_err(subxt::Error::from)?;
                v.decode().map_err(subxt::Error::from)
            })
            .await?;
        Ok(ts + (number - known) * BLOCK_TIME.as_millis() as u64)
    }

    async fn metagraph(&self, netuid: u16) -> Result<Metagraph> {
        self.metagraph_in(netuid, None).await
    }

    async fn metagraph_at(&self, netuid: u16, block: u64) -> Result<Metagraph> {
        self.metagraph_in(netuid, Some(block)).await
    }

    async fn commitment_at(&self, netuid: u16, hotkey: &str, block: u64) -> Result<Option<String>> {
        self.commitment_in(netuid, hotkey, Some(block)).await
    }

    async fn commitments_at(&self, metagraph: &Metagraph, block: u64) -> Result<HashMap<u16, String>> {
        self.commitments_in(metagraph, block).await
    }

    async fn commitment(&self, netuid: u16, hotkey: &str) -> Result<Option<String>> {
        self.commitment_in(netuid, hotkey, None).await
    }

    async fn set_commitment(&self, netuid: u16, hotkey: &str, data: &str) -> Result<()> {
        self.submit("set_commitment", hotkey, set_commitment_call(netuid, data)?).await
    }

    async fn set_weights(
        &self,
        netuid: u16,
        hotkey: &str,
        uids: &[u16],
        weights: &[u16],
        version_key: u64,
    ) -> Result<()> {
        crate::check_weight_lengths(uids, weights)?;
        let cr: bool = self.subnet_value("commit-reveal flag", "CommitRevealWeightsEnabled", netuid, false).await?;
        if cr {
            return Err(ChainError::Weights(format!(
                "CommitRevealEnabled on netuid {netuid}: weights must be committed (bistro_chain::submit_weights does)"
            )));
        }
        self.check_rate_limit(netuid, hotkey).await?;
        self.submit("set_weights", hotkey, set_weights_call(netuid, uids, weights, version_key)).await
    }

    async fn weights_mode(&self, netuid: u16) -> Result<WeightsMode> {
        let enabled: bool =
            self.subnet_value("commit-reveal flag", "CommitRevealWeightsEnabled", netuid, false).await?;
        if !enabled {
            return Ok(WeightsMode::Direct);
        }
        let tempo: u16 = self.subnet_value("tempo", "Tempo", netuid, 360).await?;
        let period: u64 = self.subnet_value("reveal period", "RevealPeriodEpochs", netuid, 1).await?;
        let version: u16 = self
            .value_or(
                "commit-reveal version",
                dynamic::storage::<(), u16>("SubtensorModule", "CommitRevealWeightsVersion"),
                (),
                4,
            )
            .await?;
        let last_round: u64 =
            self.value_or("drand round", dynamic::storage::<(), u64>("Drand", "LastStoredRound"), (), 0).await?;
        if last_round == 0 {
            return Err(ChainError::Weights(
                "the chain has stored no drand pulse yet (Drand.LastStoredRound is 0)".into(),
            ));
        }
        let block = self.block_number().await?;
        let to_reveal = commit_reveal::blocks_until_reveal(block, netuid, tempo, period);
        let round = commit_reveal::reveal_round(
            last_round,
            to_reveal,
            BLOCK_TIME.as_secs(),
            commit_reveal::QUICKNET_PERIOD_SECS,
        );
        let pk = hex::decode(commit_reveal::QUICKNET_PUBLIC_KEY).map_err(|e| ChainError::Config(e.to_string()))?;
        Ok(WeightsMode::CommitReveal(CommitRevealParams {
            reveal_round: round,
            reveal_block: block + to_reveal,
            beacon_public_key: pk,
            version,
        }))
    }

    async fn commit_timelocked_weights(
        &self,
        netuid: u16,
        hotkey: &str,
        commit: &[u8],
        reveal_round: u64,
        version: u16,
    ) -> Result<()> {
        self.check_rate_limit(netuid, hotkey).await?;
        self.submit(
            "commit_timelocked_weights",
            hotkey,
            commit_timelocked_weights_call(netuid, commit, reveal_round, version),
        )
        .await
    }

    fn sign(&self, hotkey: &str, message: &[u8]) -> Result<[u8; crate::keys::SIGNATURE_BYTES]> {
        let pair = self.signer(hotkey)?;
        Ok(crate::keys::sign(pair.as_ref(), message))
    }

    fn account_bytes(&self, hotkey: &str) -> Result<Vec<u8>> {
        Ok(account_id(hotkey)?.0.to_vec())
    }

    async fn weights(&self, netuid: u16) -> Result<Vec<(u16, Vec<(u16, u16)>)>> {
        let mg = self.metagraph(netuid).await?;
        let validators: Vec<u16> = mg.neurons.iter().filter(|n| n.validator_permit).map(|n| n.uid).collect();
        self.with_client("weights", |c| async move {
            let at = c.at_current_block().await.map_err(subxt::Error::from)?;
            let mut out = Vec::new();
            for uid in validators {
                let addr = dynamic::storage::<(u16, u16), Vec<(u16, u16)>>("SubtensorModule", "Weights");
                if let Some(v) = at.storage().try_fetch(addr, (netuid, uid)).await.map_err(subxt::Error::from)? {
                    out.push((uid, v.decode().map_err(subxt::Error::from)?));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn ensure_registered(&self, netuid: u16, hotkey: &str, _stake: u64) -> Result<u16> {
        let who = account_id(hotkey)?;
        let uid: Option<u16> = self
            .with_client("registration", |c| async move {
                let at = c.at_current_block().await.map_err(subxt::Error::from)?;
                match at
                    .storage()
                    .try_fetch(dynamic::storage::<(u16, [u8; 32]), u16>("SubtensorModule", "Uids"), (netuid, who.0))
                    .await
                    .map_err(subxt::Error::from)?
                {
                    Some(v) => v.decode().map(Some).map_err(subxt::Error::from),
                    None => Ok(None),
                }
            })
            .await?;
        uid.ok_or_else(|| ChainError::NotRegistered {
            hotkey: hotkey.to_string(),
            netuid,
            hint: format!(" (register it with `btcli subnet register --netuid {netuid}`)"),
        })
    }
}
