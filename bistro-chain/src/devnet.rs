//! The embedded local devnet: a chain whose state lives in a directory.
//!
//! * **Clock**: block `n` is produced at `genesis + n * block_time` (wall clock), so every
//!   process that opens the same directory sees the same block numbers.
//! * **Block hashes**: `sha256("bistro/devnet/block/v1" || secret || n as u64 LE)`, where
//!   `secret` is 32 random bytes chosen when the devnet is created; a block's hash is only
//!   served once the block exists, so nobody can use a future window's seed.
//! * **State**: `state.json` (registrations, commitments, weights), changed under an
//!   exclusive lock on `state.lock` and written atomically (temporary file + rename), so
//!   several processes can share it and a killed process never leaves it half-written.
//! * **Registration**: hotkeys register themselves (`ensure_registered`), with the stake
//!   they ask for; stake > 0 gives a validator permit.
//! * **Commit-reveal** (optional, [`Devnet::open_with_commit_reveal`]): like subtensor,
//!   `set_weights` is refused and validators commit their weights timelocked to a beacon
//!   round. The devnet's beacon is a BLS key of its own that "signs" round `r` when block `r`
//!   exists; a commit is revealed with the real decryption code
//!   ([`crate::commit_reveal::decrypt`]) once its round is due, and its weights applied. A
//!   commit that does not decrypt with its round's signature (another round, tampered) or
//!   whose payload names another hotkey is rejected, never applied.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{BlockHash, Chain, ChainError, CommitRevealParams, Metagraph, Neuron, Result, WeightsMode};

/// Most neurons a devnet subnet accepts.
pub const MAX_NEURONS: usize = 256;
/// Default block time of a new devnet.
pub const DEFAULT_BLOCK_TIME: Duration = Duration::from_secs(4);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Subnet {
    neurons: Vec<Neuron>,
    commitments: BTreeMap<String, String>,
    /// Validator uid -> (block, [(uid, weight)]).
    weights: BTreeMap<u16, (u64, Vec<(u16, u16)>)>,
    /// Timelocked weight commits waiting for their round.
    #[serde(default)]
    commits: Vec<PendingCommit>,
    /// What happened to revealed commits, oldest first (bounded).
    #[serde(default)]
    reveals: Vec<RevealRecord>,
    /// The registry (neurons without incentives, commitments) after each change, with the
    /// block it takes effect at, oldest first (bounded by [`REGISTRY_HISTORY`]).
    #[serde(default)]
    registry: Vec<RegistryAt>,
}

/// The registry of a subnet from block `from` on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RegistryAt {
    from: u64,
    neurons: Vec<Neuron>,
    commitments: BTreeMap<String, String>,
}

/// Registry changes the devnet remembers per subnet (reads at older blocks get the oldest).
pub const REGISTRY_HISTORY: usize = 512;

impl Subnet {
    /// The registry as it stands (incentives zeroed: they change with weights, not here).
    fn registry_now(&self, from: u64) -> RegistryAt {
        let neurons = self.neurons.iter().map(|n| Neuron { incentive: 0.0, ..n.clone() }).collect();
        RegistryAt { from, neurons, commitments: self.commitments.clone() }
    }

    /// Record the registry after a change made at block `block`: like a transaction, it
    /// takes effect in the next block, so a registry read at an existing block never
    /// changes afterwards.
    fn record_registry(&mut self, before: RegistryAt, block: u64) {
        let after = self.registry_now(block + 1);
        if after.neurons == before.neurons && after.commitments == before.commitments {
            return;
        }
        if self.registry.is_empty() {
            self.registry.push(before);
        }
        self.registry.retain(|r| r.from < block + 1);
        self.registry.push(after);
        let excess = self.registry.len().saturating_sub(REGISTRY_HISTORY);
        self.registry.drain(..excess);
    }

