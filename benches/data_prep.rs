//! Page -> batch preparation of the embedded corpus (read, tokenise in parallel, pack),
//! in tokens/s (criterion's elements/s).

use bistro_train::data::{Dataset, TextTokenizer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn prep(c: &mut Criterion) {
    let ds = Dataset::embedded(4).expect("corpus");
    let tok = TextTokenizer::embedded().expect("tokenizer");
    let mut group = c.benchmark_group("page_to_batch");
    group.sample_size(20);
    for pages in [4usize, 32] {
        let p = ds.pages("devnet", "bench", 1, pages);
        let n = ds.window_batch(&tok, &p, 256).expect("batch").n_targets;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{pages}_pages_seq256"), |b| {
            b.iter(|| ds.window_batch(&tok, &p, 256).expect("batch"))
        });
    }
    group.finish();
}

criterion_group!(benches, prep);
criterion_main!(benches);
