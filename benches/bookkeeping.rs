//! What a window costs every node besides training (issue 29: "1b-sized bytes with training
//! off"): the full-state hash (parameters and the public AdamW's m, v, t: 16 bytes per
//! parameter; every window before protocol 6, at anchors only since), the lineage link that
//! names the state every window since protocol 6 (a digest of the aggregate's values),
//! applying an aggregate through the public AdamW at the window's 1/24 of the
//! coordinates, saving the local state in full (every `JOURNAL_WINDOWS` windows) and as a
//! journal entry (the windows between), and serialising a checkpoint.
//!
//! `BISTRO_BENCH_MODEL` picks the preset (default `small`; `125m` needs ~5 GB of memory,
//! `1b` ~40 GB). Every step is linear in the parameters, so `1b` is `125m` × 9.0.

use bistro_model::{ModelConfig, Params};
use bistro_train::hparams::HParams;
use bistro_train::public_adam::{AdamStep, PublicAdam};
use bistro_train::slices::SliceIndices;
use candle_core::Device;
use criterion::{Criterion, criterion_group, criterion_main};

fn bookkeeping(c: &mut Criterion) {
    let model = std::env::var("BISTRO_BENCH_MODEL").unwrap_or_else(|_| "small".into());
    let h = HParams { model: model.clone(), ..HParams::default() };
    let cfg = ModelConfig::preset(&model).expect("preset");
    let params = Params::genesis(&cfg, 0, &Device::Cpu).expect("genesis");
    let mut adam = PublicAdam::zeros(params.specs());
    let idx = SliceIndices::select(params.specs(), &[3u8; 32], h.compression);
    let g: Vec<Vec<f32>> =
        idx.all().iter().map(|i| i.iter().map(|&j| ((j % 17) as f32 - 8.0) * 1e-3).collect()).collect();
    let step = AdamStep::of(&h, 10);
    adam.apply(&params, &idx, &g, &step).expect("a first step");
    let dir = tempfile::tempdir().expect("tempdir");
    let info = bistro_train::state::StateInfo {
        window: 10,
        hparams_hash: "h".into(),
        model_hash: "m".into(),
        ..Default::default()
    };
    let entry = bistro_train::state::JournalEntry {
        window: 10,
        indices: idx.clone(),
        values: g.clone(),
        step,
        included: true,
        full: None,
    };
    let journaled = bistro_train::state::StateInfo {
        window: 11,
        base: Some(10),
        journal: vec![10],
        state: Some("0".repeat(64)),
        ..info.clone()
    };

    let mut grp = c.benchmark_group(format!("bookkeeping_{model}"));
    grp.sample_size(10);
    grp.bench_function("state_hash", |b| b.iter(|| bistro_train::accepted::state_hash(&params, &adam).expect("hash")));
    let parent = "a".repeat(64);
    grp.bench_function("lineage_link", |b| b.iter(|| bistro_train::lineage::produce(&parent, 10, true, &g, None).id));
    grp.bench_function("apply_aggregate_public_adamw", |b| {
        b.iter(|| adam.apply(&params, &idx, &g, &step).expect("apply"))
    });
    grp.bench_function("save_local_state", |b| {
        b.iter(|| bistro_train::state::save(dir.path(), &params, &adam, &info).expect("save"))
    });
    grp.bench_function("save_journal_entry", |b| {
        b.iter(|| bistro_train::state::append_journal(dir.path(), &entry, &journaled).expect("journal"))
    });
    grp.bench_function("checkpoint_bytes", |b| {
        b.iter(|| bistro_train::state::checkpoint_bytes(&params, &adam, 10, None).expect("checkpoint").len())
    });
    grp.finish();
}

criterion_group!(benches, bookkeeping);
criterion_main!(benches);
