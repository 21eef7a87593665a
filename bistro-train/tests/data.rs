//! The data pipeline end to end: same inputs give bit-identical batches; bad input gives
//! clear errors that name the file.

use std::sync::Arc;

use bistro_train::data::{DataError, Dataset, MemoryShards, TextTokenizer};

#[test]
fn same_inputs_give_identical_batches_and_inputs_matter() {
    let ds = Dataset::embedded(4).unwrap();
    let tok = TextTokenizer::embedded().unwrap();
    let pages = ds.pages("devnet", "5Alice", 12, 3);
    let a = ds.window_batch(&tok, &pages, 64).unwrap();
    let b = Dataset::embedded(4).unwrap().window_batch(&tok, &ds.pages("devnet", "5Alice", 12, 3), 64).unwrap();
    assert_eq!(a, b);
    assert!(a.rows > 0 && a.n_targets > 100);
    assert_ne!(pages, ds.pages("devnet", "5Bob", 12, 3));
    assert_ne!(pages, ds.pages("devnet", "5Alice", 13, 3));
    let c = ds.window_batch(&tok, &ds.pages("devnet", "5Bob", 12, 3), 64).unwrap();
    assert_ne!(a.input_ids, c.input_ids);
    // Every id is in the model's vocabulary and the text decodes back.
    assert!(a.input_ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
    let first_page_rows = ds.read_page(pages[0]).unwrap();
    let decoded = tok.decode(&a.input_ids[..a.seq_len]).unwrap();
    assert!(first_page_rows[0].starts_with(&decoded[..decoded.len().min(20)]));
}

#[test]
fn local_jsonl_and_text_files_work_through_the_same_code() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..30).map(|i| format!("{{\"text\": \"row number {i} of the test shard\"}}")).collect();
    std::fs::write(dir.path().join("a.jsonl"), rows.join("\n")).unwrap();
    std::fs::write(
        dir.path().join("b.txt"),
        (0..12).map(|i| format!("paragraph {i}\nstill {i}")).collect::<Vec<_>>().join("\n\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("ignored.bin"), [0u8, 1, 2]).unwrap();
    let ds = Dataset::open(dir.path().to_str().unwrap(), 5).unwrap();
    assert_eq!(ds.shards().len(), 2);
    assert_eq!(ds.shards()[0].rows, 30);
    assert_eq!(ds.shards()[1].rows, 12);
    assert_eq!(ds.num_pages(), 26 + 8);
    let tok = TextTokenizer::embedded().unwrap();
    let batch = ds.window_batch(&tok, &ds.pages("n", "h", 0, 4), 32).unwrap();
    assert!(batch.rows > 0);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Empty corpus.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = Dataset::open(empty.to_str().unwrap(), 2).unwrap_err();
    assert!(matches!(e, DataError::EmptyCorpus(_)), "{e}");
    let e = Dataset::new(Arc::new(MemoryShards::new("none", vec![])), 2).unwrap_err();
    assert!(matches!(e, DataError::EmptyCorpus(_)), "{e}");
    // A shard shorter than a page names the shard.
    let short = dir.path().join("short.jsonl");
    std::fs::write(&short, "{\"text\":\"a\"}\n{\"text\":\"b\"}\n").unwrap();
    let e = Dataset::open(short.to_str().unwrap(), 3).unwrap_err().to_string();
    assert!(e.contains("short.jsonl") && e.contains("2 rows"), "{e}");
    // Non-UTF-8 bytes name the file and the line.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine line\n\nsecond \xff\xfe para\n").unwrap();
    let e = Dataset::open(bad.to_str().unwrap(), 1).unwrap_err().to_string();
    assert!(e.contains("bad.txt") && e.contains("line 3") && e.contains("UTF-8"), "{e}");
    // Malformed JSON lines name the file and line.
    let js = dir.path().join("broken.jsonl");
    std::fs::write(&js, "{\"text\":\"ok\"}\n{\"text\": 5}\n").unwrap();
    let e = Dataset::open(js.to_str().unwrap(), 1).unwrap_err().to_string();
    assert!(e.contains("broken.jsonl") && e.contains("line 2"), "{e}");
    // Corrupt gzip.
    let gz = dir.path().join("corrupt.jsonl.gz");
    std::fs::write(&gz, b"\x1f\x8b\x08\x00garbage").unwrap();
    let e = Dataset::open(gz.to_str().unwrap(), 1).unwrap_err().to_string();
    assert!(e.contains("corrupt.jsonl.gz") && e.contains("gzip"), "{e}");
    // Missing path.
    let e = Dataset::open("/no/such/corpus", 1).unwrap_err().to_string();
    assert!(e.contains("/no/such/corpus"), "{e}");
    // A tokenizer file that does not parse, and one with no EOS token.
    let t = dir.path().join("tokenizer.json");
    std::fs::write(&t, "{\"version\": 1").unwrap();
    let e = TextTokenizer::open(t.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    // A page outside the dataset.
    let ds = Dataset::embedded(4).unwrap();
    let e = ds.read_page(bistro_train::data::Page { shard: 0, row_offset: u64::MAX }).unwrap_err();
    assert!(matches!(e, DataError::PageOutOfRange { .. }));
    assert!(Dataset::embedded(0).is_err());
}