    /// The registry in effect at `block` (the oldest remembered one before it; the current
    /// one on a devnet without history).
    fn registry_at(&self, block: u64) -> RegistryAt {
        self.registry
            .iter()
            .rev()
            .find(|r| r.from <= block)
            .or(self.registry.first())
            .cloned()
            .unwrap_or_else(|| self.registry_now(0))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PendingCommit {
    hotkey: String,
    commit_hex: String,
    reveal_round: u64,
    committed_at: u64,
}

/// The outcome of one revealed commit on the devnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealRecord {
    /// The committing hotkey.
    pub hotkey: String,
    /// The round the commit named.
    pub reveal_round: u64,
    /// The block it was revealed at.
    pub block: u64,
    /// `applied`, or why it was rejected.
    pub outcome: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    version: u32,
    genesis_unix_ms: u64,
    block_time_ms: u64,
    secret: String,
    subnets: BTreeMap<u16, Subnet>,
    /// Commit-reveal: the beacon key's seed (hex) when on.
    #[serde(default)]
    beacon_seed: Option<String>,
    /// Commit-reveal: blocks from a commit to its reveal.
    #[serde(default)]
    reveal_delay_blocks: u64,
}

/// A local devnet chain rooted at a directory.
#[derive(Clone, Debug)]
pub struct Devnet {
    dir: PathBuf,
    genesis_unix_ms: u64,
    block_time_ms: u64,
    secret: [u8; 32],
    /// The beacon and reveal delay, when commit-reveal is on.
    commit_reveal: Option<(crate::commit_reveal::DevnetBeacon, u64)>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn state_err(path: &Path, reason: impl std::fmt::Display) -> ChainError {
    ChainError::State { path: path.to_path_buf(), reason: reason.to_string() }
}

fn fresh_secret() -> String {
    // Entropy for the devnet's block hashes (not protocol randomness): time, pid, address.
    let mut h = Sha256::new();
    h.update(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let local = 0u8;
    h.update((&local as *const u8 as usize).to_le_bytes());
    if let Ok(bytes) = std::fs::read("/proc/sys/kernel/random/uuid") {
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

impl Devnet {
    /// Open the devnet in `dir`, creating it (with `block_time`) if it does not exist.
    /// An existing devnet keeps its own block time.
    pub fn open(dir: &Path, block_time: Duration) -> Result<Self> {
        Self::open_inner(dir, block_time, None)
    }

    /// Like [`Devnet::open`], with commit-reveal weights on when the devnet is created:
    /// commits are revealed `reveal_delay_blocks` blocks after they are made. An existing
    /// devnet keeps its own settings.
    pub fn open_with_commit_reveal(dir: &Path, block_time: Duration, reveal_delay_blocks: u64) -> Result<Self> {
        Self::open_inner(dir, block_time, Some(reveal_delay_blocks.max(1)))
    }

    fn open_inner(dir: &Path, block_time: Duration, commit_reveal: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| state_err(dir, format!("cannot create directory: {e}")))?;
        let path = dir.join("state.json");
        if !path.exists() {
            let _lock = Self::lock_dir(dir)?;
            if !path.exists() {
                let ms = block_time.as_millis().max(1) as u64;
                let st = State {
                    version: 1,
                    genesis_unix_ms: now_ms(),
                    block_time_ms: ms,
                    secret: fresh_secret(),
                    subnets: BTreeMap::new(),
                    beacon_seed: commit_reveal.map(|_| fresh_secret()),
                    reveal_delay_blocks: commit_reveal.unwrap_or(0),
                };
                write_state(&path, &st)?;
                tracing::info!(
                    dir = %dir.display(),
                    block_time_ms = ms,
                    commit_reveal = commit_reveal.is_some(),
                    "created a new local devnet"
                );
            }
        }
        let st = read_state(&path)?;
        let secret: [u8; 32] = hex::decode(&st.secret)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| state_err(&path, "`secret` is not 32 hex bytes"))?;
        if st.block_time_ms == 0 {
            return Err(state_err(&path, "block_time_ms must be positive"));
        }
        let commit_reveal = match &st.beacon_seed {
            Some(seed) => {
                let seed: [u8; 32] = hex::decode(seed)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| state_err(&path, "`beacon_seed` is not 32 hex bytes"))?;
                Some((crate::commit_reveal::DevnetBeacon::from_seed(&seed), st.reveal_delay_blocks.max(1)))
            }
            None => None,
        };
        Ok(Devnet {
            dir: dir.to_path_buf(),
            genesis_unix_ms: st.genesis_unix_ms,
            block_time_ms: st.block_time_ms,
            secret,
            commit_reveal,
        })
    }

    /// What happened to the revealed commits of `netuid` (after revealing any that are due).
    pub fn reveals(&self, netuid: u16) -> Result<Vec<RevealRecord>> {
        self.reveal_due()?;
        Ok(self.read()?.subnets.get(&netuid).map(|s| s.reveals.clone()).unwrap_or_default())
    }

    /// Reveal every commit whose round is due: decrypt it with the beacon's signature of
    /// its round, check the payload's hotkey, apply the weights. Writes only when one is due.
    fn reveal_due(&self) -> Result<()> {
        let Some((beacon, _)) = &self.commit_reveal else { return Ok(()) };
        let block = self.current_block();
        let due = |st: &State| st.subnets.values().any(|s| s.commits.iter().any(|c| c.reveal_round <= block));
        if !due(&self.read()?) {
            return Ok(());
        }
        self.update(|st| {
            for (netuid, s) in st.subnets.iter_mut() {
                let (ready, waiting): (Vec<PendingCommit>, Vec<PendingCommit>) =
                    s.commits.drain(..).partition(|c| c.reveal_round <= block);
                s.commits = waiting;
                for c in ready {
                    let outcome = reveal_one(s, *netuid, beacon, &c, block);
                    match &outcome {
                        Ok(()) => tracing::info!(netuid, hotkey = %c.hotkey, round = c.reveal_round, "revealed committed weights"),
                        Err(e) => tracing::warn!(netuid, hotkey = %c.hotkey, round = c.reveal_round, error = %e, "commit rejected at reveal"),
                    }
                    s.reveals.push(RevealRecord {
                        hotkey: c.hotkey.clone(),
                        reveal_round: c.reveal_round,
                        block,
                        outcome: outcome.map(|()| "applied".to_string()).unwrap_or_else(|e| e),
                    });
                    if s.reveals.len() > 256 {
                        s.reveals.remove(0);
                    }
                }
            }
            Ok(())
        })
    }

    /// The directory holding the state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn lock_dir(dir: &Path) -> Result<std::fs::File> {
        let p = dir.join("state.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| state_err(&p, e))?;
        f.lock().map_err(|e| state_err(&p, format!("cannot lock: {e}")))?;
        Ok(f)
    }

    /// Apply `f` to the state under the lock and write it back atomically.
    fn update<T>(&self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let _lock = Self::lock_dir(&self.dir)?;
        let path = self.state_path();
        let mut st = read_state(&path)?;
        let block = self.current_block();
        let before: BTreeMap<u16, RegistryAt> = st.subnets.iter().map(|(k, s)| (*k, s.registry_now(0))).collect();
        let out = f(&mut st)?;
        for (netuid, s) in st.subnets.iter_mut() {
            let was = before.get(netuid).cloned().unwrap_or_else(|| Subnet::default().registry_now(0));
            s.record_registry(was, block);
        }
        write_state(&path, &st)?;
        Ok(out)
    }

    fn read(&self) -> Result<State> {
        read_state(&self.state_path())
    }

    fn current_block(&self) -> u64 {
        now_ms().saturating_sub(self.genesis_unix_ms) / self.block_time_ms
    }

    /// The hash of block `n` without checking that it exists (tests and tools only).
    pub fn hash_unchecked(&self, n: u64) -> BlockHash {
        let mut h = Sha256::new();
        h.update(b"bistro/devnet/block/v1");
        h.update(self.secret);
        h.update(n.to_le_bytes());
        h.finalize().into()
    }
}

/// Record `hotkey`'s weights on `s` at `block` and recompute incentives.
/// `hotkey`'s neuron on `s`, when it is registered and holds a validator permit.
fn permitted<'a>(s: &'a Subnet, netuid: u16, hotkey: &str) -> Result<&'a Neuron> {
    let me = s.neurons.iter().find(|n| n.hotkey == hotkey).ok_or_else(|| ChainError::NotRegistered {
        hotkey: hotkey.into(),
        netuid,
        hint: String::new(),
    })?;
    if !me.validator_permit {
        return Err(ChainError::Weights(format!("{hotkey} has no validator permit (no stake)")));
    }
    Ok(me)
}

