//! Parquet shards and the Hugging Face hub path, offline: a pre-seeded hub cache, and the
//! real download code against a local HTTP stand-in for the hub.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bistro_train::data::hub::{self, HubSpec};
use bistro_train::data::parquet::ParquetShards;
use bistro_train::data::{Dataset, MemoryShards, TextTokenizer};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

fn rows(n: usize, salt: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!("{salt} document {i}: the {} hacker {} a kludge.", ["quick", "lazy", "wizardly"][i % 3], i * 7)
        })
        .collect()
}

/// Write `texts` as a parquet file with a `text` column, in row groups of `group` rows.
fn write_parquet(path: &Path, texts: &[String], group: usize) {
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED INT64 id; }",
        )
        .unwrap(),
    );
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build());
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    for (g, chunk) in texts.chunks(group).enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = chunk.iter().map(|t| ByteArray::from(t.as_str())).collect();
        col.typed::<ByteArrayType>().write_batch(&values, None, None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let ids: Vec<i64> = (0..chunk.len() as i64).map(|i| i + (g * group) as i64).collect();
        col.typed::<parquet::data_type::Int64Type>().write_batch(&ids, None, None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

#[test]
fn parquet_and_jsonl_give_identical_batches() {
    let dir = tempfile::tempdir().unwrap();
    let a = rows(37, "alpha");
    let b = rows(23, "beta");
    write_parquet(&dir.path().join("a.parquet"), &a, 10);
    write_parquet(&dir.path().join("b.parquet"), &b, 7);
    let pq = Dataset::open(dir.path().to_str().unwrap(), 3).unwrap();
    assert_eq!(pq.shards().iter().map(|s| s.rows).collect::<Vec<_>>(), vec![37, 23]);
    let mem = Dataset::new(
        Arc::new(MemoryShards::new("same rows", vec![("a".into(), a.clone()), ("b".into(), b.clone())])),
        3,
    )
    .unwrap();
    let tok = TextTokenizer::embedded().unwrap();
    for w in 0..5 {
        let pages = pq.pages("devnet", "hk", w, 4);
        assert_eq!(pages, mem.pages("devnet", "hk", w, 4));
        for p in &pages {
            assert_eq!(pq.read_page(*p).unwrap(), mem.read_page(*p).unwrap(), "page {p} crosses row groups");
        }
        assert_eq!(pq.window_batch(&tok, &pages, 32).unwrap(), mem.window_batch(&tok, &pages, 32).unwrap());
    }
    // Rows that straddle row groups come back in order.
    let src = ParquetShards::open("t", &[dir.path().join("a.parquet")], "text").unwrap();
    use bistro_train::data::RowSource;
    assert_eq!(src.read_rows(0, 8, 5).unwrap(), a[8..13].to_vec());
    assert!(src.read_rows(0, 35, 5).is_err());
}

#[test]
fn corrupt_or_wrong_parquet_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 this is not parquet PAR1").unwrap();
    let e = ParquetShards::open("t", std::slice::from_ref(&bad), "text").unwrap_err().to_string();
    assert!(e.contains("bad.parquet"), "{e}");
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &rows(5, "x"), 5);
    let e = ParquetShards::open("t", &[good], "content").unwrap_err().to_string();
    assert!(e.contains("no column `content`"), "{e}");
    let e = ParquetShards::open("t", &[dir.path().join("missing.parquet")], "text").unwrap_err().to_string();
    assert!(e.contains("missing.parquet"), "{e}");
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Seed an hf-hub cache with `file` of dataset `repo` (the layout hf-hub writes).
fn seed_cache(cache: &Path, repo: &str, file: &str, content: &[u8]) -> PathBuf {
    let root = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    let etag = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    std::fs::write(root.join("blobs").join(etag), content).unwrap();
    let snap = root.join("snapshots").join(COMMIT).join(file);
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::fs::copy(root.join("blobs").join(etag), &snap).unwrap();
    snap
}

#[test]
fn seeded_hub_cache_works_offline() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard.parquet");
    write_parquet(&shard, &rows(40, "fineweb"), 16);
    let cache = dir.path().join("hub");
    let file = "sample/10BT/000_00000.parquet";
    seed_cache(&cache, "HuggingFaceFW/fineweb-edu", file, &std::fs::read(&shard).unwrap());
    let spec = HubSpec::parse(&format!("hf:HuggingFaceFW/fineweb-edu:{file}")).unwrap();
    // A closed port as the endpoint: any network access would fail.
    let paths = hub::fetch(&spec, Some(cache), Some("http://127.0.0.1:1".into())).unwrap();
    let ds = Dataset::new(Arc::new(ParquetShards::open("hub", &paths, "text").unwrap()), 4).unwrap();
    assert_eq!(ds.shards()[0].rows, 40);
    let tok = TextTokenizer::embedded().unwrap();
    let batch = ds.window_batch(&tok, &ds.pages("devnet", "hk", 3, 2), 32).unwrap();
    assert!(batch.n_targets > 10);
}

