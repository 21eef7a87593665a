//! `doctor`: a preflight of a node's set-up, run before the node itself. One line per check,
//! pass or fail with the fix, so an operator learns what is wrong before a window is lost.
//!
//! The checks, in order: the hyper-parameters, the wallet file (readable, unencrypted,
//! owner-only), the chain connection, the hotkey's registration (and for a validator its
//! permit and stake), the commitment's length, the node's own bucket (put, get, delete), the
//! same bucket read exactly as a peer reads it (the URL as committed, with its read key),
//! the finality lag against the upload grace, the clock against the chain, the hparams hash
//! against the lead's published hparams, and a CUDA build when a GPU is visible. A check
//! whose inputs failed earlier is skipped, with the reason.

use std::sync::Arc;

use bistro_chain::Chain;

use crate::cli::NodeArgs;
use crate::hparams::HParams;
use crate::storage::{Bucket, BucketOptions, TransferConfig};

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All is well.
    Pass,
    /// Something is wrong; the node would fail or lose windows.
    Fail,
    /// Not checked (an earlier check failed, or it does not apply here).
    Skip,
}

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Check {
    /// Short name (`wallet`, `bucket`, ...).
    pub name: &'static str,
    /// Pass, fail or skip.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    pub fix: Option<String>,
}

/// Every check's outcome.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The checks, in the order they ran.
    pub checks: Vec<Check>,
}

impl Report {
    fn pass(&mut self, name: &'static str, detail: impl Into<String>) {
        self.checks.push(Check { name, outcome: Outcome::Pass, detail: detail.into(), fix: None });
    }

    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.checks.push(Check { name, outcome: Outcome::Fail, detail: detail.into(), fix: Some(fix.into()) });
    }

    fn skip(&mut self, name: &'static str, why: impl Into<String>) {
        self.checks.push(Check { name, outcome: Outcome::Skip, detail: why.into(), fix: None });
    }

    /// The checks that failed.
    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| c.outcome == Outcome::Fail).count()
    }

    /// The report as text: one line per check, the fix indented under a failure.
    pub fn render(&self) -> String {
        let mut t = String::new();
        for c in &self.checks {
            let tag = match c.outcome {
                Outcome::Pass => "ok  ",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            t.push_str(&format!("[{tag}] {:<12} {}\n", c.name, c.detail));
            if let Some(fix) = &c.fix {
                t.push_str(&format!("       {:<12} fix: {fix}\n", ""));
            }
        }
        let failed = self.failures();
        t.push_str(&if failed == 0 {
            format!("all {} checks passed or do not apply\n", self.checks.len())
        } else {
            format!("{failed} of {} checks failed\n", self.checks.len())
        });
        t
    }
}

/// Which node the preflight is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A miner: registration, bucket, timing.
    Miner,
    /// A validator: also its permit and stake.
    Validator,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Miner => "miner",
            Role::Validator => "validator",
        }
    }
}