fn apply_weights(s: &mut Subnet, netuid: u16, hotkey: &str, uids: &[u16], weights: &[u16], block: u64) -> Result<()> {
    let uid = permitted(s, netuid, hotkey)?.uid;
    crate::check_weight_lengths(uids, weights)?;
    if let Some(bad) = uids.iter().find(|&&u| !s.neurons.iter().any(|n| n.uid == u)) {
        return Err(ChainError::Weights(format!("uid {bad} is not registered")));
    }
    s.weights.insert(uid, (block, uids.iter().copied().zip(weights.iter().copied()).collect()));
    // Incentive: the stake-weighted mean of the normalised weights.
    let n = s.neurons.len();
    let mut incentive = vec![0f64; n];
    let mut total_stake = 0f64;
    for (vuid, (_, ws)) in &s.weights {
        let stake = s.neurons.iter().find(|x| x.uid == *vuid).map(|x| x.stake as f64).unwrap_or(0.0);
        let sum: f64 = ws.iter().map(|&(_, w)| w as f64).sum();
        if sum <= 0.0 || stake <= 0.0 {
            continue;
        }
        total_stake += stake;
        for &(u, w) in ws {
            if let Some(slot) = incentive.get_mut(u as usize) {
                *slot += stake * w as f64 / sum;
            }
        }
    }
    for nrn in s.neurons.iter_mut() {
        nrn.incentive = if total_stake > 0.0 { incentive[nrn.uid as usize] / total_stake } else { 0.0 };
    }
    Ok(())
}

