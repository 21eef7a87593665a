//! Bittensor's subtensor chain through `subxt` (dynamic API; metadata is fetched from the
//! node at run time, so no generated code has to match the runtime).
//!
//! Storage read: `System.Number` (via the block header), `Timestamp.Now`,
//! `SubtensorModule.{SubnetworkN, Keys, Uids, ValidatorPermit, Incentive, Weights,
//! TotalHotkeyAlpha, CommitRevealWeightsEnabled, RevealPeriodEpochs, Tempo,
//! CommitRevealWeightsVersion, WeightsSetRateLimit, LastUpdate}`, `Drand.LastStoredRound`,
//! `Commitments.CommitmentOf`. Extrinsics: `Commitments.set_commitment` (a `Raw<N>` field
//! holding the bucket URL; the `Data` enum's variant index carries the length),
//! `SubtensorModule.set_weights` and, on commit-reveal subnets,
//! `SubtensorModule.commit_timelocked_weights` (see [`crate::commit_reveal`]).
//!
//! Every call has a timeout; a failed connection is dropped and re-established on the next
//! call with exponential backoff, so a node never hangs on a dead endpoint.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use subxt::dynamic::{self, Value};
use subxt::utils::AccountId32;
use subxt::{OnlineClient, SubstrateConfig};
use subxt_signer::sr25519::Keypair;
use tokio::sync::Mutex;

use crate::{BlockHash, Chain, ChainError, CommitRevealParams, Metagraph, Neuron, Result, WeightsMode, commit_reveal};

/// Subtensor's nominal block time.
pub const BLOCK_TIME: Duration = Duration::from_secs(12);

/// A connection to a subtensor node.
pub struct Subtensor {
    endpoint: String,
    client: Mutex<Option<OnlineClient<SubstrateConfig>>>,
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

type ConnectFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<OnlineClient<SubstrateConfig>, subxt::Error>> + Send>,
>;

/// How to (re)connect: to a URL, or through a ready client (tests).
#[derive(Clone)]
enum Connector {
    Url(String),
    Fixed(OnlineClient<SubstrateConfig>),
}

impl Connector {
    fn connect(&self) -> ConnectFuture {
        match self.clone() {
            Connector::Url(url) => Box::pin(async move {
                let r = if url.starts_with("ws://") || url.starts_with("http://") {
                    OnlineClient::<SubstrateConfig>::from_insecure_url(&url).await
                } else {
                    OnlineClient::<SubstrateConfig>::from_url(&url).await
                };
                r.map_err(subxt::Error::from)
            }),
            Connector::Fixed(c) => Box::pin(async move { Ok(c) }),
        }
    }
}

fn endpoint_err(endpoint: &str, what: String, e: impl std::error::Error + Send + Sync + 'static) -> ChainError {
    ChainError::Endpoint { endpoint: endpoint.to_string(), what, source: Box::new(e) }
}

/// Whether the connection is still good after `e`: the node answered, but what it said did
/// not decode or named a failure. Any other error (transport, RPC, a dropped subscription,
/// one this code does not know) drops the client, so the next call reconnects.
fn connection_survives(e: &subxt::Error) -> bool {
    use subxt::Error as E;
    matches!(
        e,
        E::StorageKeyError(_)
            | E::StorageValueError(_)
            | E::OtherCodecError(_)
            | E::DispatchErrorDecodeError(_)
            | E::ModuleErrorDetailsError(_)
            | E::ModuleErrorDecodeError(_)
            | E::ConstantError(_)
            | E::CustomValueError(_)
            | E::ExtrinsicDecodeErrorAt(_)
    )
}

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

/// The SCALE `Data::Raw<N>` value that holds `bytes` (at most 128 bytes).
pub fn raw_data(bytes: &[u8]) -> Result<Value> {
    if bytes.len() > 128 {
        return Err(ChainError::Config(format!("commitment of {} bytes is over the 128-byte Raw limit", bytes.len())));
    }
    Ok(Value::variant(
        format!("Raw{}", bytes.len()),
        subxt::ext::scale_value::Composite::unnamed([Value::from_bytes(bytes)]),
    ))
}

/// The bytes of the first `Raw<N>` field of a decoded `Registration`/`CommitmentInfo` value.
fn first_raw_field(v: &Value<()>) -> Option<Vec<u8>> {
    use subxt::ext::scale_value::{Composite, Primitive, ValueDef, Variant};
    fn bytes_of(v: &Value<()>) -> Option<Vec<u8>> {
        match &v.value {
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
            ValueDef::Variant(Variant { name, values }) if name.starts_with("Raw") => {
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

    /// Use a ready client (an in-process mock in tests).
    pub fn from_client(
        name: &str,
        client: OnlineClient<SubstrateConfig>,
        signer: Option<Keypair>,
        timeout: Duration,
    ) -> Self {
        Subtensor {
            endpoint: name.to_string(),
            client: Mutex::new(Some(client.clone())),
            connector: Connector::Fixed(client),
            signer: signer.map(Arc::new),
            timeout,
        }
    }

    /// The current client, connecting (with backoff, within the timeout) when there is none.
    async fn client(&self) -> Result<OnlineClient<SubstrateConfig>> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(250);
        let mut last: Option<subxt::Error> = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                let what = format!("cannot connect within {:?}", self.timeout);
                return Err(match last {
                    Some(e) => endpoint_err(&self.endpoint, what, e),
                    None => ChainError::Timeout(format!("{what} to {}", self.endpoint)),
                });
            }
            match tokio::time::timeout(left, self.connector.connect()).await {
                Ok(Ok(c)) => {
                    *guard = Some(c.clone());
                    return Ok(c);
                }
                Ok(Err(e)) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "subtensor connection failed; retrying");
                    last = Some(e);
                }
                Err(_) => tracing::warn!(endpoint = %self.endpoint, "subtensor connection timed out; retrying"),
            }
            tokio::time::sleep(delay.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
            delay = (delay * 2).min(Duration::from_secs(8));
        }
    }

