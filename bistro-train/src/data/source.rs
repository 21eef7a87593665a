//! Row sources: the shipped corpus, local JSONL/text files, and (via [`super::hub`]) parquet.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::error::{DataError, Result, io_err};

/// Name and row count of one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// A stable name (the file name for file-backed shards).
    pub name: String,
    /// Number of rows (documents) in the shard.
    pub rows: u64,
}

/// An ordered list of shards whose rows can be read by position.
pub trait RowSource: Send + Sync {
    /// A short description for logs (`embedded jargon corpus`, a directory, a hub repo).
    fn describe(&self) -> String;
    /// The shards, in order.
    fn shards(&self) -> &[ShardInfo];
    /// `count` consecutive rows of `shard` starting at `offset`.
    fn read_rows(&self, shard: usize, offset: u64, count: usize) -> Result<Vec<String>>;
}

/// Shards held in memory (the embedded corpus, JSONL and text files).
#[derive(Clone, Debug)]
pub struct MemoryShards {
    description: String,
    infos: Vec<ShardInfo>,
    rows: Vec<Vec<String>>,
}

/// The shipped corpus (the Jargon File 4.4.7, public domain; see `data/corpus/SOURCE.md`).
const EMBEDDED: [(&str, &[u8]); 4] = [
    ("jargon-0000.jsonl.gz", include_bytes!("../../data/corpus/jargon-0000.jsonl.gz")),
    ("jargon-0001.jsonl.gz", include_bytes!("../../data/corpus/jargon-0001.jsonl.gz")),
    ("jargon-0002.jsonl.gz", include_bytes!("../../data/corpus/jargon-0002.jsonl.gz")),
    ("jargon-0003.jsonl.gz", include_bytes!("../../data/corpus/jargon-0003.jsonl.gz")),
];

impl MemoryShards {
    /// Build from named shards of rows.
    pub fn new(description: impl Into<String>, shards: Vec<(String, Vec<String>)>) -> Self {
        let infos = shards.iter().map(|(n, r)| ShardInfo { name: n.clone(), rows: r.len() as u64 }).collect();
        let rows = shards.into_iter().map(|(_, r)| r).collect();
        MemoryShards { description: description.into(), infos, rows }
    }

    /// The embedded corpus shipped in this crate.
    pub fn embedded() -> Result<Self> {
        let shards = EMBEDDED
            .iter()
            .map(|(name, bytes)| {
                let path = PathBuf::from(format!("<embedded>/{name}"));
                Ok((name.to_string(), parse_jsonl(&path, &gunzip(&path, bytes)?)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new("embedded corpus (Jargon File 4.4.7)", shards))
    }

    /// Load local files: a `.jsonl`, `.jsonl.gz` or `.txt` file, or a directory of them
    /// (one shard per file, in name order). JSONL rows are objects with a `text` field;
    /// text files hold documents separated by blank lines.
    pub fn from_path(path: &Path) -> Result<Self> {
        let files = list_files(path, &["jsonl", "gz", "txt"])?;
        let shards = files
            .iter()
            .map(|f| {
                let bytes = std::fs::read(f).map_err(io_err(f))?;
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let rows = if name.ends_with(".txt") {
                    parse_text(f, &bytes)?
                } else if name.ends_with(".gz") {
                    parse_jsonl(f, &gunzip(f, &bytes)?)?
                } else {
                    parse_jsonl(f, &bytes)?
                };
                Ok((name, rows))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new(path.display().to_string(), shards))
    }
}

impl RowSource for MemoryShards {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn shards(&self) -> &[ShardInfo] {
        &self.infos
    }

    fn read_rows(&self, shard: usize, offset: u64, count: usize) -> Result<Vec<String>> {
        let rows = self.rows.get(shard).ok_or_else(|| DataError::PageOutOfRange {
            page: format!("{shard}:{offset}"),
            reason: format!("no shard {shard} of {}", self.rows.len()),
        })?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(count);
        if end > rows.len() {
            return Err(DataError::PageOutOfRange {
                page: format!("{shard}:{offset}"),
                reason: format!("rows {start}..{end} of a shard with {} rows", rows.len()),
            });
        }
        Ok(rows[start..end].to_vec())
    }
}

/// Files under `path` with one of the given extensions, sorted by name; `path` itself when it is a file.
pub(crate) fn list_files(path: &Path, exts: &[&str]) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io_err(path))? {
        let p = entry.map_err(io_err(path))?.path();
        if p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.contains(&e)) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(DataError::EmptyCorpus(format!("{} (no {} files)", path.display(), exts.join("/"))));
    }
    Ok(files)
}

fn gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).map_err(|e| DataError::Parse {
        path: path.to_path_buf(),
        line: None,
        reason: format!("bad gzip data: {e}"),
    })?;
    Ok(out)
}

fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        DataError::Parse {
            path: path.to_path_buf(),
            line: Some(line),
            reason: format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        }
    })
}

fn parse_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let text = utf8(path, bytes)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| DataError::Parse {
            path: path.to_path_buf(),
            line: Some(i + 1),
            reason: e.to_string(),
        })?;
        let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| DataError::Parse {
            path: path.to_path_buf(),
            line: Some(i + 1),
            reason: "expected an object with a string field `text`".into(),
        })?;
        rows.push(t.to_string());
    }
    Ok(rows)
}

fn parse_text(path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let text = utf8(path, bytes)?;
    Ok(text.replace("\r\n", "\n").split("\n\n").map(str::trim).filter(|d| !d.is_empty()).map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_corpus_loads() {
        let s = MemoryShards::embedded().unwrap();
        assert_eq!(s.shards().len(), 4);
        let total: u64 = s.shards().iter().map(|s| s.rows).sum();
        assert_eq!(total, 2650);
        let r = s.read_rows(0, 0, 2).unwrap();
        assert!(r[0].len() > 10);
        assert!(s.read_rows(0, s.shards()[0].rows - 1, 2).is_err());
        assert!(s.read_rows(9, 0, 1).is_err());
    }
}