/// Reveal one due commit with the beacon's signature of its round (the chain's decryption),
/// check that the payload names the committer, and apply its weights.
fn reveal_one(
    s: &mut Subnet,
    netuid: u16,
    beacon: &crate::commit_reveal::DevnetBeacon,
    c: &PendingCommit,
    block: u64,
) -> std::result::Result<(), String> {
    use parity_scale_codec::Decode;
    let commit = hex::decode(&c.commit_hex).map_err(|e| format!("stored commit is not hex: {e}"))?;
    let plain = crate::commit_reveal::decrypt(&commit, &beacon.sign(c.reveal_round)).map_err(|e| e.to_string())?;
    let payload = crate::commit_reveal::WeightsTlockPayload::decode(&mut &plain[..])
        .map_err(|e| format!("payload does not decode: {e}"))?;
    if payload.hotkey != c.hotkey.as_bytes() {
        return Err("the payload names another hotkey".into());
    }
    apply_weights(s, netuid, &c.hotkey, &payload.uids, &payload.values, block).map_err(|e| e.to_string())
}

fn read_state(path: &Path) -> Result<State> {
    let text = std::fs::read_to_string(path).map_err(|e| state_err(path, format!("cannot read: {e}")))?;
    let st: State = serde_json::from_str(&text).map_err(|e| {
        state_err(path, format!("corrupt devnet state ({e}); delete the directory to start a fresh devnet"))
    })?;
    if st.version != 1 {
        return Err(state_err(path, format!("unsupported devnet state version {}", st.version)));
    }
    Ok(st)
}

