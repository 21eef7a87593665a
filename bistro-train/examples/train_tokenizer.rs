//! Regenerate the shipped tokenizer: a byte-level BPE of 8192 tokens trained on the
//! embedded corpus, written to `bistro-train/data/tokenizer.json`.
//!
//! ```bash
//! cargo run --release -p bistro-train --example train_tokenizer
//! ```

use bistro_train::data::{MemoryShards, RowSource, tokenizer::train_byte_level_bpe};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = MemoryShards::embedded()?;
    let mut docs = Vec::new();
    for (i, s) in corpus.shards().iter().enumerate() {
        docs.extend(corpus.read_rows(i, 0, s.rows as usize)?);
    }
    let start = std::time::Instant::now();
    let tok = train_byte_level_bpe(&docs, 8192)?;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tokenizer.json");
    tok.save(&out, false).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!(
        "trained on {} documents in {:.1}s: vocab {} -> {}",
        docs.len(),
        start.elapsed().as_secs_f64(),
        tok.get_vocab_size(true),
        out.display()
    );
    Ok(())
}
