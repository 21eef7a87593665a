//! Slice throughput for the `1b` and `125m` configs at the devnet's compression (24) and
//! code width (2 bits): index generation, gather + quantise + encode, put + get (local
//! directory and memory), decode + validate, and aggregate + the public AdamW step of 8
//! slices. Throughput is in bytes of slice (MB/s); one slice per iteration, so
//! slices/s = 1 / time.

use bistro_model::{ModelConfig, Params};
use bistro_train::hparams::HParams;
use bistro_train::public_adam::{AdamStep, PublicAdam};
use bistro_train::slices::{self, Contribution, SliceIndices, SliceMeta};
use bistro_train::storage::{Bucket, BucketOptions};
use bytes::Bytes;
use candle_core::Device;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn bench_config(c: &mut Criterion, preset: &str) {
    let cfg = ModelConfig::preset(preset).expect("preset");
    let params = Params::genesis(&cfg, 0, &Device::Cpu).expect("genesis");
    let seed = [42u8; 32];
    let h = HParams::default();
    let compression = h.compression;
    let codec = h.codec();
    let idx = SliceIndices::select(params.specs(), &seed, compression);
    let names: Vec<String> = params.specs().iter().map(|s| s.name.clone()).collect();
    let meta = SliceMeta::new(7, "bench-hotkey", "bench-parent", compression, "h", &cfg.hash().unwrap());
    let theta = slices::gather_params(&params, &idx).expect("gather");
    let dithers = slices::dithers(&seed, "bench-hotkey", &idx);
    let codes = slices::encode_gradient(&codec, &theta, &dithers);
    let bytes = slices::encode(&meta, &names, &codec, &codes).expect("encode");
    let exp = slices::expectation(&params, &idx, meta.clone(), u64::MAX, codec);
    let mut g = c.benchmark_group(format!("slice_{preset}"));
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("index_generation", |b| b.iter(|| SliceIndices::select(params.specs(), &seed, compression)));
    g.bench_function("extract_encode", |b| {
        b.iter(|| {
            let t = slices::gather_params(&params, &idx).expect("gather");
            slices::encode(&meta, &names, &codec, &slices::encode_gradient(&codec, &t, &dithers)).expect("encode")
        })
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let local = Bucket::open(&format!("file://{}", dir.path().display()), &BucketOptions::default()).expect("bucket");
    let mem = Bucket::open("memory://bench", &BucketOptions::default()).expect("bucket");
    for (name, bucket) in [("put_get_local_dir", &local), ("put_get_memory", &mem)] {
        let body = Bytes::from(bytes.clone());
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    bucket.put("slice-7-bench-hotkey.safetensors", body.clone()).await.expect("put");
                    bucket.get("slice-7-bench-hotkey.safetensors", u64::MAX).await.expect("get")
                })
            })
        });
    }
    g.bench_function("decode_validate", |b| b.iter(|| slices::decode(&bytes, &exp).expect("decode")));
    let contributions: Vec<Contribution> = (0..8)
        .map(|i| Contribution {
            hotkey: format!("m{i}"),
            values: theta.iter().map(|v| v.iter().map(|x| x + i as f32 * 1e-6).collect()).collect(),
        })
        .collect();
    g.throughput(Throughput::Bytes(8 * bytes.len() as u64));
    let mut adam = PublicAdam::zeros(params.specs());
    let step = AdamStep::of(&h, 10);
    g.bench_function("aggregate_apply_8", |b| {
        b.iter(|| {
            let agg = slices::aggregate(&idx.lengths(), &contributions, &h.aggregation);
            adam.apply(&params, &idx, &agg.values, &step).expect("step");
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_config(c, "125m");
    bench_config(c, "1b");
}

criterion_group!(slice_benches, benches);
criterion_main!(slice_benches);