fn write_state(path: &Path, st: &State) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(st).map_err(|e| state_err(path, e))?;
    let tmp = path.with_extension(format!("json.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| state_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| state_err(&tmp, e))?;
        f.sync_all().map_err(|e| state_err(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| state_err(path, e))
}

#[async_trait]
impl Chain for Devnet {
    fn describe(&self) -> String {
        format!("local devnet at {}", self.dir.display())
    }

    fn block_time(&self) -> Duration {
        Duration::from_millis(self.block_time_ms)
    }

    async fn block_number(&self) -> Result<u64> {
        Ok(self.current_block())
    }

    async fn block_hash(&self, number: u64) -> Result<BlockHash> {
        if number > self.current_block() {
            return Err(ChainError::FutureBlock(number));
        }
        Ok(self.hash_unchecked(number))
    }

    async fn block_time_unix_ms(&self, number: u64) -> Result<u64> {
        Ok(self.genesis_unix_ms + number * self.block_time_ms)
    }

    async fn metagraph(&self, netuid: u16) -> Result<Metagraph> {
        self.reveal_due()?;
        let st = self.read()?;
        let neurons = st.subnets.get(&netuid).map(|s| s.neurons.clone()).unwrap_or_default();
        Ok(Metagraph { netuid, block: self.current_block(), neurons })
    }

    async fn commitment(&self, netuid: u16, hotkey: &str) -> Result<Option<String>> {
        Ok(self.read()?.subnets.get(&netuid).and_then(|s| s.commitments.get(hotkey).cloned()))
    }

    async fn metagraph_at(&self, netuid: u16, block: u64) -> Result<Metagraph> {
        if block > self.current_block() {
            return Err(ChainError::FutureBlock(block));
        }
        self.reveal_due()?;
        let st = self.read()?;
        let Some(s) = st.subnets.get(&netuid) else { return Ok(Metagraph { netuid, block, neurons: Vec::new() }) };
        let mut neurons = s.registry_at(block).neurons;
        for n in &mut neurons {
            n.incentive = s.neurons.iter().find(|x| x.uid == n.uid).map_or(0.0, |x| x.incentive);
        }
        Ok(Metagraph { netuid, block, neurons })
    }

    async fn commitment_at(&self, netuid: u16, hotkey: &str, block: u64) -> Result<Option<String>> {
        if block > self.current_block() {
            return Err(ChainError::FutureBlock(block));
        }
        Ok(self.read()?.subnets.get(&netuid).and_then(|s| s.registry_at(block).commitments.get(hotkey).cloned()))
    }

    /// One read of the state for every neuron (the default reads the state file once each).
    async fn commitments_at(&self, metagraph: &Metagraph, block: u64) -> Result<HashMap<u16, String>> {
        if block > self.current_block() {
            return Err(ChainError::FutureBlock(block));
        }
        let st = self.read()?;
        let Some(s) = st.subnets.get(&metagraph.netuid) else { return Ok(HashMap::new()) };
        let commitments = s.registry_at(block).commitments;
        Ok(metagraph.neurons.iter().filter_map(|n| Some((n.uid, commitments.get(&n.hotkey)?.clone()))).collect())
    }

    async fn set_commitment(&self, netuid: u16, hotkey: &str, data: &str) -> Result<()> {
        crate::check_commitment_len(data.len())?;
        self.update(|st| {
            let s = st.subnets.entry(netuid).or_default();
            if !s.neurons.iter().any(|n| n.hotkey == hotkey) {
                return Err(ChainError::NotRegistered { hotkey: hotkey.into(), netuid, hint: String::new() });
            }
            s.commitments.insert(hotkey.to_string(), data.to_string());
            Ok(())
        })
    }

    async fn set_weights(
        &self,
        netuid: u16,
        hotkey: &str,
        uids: &[u16],
        weights: &[u16],
        _version_key: u64,
    ) -> Result<()> {
        // The lengths are checked where the weights are applied (`apply_weights`).
        if self.commit_reveal.is_some() {
            return Err(ChainError::Weights(format!(
                "CommitRevealEnabled: netuid {netuid} takes timelocked commits (commit_timelocked_weights), not set_weights"
            )));
        }
        let block = self.current_block();
        self.update(|st| apply_weights(st.subnets.entry(netuid).or_default(), netuid, hotkey, uids, weights, block))
    }

    async fn weights_mode(&self, _netuid: u16) -> Result<WeightsMode> {
        Ok(match &self.commit_reveal {
            None => WeightsMode::Direct,
            Some((beacon, delay)) => {
                let round = self.current_block() + delay;
                WeightsMode::CommitReveal(CommitRevealParams {
                    reveal_round: round,
                    reveal_block: round,
                    beacon_public_key: beacon.public_key(),
                    version: crate::commit_reveal::COMMIT_REVEAL_VERSION,
                })
            }
        })
    }

    async fn commit_timelocked_weights(
        &self,
        netuid: u16,
        hotkey: &str,
        commit: &[u8],
        reveal_round: u64,
        version: u16,
    ) -> Result<()> {
        if self.commit_reveal.is_none() {
            return Err(ChainError::Weights(format!("netuid {netuid}: commit-reveal is off on this devnet")));
        }
        if version != crate::commit_reveal::COMMIT_REVEAL_VERSION {
            return Err(ChainError::Weights(format!("IncorrectCommitRevealVersion: {version}")));
        }
        if commit.len() > crate::commit_reveal::MAX_COMMIT_BYTES {
            return Err(ChainError::Weights(format!("commit of {} bytes is too large", commit.len())));
        }
        let block = self.current_block();
        if reveal_round <= block {
            return Err(ChainError::Weights(format!(
                "reveal round {reveal_round} is not in the future (block {block})"
            )));
        }
        self.update(|st| {
            let s = st.subnets.entry(netuid).or_default();
            permitted(s, netuid, hotkey)?;
            if s.commits.iter().filter(|c| c.hotkey == hotkey).count() >= 10 {
                return Err(ChainError::Weights(format!("{hotkey} has 10 unrevealed commits")));
            }
            s.commits.push(PendingCommit {
                hotkey: hotkey.to_string(),
                commit_hex: hex::encode(commit),
                reveal_round,
                committed_at: block,
            });
            Ok(())
        })
    }

    fn sign(&self, hotkey: &str, message: &[u8]) -> Result<[u8; crate::keys::SIGNATURE_BYTES]> {
        Ok(crate::keys::sign(&crate::keys::devnet_keypair(hotkey), message))
    }

    async fn weights(&self, netuid: u16) -> Result<Vec<(u16, Vec<(u16, u16)>)>> {
        self.reveal_due()?;
        let st = self.read()?;
        Ok(st
            .subnets
            .get(&netuid)
            .map(|s| s.weights.iter().map(|(u, (_, w))| (*u, w.clone())).collect())
            .unwrap_or_default())
    }

    async fn ensure_registered(&self, netuid: u16, hotkey: &str, stake: u64) -> Result<u16> {
        if hotkey.is_empty() || hotkey.len() > 128 || hotkey.contains(['/', '\\', '\0']) {
            return Err(ChainError::Config(format!("invalid devnet hotkey name {hotkey:?}")));
        }
        self.update(|st| {
            let s = st.subnets.entry(netuid).or_default();
            if let Some(n) = s.neurons.iter_mut().find(|n| n.hotkey == hotkey) {
                if stake > n.stake {
                    n.stake = stake;
                    n.validator_permit = true;
                }
                return Ok(n.uid);
            }
            if s.neurons.len() >= MAX_NEURONS {
                return Err(ChainError::Subnet { netuid, reason: format!("full ({MAX_NEURONS} neurons)") });
            }
            let uid = s.neurons.len() as u16;
            s.neurons.push(Neuron {
                uid,
                hotkey: hotkey.to_string(),
                stake,
                validator_permit: stake > 0,
                incentive: 0.0,
            });
            tracing::info!(netuid, uid, hotkey, stake, "registered on the devnet");
            Ok(uid)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blocks_hashes_and_registry() {
        let dir = tempfile::tempdir().unwrap();
        let d = Devnet::open(dir.path(), Duration::from_millis(50)).unwrap();
        let b = d.block_number().await.unwrap();
        assert!(d.block_hash(b + 1000).await.is_err());
        let h = d.block_hash(b).await.unwrap();
        assert_eq!(h, d.hash_unchecked(b));
        assert_ne!(h, d.hash_unchecked(b + 1));
        d.wait_for_block(b + 2, Duration::from_secs(5)).await.unwrap();
        let uid = d.ensure_registered(1, "alice", 0).await.unwrap();
        assert_eq!(uid, 0);
        assert_eq!(d.ensure_registered(1, "alice", 0).await.unwrap(), 0);
        assert_eq!(d.ensure_registered(1, "val", 1000).await.unwrap(), 1);
        d.set_commitment(1, "alice", "file:///tmp/alice").await.unwrap();
        assert_eq!(d.commitment(1, "alice").await.unwrap().as_deref(), Some("file:///tmp/alice"));
        assert!(d.set_commitment(1, "nobody", "x").await.is_err());
        assert!(d.set_weights(1, "alice", &[0], &[1], 0).await.is_err(), "no permit");
        d.set_weights(1, "val", &[0, 1], &[65535, 0], 0).await.unwrap();
        let m = d.metagraph(1).await.unwrap();
        assert_eq!(m.neurons.len(), 2);
        assert!((m.neuron(0).unwrap().incentive - 1.0).abs() < 1e-9);
        assert_eq!(d.weights(1).await.unwrap(), vec![(1, vec![(0, 65535), (1, 0)])]);
    }
}