/// Run every check for a node with `role` configured by `args`. Never panics and never
/// changes the chain; it writes and deletes one probe object in the node's own bucket.
pub async fn run(args: &NodeArgs, role: Role) -> Report {
    let mut r = Report::default();
    let devnet = args.chain.is_devnet();
    let role_name = role.name();

    let hparams = match args.hparams() {
        Ok(h) => match h.hash() {
            Ok(hash) => {
                r.pass(
                    "hparams",
                    format!(
                        "network `{}`, model {}, hash {}",
                        h.network,
                        h.model,
                        crate::network::history::short(&hash)
                    ),
                );
                Some(h)
            }
            Err(e) => {
                r.fail("hparams", e.to_string(), "report this: the settings cannot be serialised");
                None
            }
        },
        Err(e) => {
            r.fail("hparams", format!("{e:#}"), "pass the network's file with --hparams (`hparams init` writes one)");
            None
        }
    };

    let wallet = args.chain.wallet(role_name);
    let hotkey = match args.chain.hotkey(role_name) {
        // On the devnet a node without a hotkey file is known by its wallet's names.
        Ok(h) if !wallet.hotkey_path().exists() => {
            r.pass("wallet", format!("devnet identity `{h}` (no hotkey file needed on the devnet)"));
            Some(h)
        }
        Ok(h) => {
            r.pass("wallet", format!("{h} from {} (owner-only, unencrypted)", wallet.hotkey_path().display()));
            Some(h)
        }
        Err(e) => {
            r.fail(
                "wallet",
                e.to_string(),
                format!(
                    "create the hotkey with `btcli wallet new_hotkey --wallet.name {} --wallet.hotkey {}`, keep \
                     it unencrypted and owner-only (`chmod 600`)",
                    wallet.name, wallet.hotkey
                ),
            );
            None
        }
    };

    let chain: Option<Arc<dyn Chain>> = match args.chain.connect(role_name).await {
        Ok(c) => match c.block_number().await {
            Ok(n) => {
                r.pass("chain", format!("{}: block {n}", c.describe()));
                Some(c)
            }
            Err(e) => {
                r.fail("chain", e.to_string(), "check --subtensor.network / --subtensor.chain_endpoint");
                None
            }
        },
        Err(e) => {
            r.fail("chain", e.to_string(), "check --subtensor.network / --subtensor.chain_endpoint and the wallet");
            None
        }
    };

    let netuid = match args.chain.netuid() {
        Ok(n) => Some(n),
        Err(e) => {
            r.fail("netuid", e.to_string(), "pass --netuid N (or set BT_NETUID)");
            None
        }
    };
    match (&chain, &hotkey, netuid) {
        (Some(c), Some(h), Some(netuid)) => match c.metagraph(netuid).await {
            Ok(mg) => match mg.neurons.iter().find(|n| &n.hotkey == h) {
                Some(n) => {
                    r.pass("registered", format!("uid {} on netuid {netuid}", n.uid));
                    if role == Role::Validator {
                        if n.validator_permit && n.stake > 0 {
                            r.pass("permit", format!("validator permit, stake {}", n.stake));
                        } else {
                            r.fail(
                                "permit",
                                format!(
                                    "{} (stake {})",
                                    if n.validator_permit { "stake is zero" } else { "no validator permit" },
                                    n.stake
                                ),
                                format!(
                                    "stake to the hotkey (`btcli stake add --netuid {netuid}`); permits go to the \
                                     top stakes at the next epoch"
                                ),
                            );
                        }
                    }
                }
                None => {
                    let fix = if devnet {
                        "on the devnet a node registers itself when it starts: run it once".to_string()
                    } else {
                        format!(
                            "`btcli subnet register --netuid {netuid} --wallet.name {} --wallet.hotkey {} \
                             --subtensor.network {}`",
                            wallet.name, wallet.hotkey, args.chain.network
                        )
                    };
                    r.fail("registered", format!("hotkey {h} is not registered on netuid {netuid}"), fix);
                }
            },
            Err(e) => r.fail("registered", format!("cannot read netuid {netuid}: {e}"), "check --netuid"),
        },
        _ => r.skip("registered", "needs the chain, the wallet and the netuid"),
    }

    let url = hotkey.as_deref().map(|h| args.bucket_url(h));
    let url = match url {
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            r.fail("bucket", format!("{e:#}"), "check --bucket");
            None
        }
        None => None,
    };
    match url.as_deref().map(|u| (u.len(), bistro_chain::check_commitment_len(u.len()))) {
        Some((len, Ok(()))) => {
            r.pass("commitment", format!("bucket URL is {len} of {} bytes", bistro_chain::MAX_COMMITMENT_BYTES))
        }
        Some((len, Err(_))) => r.fail(
            "commitment",
            format!("bucket URL is {len} bytes, over the chain's {}-byte limit", bistro_chain::MAX_COMMITMENT_BYTES),
            "shorten the bucket name or prefix, or drop query parameters peers do not need",
        ),
        None => r.skip("commitment", "needs the wallet (the default bucket is named after the hotkey)"),
    }

    match &url {
        Some(u) => check_buckets(&mut r, args, u, devnet).await,
        None => {
            r.skip("bucket", "needs the bucket URL");
            r.skip("peer read", "needs the bucket URL");
        }
    }

    check_timing(&mut r, chain.as_deref(), hparams.as_ref(), devnet).await;
    check_lead(&mut r, args, chain.as_deref(), hparams.as_ref(), hotkey.as_deref()).await;
    check_cuda(&mut r);
    r
}