/// A minimal stand-in for the hub's `resolve` endpoint (what hf-hub 0.4 needs: a ranged
/// GET answered with 206 and Content-Range, X-Repo-Commit and an ETag, then a full GET).
fn start_hub(content: Vec<u8>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let mut ranged = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if request.is_empty() {
                    request = line.clone();
                }
                if line.to_ascii_lowercase().starts_with("range: bytes=0-0") {
                    ranged = true;
                }
            }
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ok = request.contains("/datasets/test/corpus/resolve/main/data/train.parquet");
            let etag = "\"5a5e1d3c0b2f4a6e8d9c7b1a3f5e7d9c0b2a4f6e8d1c3b5a7f9e0d2c4b6a8f1e\"";
            let head = if !ok {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            } else if ranged {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: 1\r\nContent-Range: bytes 0-0/{}\r\nX-Repo-Commit: {COMMIT}\r\nETag: {etag}\r\nConnection: close\r\n\r\n",
                    content.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Repo-Commit: {COMMIT}\r\nETag: {etag}\r\nConnection: close\r\n\r\n",
                    content.len()
                )
            };
            let _ = stream.write_all(head.as_bytes());
            if ok {
                let _ = stream.write_all(if ranged { &content[..1] } else { &content });
            }
        }
    });
    (format!("http://{addr}"), hits)
}

#[test]
fn real_download_path_against_a_local_hub() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard.parquet");
    write_parquet(&shard, &rows(25, "downloaded"), 10);
    let bytes = std::fs::read(&shard).unwrap();
    let (endpoint, hits) = start_hub(bytes.clone());
    let cache = dir.path().join("hub");
    let spec = HubSpec::parse("hf:test/corpus:data/train.parquet").unwrap();
    let paths = hub::fetch(&spec, Some(cache.clone()), Some(endpoint.clone())).unwrap();
    assert_eq!(std::fs::read(&paths[0]).unwrap(), bytes);
    let ds = Dataset::new(Arc::new(ParquetShards::open("hub", &paths, "text").unwrap()), 5).unwrap();
    assert_eq!(ds.shards()[0].rows, 25);
    let after_first = hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after_first >= 1);
    // Second time: served from the cache, no request.
    let again = hub::fetch(&spec, Some(cache), Some(endpoint)).unwrap();
    assert_eq!(again, paths);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), after_first);
    // A file the hub does not have is a clear error.
    let missing = HubSpec::parse("hf:test/corpus:nope.parquet").unwrap();
    let (endpoint2, _) = start_hub(bytes);
    let e = hub::fetch(&missing, Some(dir.path().join("hub2")), Some(endpoint2)).unwrap_err().to_string();
    assert!(e.contains("nope.parquet"), "{e}");
}
