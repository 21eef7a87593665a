//! Parquet shards (FineWeb-edu and other Hugging Face datasets): one shard per file, rows
//! read by position from the file's row groups, text from a string column.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use super::error::{DataError, Result};
use super::source::{RowSource, ShardInfo};

/// Parquet files as shards.
#[derive(Debug)]
pub struct ParquetShards {
    description: String,
    infos: Vec<ShardInfo>,
    files: Vec<PathBuf>,
    /// Rows per row group, per file.
    row_groups: Vec<Vec<u64>>,
    column: String,
}

fn parse_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Parse { path: path.to_path_buf(), line: None, reason: format!("not a readable parquet file: {e}") }
}

impl ParquetShards {
    /// Open `files` (each must have a string column `column`, e.g. `text`).
    pub fn open(description: impl Into<String>, files: &[PathBuf], column: &str) -> Result<Self> {
        let mut infos = Vec::with_capacity(files.len());
        let mut row_groups = Vec::with_capacity(files.len());
        for f in files {
            let file = File::open(f).map_err(super::error::io_err(f))?;
            let reader = SerializedFileReader::new(file).map_err(|e| parse_err(f, e))?;
            let schema = reader.metadata().file_metadata().schema();
            if !schema.get_fields().iter().any(|t| t.name() == column) {
                return Err(DataError::Parse { path: f.clone(), line: None, reason: format!("no column `{column}`") });
            }
            let groups: Vec<u64> = reader.metadata().row_groups().iter().map(|g| g.num_rows().max(0) as u64).collect();
            infos.push(ShardInfo {
                name: f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                rows: groups.iter().sum(),
            });
            row_groups.push(groups);
        }
        Ok(ParquetShards {
            description: description.into(),
            infos,
            files: files.to_vec(),
            row_groups,
            column: column.to_string(),
        })
    }
}

impl RowSource for ParquetShards {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn shards(&self) -> &[ShardInfo] {
        &self.infos
    }

    fn read_rows(&self, shard: usize, offset: u64, count: usize) -> Result<Vec<String>> {
        let path = self.files.get(shard).ok_or_else(|| DataError::PageOutOfRange {
            page: format!("{shard}:{offset}"),
            reason: format!("no shard {shard}"),
        })?;
        let total = self.infos[shard].rows;
        if offset + count as u64 > total {
            return Err(DataError::PageOutOfRange {
                page: format!("{shard}:{offset}"),
                reason: format!("rows {offset}..{} of a shard with {total} rows", offset + count as u64),
            });
        }
        let file = File::open(path).map_err(super::error::io_err(path))?;
        let reader = SerializedFileReader::new(file).map_err(|e| parse_err(path, e))?;
        let mut out = Vec::with_capacity(count);
        let mut group_start = 0u64;
        for (g, &n) in self.row_groups[shard].iter().enumerate() {
            let group_end = group_start + n;
            let want_start = offset + out.len() as u64;
            if out.len() == count {
                break;
            }
            if want_start >= group_end {
                group_start = group_end;
                continue;
            }
            let rg = reader.get_row_group(g).map_err(|e| parse_err(path, e))?;
            let skip = (want_start - group_start) as usize;
            for row in rg.get_row_iter(None).map_err(|e| parse_err(path, e))?.skip(skip) {
                if out.len() == count {
                    break;
                }
                let row = row.map_err(|e| parse_err(path, e))?;
                let text = row
                    .get_column_iter()
                    .find(|(name, _)| name.as_str() == self.column)
                    .and_then(|(_, f)| match f {
                        Field::Str(s) => Some(s.clone()),
                        Field::Bytes(b) => std::str::from_utf8(b.data()).ok().map(str::to_string),
                        Field::Null => Some(String::new()),
                        _ => None,
                    })
                    .ok_or_else(|| DataError::Parse {
                        path: path.clone(),
                        line: None,
                        reason: format!("row {}: column `{}` is not UTF-8 text", want_start, self.column),
                    })?;
                out.push(text);
            }
            group_start = group_end;
        }
        Ok(out)
    }
}
