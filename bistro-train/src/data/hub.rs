//! Datasets from the Hugging Face hub (FineWeb-edu by default) through `hf-hub`: parquet
//! shards are downloaded once into the standard cache and read from there, offline when
//! they are already cached.
//!
//! Spec: `hf:OWNER/NAME[@REVISION][:FILE[,FILE...]]`, e.g.
//! `hf:HuggingFaceFW/fineweb-edu:sample/10BT/000_00000.parquet`. Without files, the first
//! shards of FineWeb-edu's `sample/10BT` are used. The cache is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; the endpoint is `$HF_ENDPOINT`; with
//! `HF_HUB_OFFLINE=1` nothing is downloaded.

use std::path::PathBuf;

use hf_hub::{Cache, Repo, RepoType};

use super::error::{DataError, Result};

/// The default dataset repository.
pub const DEFAULT_REPO: &str = "HuggingFaceFW/fineweb-edu";
/// The default shards of [`DEFAULT_REPO`].
pub const DEFAULT_FILES: [&str; 2] = ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"];

/// A parsed `hf:` dataset spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    /// `owner/name`.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Files inside the repository, in shard order.
    pub files: Vec<String>,
}

impl HubSpec {
    /// Parse `hf:OWNER/NAME[@REVISION][:FILE,...]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let rest = spec
            .strip_prefix("hf:")
            .ok_or_else(|| DataError::Invalid(format!("`{spec}` is not an hf: dataset spec")))?;
        let (repo_rev, files) = match rest.split_once(':') {
            Some((r, f)) => {
                (r, f.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect::<Vec<_>>())
            }
            None => (rest, Vec::new()),
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((r, v)) => (r.to_string(), v.to_string()),
            None => (repo_rev.to_string(), "main".to_string()),
        };
        if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
            return Err(DataError::Invalid(format!("`{spec}`: expected hf:OWNER/NAME")));
        }
        let files = if files.is_empty() && repo == DEFAULT_REPO {
            DEFAULT_FILES.iter().map(|s| s.to_string()).collect()
        } else if files.is_empty() {
            return Err(DataError::Invalid(format!("`{spec}`: name the parquet files after a colon")));
        } else {
            files
        };
        Ok(HubSpec { repo, revision, files })
    }
}

/// The hub cache directory (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    ["HF_HUB_OFFLINE", "BISTRO_OFFLINE"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|x| x == "1" || x.eq_ignore_ascii_case("true")))
}

/// Local paths of the spec's files: from the cache when present, else downloaded
/// (`endpoint` overrides `$HF_ENDPOINT`).
pub fn fetch(spec: &HubSpec, cache: Option<PathBuf>, endpoint: Option<String>) -> Result<Vec<PathBuf>> {
    let cache = cache.unwrap_or_else(cache_dir);
    let repo = Repo::with_revision(spec.repo.clone(), RepoType::Dataset, spec.revision.clone());
    let cached = Cache::new(cache.clone()).repo(repo.clone());
    let mut api = None;
    let mut out = Vec::with_capacity(spec.files.len());
    for file in &spec.files {
        if let Some(p) = cached.get(file) {
            out.push(p);
            continue;
        }
        if offline() {
            return Err(DataError::Invalid(format!(
                "{}/{file} is not in the hub cache {} and downloads are off (HF_HUB_OFFLINE)",
                spec.repo,
                cache.display()
            )));
        }
        if api.is_none() {
            // A bar on a terminal; an interrupted download resumes from the partial file
            // (hf-hub keeps it and asks for the rest with a ranged read), in this run up to
            // 5 times, and across runs.
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut b =
                hf_hub::api::sync::ApiBuilder::new().with_cache_dir(cache.clone()).with_progress(tty).with_retries(5);
            if let Some(e) = endpoint.clone().or_else(|| std::env::var("HF_ENDPOINT").ok()) {
                b = b.with_endpoint(e);
            }
            api = Some(b.build().map_err(|e| DataError::Invalid(format!("hub client: {e}")))?);
        }
        let Some(client) = api.as_ref() else { unreachable!("api was just built") };
        tracing::info!(repo = %spec.repo, file, "downloading dataset shard");
        let p = client
            .repo(repo.clone())
            .get(file)
            .map_err(|e| DataError::Invalid(format!("cannot download {}/{file}: {e}", spec.repo)))?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s = HubSpec::parse("hf:HuggingFaceFW/fineweb-edu").unwrap();
        assert_eq!(s.files.len(), DEFAULT_FILES.len());
        assert_eq!(s.revision, "main");
        let s = HubSpec::parse("hf:a/b@v1:x.parquet, y.parquet").unwrap();
        assert_eq!((s.repo.as_str(), s.revision.as_str()), ("a/b", "v1"));
        assert_eq!(s.files, vec!["x.parquet", "y.parquet"]);
        assert!(HubSpec::parse("hf:noslash").is_err());
        assert!(HubSpec::parse("hf:a/b").is_err());
    }
}