/// Own bucket: put, get, delete a probe; then read the probe through the URL as a peer.
async fn check_buckets(r: &mut Report, args: &NodeArgs, url: &str, devnet: bool) {
    let opts = match args.bucket_options() {
        Ok(o) => BucketOptions { transfer: probe_transfer(), ..o },
        Err(e) => {
            r.fail("bucket", format!("{e:#}"), "check --s3.secret-key-file");
            r.skip("peer read", "needs the bucket");
            return;
        }
    };
    let bucket = match Bucket::open(url, &opts) {
        Ok(b) => b,
        Err(e) => {
            r.fail("bucket", e.to_string(), "check --bucket and the S3 credentials");
            r.skip("peer read", "needs the bucket");
            return;
        }
    };
    let key = format!("doctor-probe-{}.txt", crate::network::node::now_ms());
    let body = bytes::Bytes::from(format!("bistro doctor probe {key}"));
    let own = async {
        bucket.put(&key, body.clone()).await?;
        let got = bucket.get(&key, 1 << 16).await?;
        Ok::<bool, crate::storage::StorageError>(got.bytes == body)
    }
    .await;
    match own {
        Ok(true) => r.pass("bucket", format!("put, get and delete in {}", redact(url))),
        Ok(false) => {
            r.fail(
                "bucket",
                "the probe read back different bytes",
                "check the endpoint: it does not serve what it stores",
            );
        }
        Err(e) => {
            r.fail("bucket", e.to_string(), "check --bucket, the endpoint and this node's write credentials");
            let _ = bucket.delete(&key).await;
            r.skip("peer read", "needs a writable bucket");
            return;
        }
    }
    // As a peer reads it: the committed URL, its read key (or none), short timeouts, the
    // private-endpoint policy of a real network.
    let allow_internal = devnet || args.allow_private_endpoints;
    let peer = Bucket::open_peer(url, &opts.transfer.for_peers(), allow_internal);
    let read = match peer {
        Ok(p) => match p.get(&key, 1 << 16).await {
            Ok(f) if f.bytes == body => match p.list("doctor-probe-").await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("peers can read objects but not list them: {e}")),
            },
            Ok(_) => Err("a peer reads other bytes than were written".to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    let _ = bucket.delete(&key).await;
    match read {
        Ok(()) => r.pass("peer read", "a peer reads and lists the bucket through the URL as committed"),
        Err(e) => r.fail(
            "peer read",
            e,
            "put a read-only key in the URL (`&read_key=..&read_secret=..`; R2: an API token with Object Read) \
             or allow public GetObject and ListBucket on the bucket",
        ),
    }
}

/// How the doctor's probes read and write: one attempt of at most 15 s each (a check says
/// what it found at once, it does not wait out a node's retries).
fn probe_transfer() -> TransferConfig {
    TransferConfig { attempts: 1, timeout: std::time::Duration::from_secs(15), ..Default::default() }
}

/// The URL with its read secret hidden (it is public by design, but logs travel).
fn redact(url: &str) -> String {
    match url.find("read_secret=") {
        Some(i) => {
            let end = url[i..].find('&').map(|j| i + j).unwrap_or(url.len());
            format!("{}read_secret=…{}", &url[..i], &url[end..])
        }
        None => url.to_string(),
    }
}

/// Finality lag against the upload grace, and the local clock against the chain's.
async fn check_timing(r: &mut Report, chain: Option<&dyn Chain>, h: Option<&HParams>, devnet: bool) {
    let (Some(chain), Some(h)) = (chain, h) else {
        r.skip("finality", "needs the chain and the hparams");
        r.skip("clock", "needs the chain");
        return;
    };
    let produced = async { chain.block_time_unix_ms(chain.block_number().await?).await }.await;
    let produced = match produced {
        Ok(t) => t,
        Err(e) => {
            r.fail("finality", e.to_string(), "check the chain endpoint");
            r.skip("clock", "needs the chain");
            return;
        }
    };
    let now = crate::network::node::now_ms();
    let age_ms = now as i64 - produced as i64;
    if devnet {
        r.pass("finality", format!("devnet blocks are final when produced; upload grace {} s", h.upload_grace_secs));
    } else {
        match crate::cli::check_finality_lag(h.upload_grace_secs, now, produced) {
            Ok(()) => r.pass(
                "finality",
                format!(
                    "newest final block is {:.1} s old, within the upload grace of {} s",
                    age_ms as f64 / 1000.0,
                    h.upload_grace_secs
                ),
            ),
            Err(e) => r.fail(
                "finality",
                e.to_string(),
                "use an endpoint that follows the chain closely, check this machine's clock (NTP), or raise \
                 upload_grace_secs for the whole network",
            ),
        }
    }
    // A block cannot come from the future: a newest block younger than -1 s means this
    // machine's clock is behind, and it would judge every deadline late.
    if age_ms < -1000 {
        r.fail(
            "clock",
            format!("the newest block is stamped {:.1} s ahead of this machine's clock", -age_ms as f64 / 1000.0),
            "synchronise the clock (`timedatectl set-ntp true`, or chrony)",
        );
    } else {
        r.pass("clock", format!("newest block stamped {:.1} s before this machine's clock", age_ms as f64 / 1000.0));
    }
}

/// This node's hparams against those the lead candidate published in its bucket.
async fn check_lead(r: &mut Report, args: &NodeArgs, chain: Option<&dyn Chain>, h: Option<&HParams>, me: Option<&str>) {
    let (Some(chain), Some(h)) = (chain, h) else {
        r.skip("lead hparams", "needs the chain and the hparams");
        return;
    };
    let Ok(netuid) = args.chain.netuid() else {
        r.skip("lead hparams", "needs the netuid");
        return;
    };
    let lead = async {
        // As of now (a node reads each window's roster at its seed block; this is the
        // current picture): the first permit holder by stake with a committed bucket.
        let mg = chain.metagraph(netuid).await?;
        for n in crate::network::accepted::validators_by_stake(&mg) {
            if let Some(url) = chain.commitment(netuid, &n.hotkey).await? {
                return Ok(Some((n.hotkey, url)));
            }
        }
        Ok::<_, bistro_chain::ChainError>(None)
    }
    .await;
    let (lead, url) = match lead {
        Ok(Some(l)) => l,
        Ok(None) => {
            r.skip("lead hparams", "no validator with a permit has committed a bucket yet");
            return;
        }
        Err(e) => {
            r.fail("lead hparams", format!("cannot read the validators: {e}"), "check the chain endpoint");
            return;
        }
    };
    if Some(lead.as_str()) == me {
        r.pass("lead hparams", "this node is the lead candidate: its hparams are the network's");
        return;
    }
    let allow_internal = args.chain.is_devnet() || args.allow_private_endpoints;
    let fetched = match Bucket::open_peer(&url, &probe_transfer().for_peers(), allow_internal) {
        Ok(b) => {
            b.get(crate::protocol::HPARAMS_KEY, crate::protocol::HPARAMS_MAX_BYTES).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let theirs = fetched.and_then(|f| {
        let text = String::from_utf8(f.bytes.to_vec()).map_err(|_| "not UTF-8".to_string())?;
        toml::from_str::<HParams>(&text).map_err(|e| format!("not valid hparams: {e}"))
    });
    let short = crate::network::history::short;
    match theirs {
        Ok(theirs) => {
            let (mine, other) = (h.hash().unwrap_or_default(), theirs.hash().unwrap_or_default());
            if mine == other {
                r.pass("lead hparams", format!("same hash as the lead {} ({})", lead, short(&mine)));
            } else {
                let diff = h.differences(&theirs);
                r.fail(
                    "lead hparams",
                    format!(
                        "hash {} differs from the lead {}'s {} ({})",
                        short(&mine),
                        lead,
                        short(&other),
                        if diff.is_empty() { "same values, another protocol version".into() } else { diff.join("; ") }
                    ),
                    "use the network's hparams file (the lead's is in its bucket as `hparams.toml`)",
                );
            }
        }
        Err(e) => r.skip("lead hparams", format!("the lead {lead} has not published readable hparams: {e}")),
    }
}

/// A visible NVIDIA GPU with a CPU-only build wastes it.
fn check_cuda(r: &mut Report) {
    let gpu = std::path::Path::new("/dev/nvidia0").exists()
        || std::process::Command::new("nvidia-smi").arg("-L").output().is_ok_and(|o| o.status.success());
    let built = cfg!(feature = "cuda");
    match (gpu, built) {
        (true, false) => r.fail(
            "cuda",
            "an NVIDIA GPU is visible but this binary was built without CUDA",
            "build with `scripts/cuda-build.sh cargo build --release --features cuda -p bistro-train --bin miner` \
             (and `-p bistro-validate --bin validator`)",
        ),
        (true, true) => r.pass("cuda", "GPU visible, CUDA build"),
        (false, true) => r.pass("cuda", "CUDA build, no GPU visible: runs on the CPU"),
        (false, false) => r.pass("cuda", "no GPU visible, CPU build"),
    }
}