    /// Run `f` against the client with a timeout; a failure drops the connection so the
    /// next call reconnects.
    async fn with_client<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(OnlineClient<SubstrateConfig>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, subxt::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if !connection_survives(&e) {
                    *self.client.lock().await = None;
                }
                Err(endpoint_err(&self.endpoint, what.to_string(), e))
            }
            Err(_) => {
                *self.client.lock().await = None;
                Err(ChainError::Timeout(format!("{what} on {}", self.endpoint)))
            }
        }
    }

    fn signer(&self, hotkey: &str) -> Result<Arc<Keypair>> {
        let s = self.signer.clone().ok_or_else(|| ChainError::Wallet("no hotkey secret loaded: cannot sign".into()))?;
        let ours = AccountId32::from(s.public_key().0).to_string();
        if ours != hotkey {
            return Err(ChainError::Wallet(format!("the loaded hotkey is {ours}, not {hotkey}")));
        }
        Ok(s)
    }

    /// The value at storage `addr` under `key`, `default` when unset.
    async fn value_or<A>(&self, what: &str, addr: A, key: A::KeyParts, default: A::Value) -> Result<A::Value>
    where
        A: subxt::storage::Address,
    {
        let v = self
            .with_client(what, |c| async move {
                let at = c.at_current_block().await.map_err(subxt::Error::from)?;
                match at.storage().try_fetch(addr, key).await.map_err(subxt::Error::from)? {
                    Some(v) => v.decode().map(Some).map_err(subxt::Error::from),
                    None => Ok(None),
                }
            })
            .await?;
        Ok(v.unwrap_or(default))
    }

    /// A per-subnet storage value (`SubtensorModule.<item>[netuid]`), `default` when unset.
    async fn subnet_value<T>(&self, what: &str, item: &'static str, netuid: u16, default: T) -> Result<T>
    where
        T: subxt::ext::scale_decode::DecodeAsType,
    {
        self.value_or(what, dynamic::storage::<(u16,), T>("SubtensorModule", item), (netuid,), default).await
    }

    /// Refuse to submit weights before the subnet's rate limit (`WeightsSetRateLimit` blocks
    /// since this uid's `LastUpdate`) has passed: the chain would reject them.
    async fn check_rate_limit(&self, netuid: u16, hotkey: &str) -> Result<()> {
        let limit: u64 = self.subnet_value("weights rate limit", "WeightsSetRateLimit", netuid, 0).await?;
        if limit == 0 {
            return Ok(());
        }
        let Some(uid) = self.metagraph(netuid).await?.uid_of(hotkey) else { return Ok(()) };
        let last: Vec<u64> = match self.subnet_value("last update", "LastUpdate", netuid, Vec::new()).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read LastUpdate; not checking the rate limit here");
                return Ok(());
            }
        };
        let block = self.block_number().await?;
        let since = block.saturating_sub(last.get(uid as usize).copied().unwrap_or(0));
        if since < limit {
            return Err(ChainError::Weights(format!(
                "rate limit: netuid {netuid} takes weights every {limit} blocks; {} more to wait",
                limit - since
            )));
        }
        Ok(())
    }

    async fn submit(&self, what: &str, hotkey: &str, call: subxt::tx::DynamicPayload<Vec<Value>>) -> Result<()> {
        let signer = self.signer(hotkey)?;
        self.with_client(what, |c| async move {
            let at = c.at_current_block().await.map_err(subxt::Error::from)?;
            let progress = at
                .transactions()
                .sign_and_submit_then_watch_default(&call, signer.as_ref())
                .await
                .map_err(subxt::Error::from)?;
            progress.wait_for_finalized_success().await.map_err(subxt::Error::from)?;
            Ok(())
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
        self.with_client("metagraph", |c| async move {
            let at = c.at_current_block().await.map_err(subxt::Error::from)?;
            let block = at.block_number();
            let st = at.storage();
            let n: u16 = match st
                .try_fetch(dynamic::storage::<(u16,), u16>("SubtensorModule", "SubnetworkN"), (netuid,))
                .await
                .map_err(subxt::Error::from)?
            {
                Some(v) => v.decode().map_err(subxt::Error::from)?,
                None => 0,
            };
            let permits: Vec<bool> = match st
                .try_fetch(dynamic::storage::<(u16,), Vec<bool>>("SubtensorModule", "ValidatorPermit"), (netuid,))
                .await
                .map_err(subxt::Error::from)?
            {
                Some(v) => v.decode().map_err(subxt::Error::from)?,
                None => Vec::new(),
            };
            let incentive: Vec<u16> = match st
                .try_fetch(dynamic::storage::<(u16,), Vec<u16>>("SubtensorModule", "Incentive"), (netuid,))
                .await
                .map_err(subxt::Error::from)?
            {
                Some(v) => v.decode().map_err(subxt::Error::from)?,
                None => Vec::new(),
            };
            let mut neurons = Vec::with_capacity(n as usize);
            for uid in 0..n {
                let Some(key) = st
                    .try_fetch(dynamic::storage::<(u16, u16), [u8; 32]>("SubtensorModule", "Keys"), (netuid, uid))
                    .await
                    .map_err(subxt::Error::from)?
                else {
                    continue;
                };
                let key: [u8; 32] = key.decode().map_err(subxt::Error::from)?;
                let stake: u64 = match st
                    .try_fetch(
                        dynamic::storage::<([u8; 32], u16), u64>("SubtensorModule", "TotalHotkeyAlpha"),
                        (key, netuid),
                    )
                    .await
                    .map_err(subxt::Error::from)?
                {
                    Some(v) => v.decode().map_err(subxt::Error::from)?,
                    None => 0,
                };
                neurons.push(Neuron {
                    uid,
                    hotkey: AccountId32::from(key).to_string(),
                    stake,
                    validator_permit: permits.get(uid as usize).copied().unwrap_or(false),
                    incentive: incentive.get(uid as usize).map(|&x| x as f64 / 65535.0).unwrap_or(0.0),
                });
            }
            Ok(Metagraph { netuid, block, neurons })
        })
        .await
    }

    async fn commitment(&self, netuid: u16, hotkey: &str) -> Result<Option<String>> {
        let who = account_id(hotkey)?;
        self.with_client("commitment", |c| async move {
            let at = c.at_current_block().await.map_err(subxt::Error::from)?;
            let addr = dynamic::storage::<(u16, [u8; 32]), Value>("Commitments", "CommitmentOf");
            let Some(v) = at.storage().try_fetch(addr, (netuid, who.0)).await.map_err(subxt::Error::from)? else {
                return Ok(None);
            };
            let value: Value<()> = v.decode_as::<Value<()>>().map_err(subxt::Error::from)?;
            Ok(first_raw_field(&value).and_then(|b| String::from_utf8(b).ok()))
        })
        .await
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
        if uids.len() != weights.len() {
            return Err(ChainError::Weights(format!("{} uids but {} weights", uids.len(), weights.len())));
        }
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

/// The `Commitments.set_commitment(netuid, CommitmentInfo { fields: [Raw(url)] })` call.
pub fn set_commitment_call(netuid: u16, data: &str) -> Result<subxt::tx::DynamicPayload<Vec<Value>>> {
    let info = Value::named_composite([("fields", Value::unnamed_composite([raw_data(data.as_bytes())?]))]);
    Ok(dynamic::transaction("Commitments", "set_commitment", vec![Value::u128(netuid as u128), info]))
}
