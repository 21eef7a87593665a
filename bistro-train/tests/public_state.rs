//! The public optimizer state is shared state: the same step on every node, in the state
//! hash, in checkpoints and in the local state, so a joiner or a restarted node resumes it
//! exactly; a torn local state is not loaded; a hostile checkpoint's moments are refused.

use bistro_model::{ModelConfig, Params};
use bistro_train::accepted::state_hash;
use bistro_train::public_adam::{AdamStep, PublicAdam};
use bistro_train::slices::SliceIndices;
use bistro_train::state::{self, StateInfo};
use candle_core::Device;

fn micro() -> ModelConfig {
    ModelConfig::new(50, 16, 24, 2, 4, 2, 16, 1e-5)
}

/// Genesis after three public steps at different coordinates.
fn trained() -> (Params, PublicAdam) {
    let params = Params::genesis(&micro(), 1, &Device::Cpu).unwrap();
    let mut adam = PublicAdam::zeros(params.specs());
    let h = bistro_train::HParams::default();
    for w in 0..3u64 {
        let idx = SliceIndices::select(params.specs(), &w.to_le_bytes(), 4);
        let g: Vec<Vec<f32>> = idx
            .all()
            .iter()
            .map(|ids| ids.iter().map(|&i| ((i as f32 + w as f32) * 0.3).sin() * 1e-2).collect())
            .collect();
        adam.apply(&params, &idx, &g, &AdamStep::of(&h, w)).unwrap();
    }
    (params, adam)
}

#[test]
fn the_step_is_deterministic_and_lazy() {
    let (a, adam_a) = trained();
    let (b, adam_b) = trained();
    assert_eq!(state_hash(&a, &adam_a).unwrap(), state_hash(&b, &adam_b).unwrap());
    // Only drawn coordinates have steps; some have several.
    let steps: Vec<u32> = adam_a.t.iter().flatten().copied().collect();
    assert!(
        steps.contains(&0) && steps.iter().any(|&t| t >= 2),
        "lazy: some coordinates untouched, some stepped twice"
    );
    // The moments are part of the state: the same parameters with other moments hash apart.
    let mut other = adam_a.clone();
    other.m[0][0] += 1e-6;
    assert_ne!(state_hash(&a, &adam_a).unwrap(), state_hash(&a, &other).unwrap());
}

#[test]
fn checkpoints_and_local_state_resume_the_optimizer_exactly() {
    let (params, adam) = trained();
    let hash = state_hash(&params, &adam).unwrap();
    // A published checkpoint.
    let bytes = state::checkpoint_bytes(&params, &adam, 12).unwrap();
    let (p2, a2) = state::params_from_checkpoint(&bytes, &micro(), &Device::Cpu).unwrap();
    assert_eq!(a2, adam);
    assert_eq!(state_hash(&p2, &a2).unwrap(), hash);
    // The local state directory.
    let dir = tempfile::tempdir().unwrap();
    let info = StateInfo { window: 12, hparams_hash: "hp".into(), model_hash: micro().hash().unwrap() };
    state::save(dir.path(), &params, &adam, &info).unwrap();
    let (i3, p3, a3) = state::load(dir.path(), &micro(), "hp", &Device::Cpu).unwrap().unwrap();
    assert_eq!((i3.window, &a3), (12, &adam));
    assert_eq!(state_hash(&p3, &a3).unwrap(), hash);
    // A process killed after writing the optimizer state of window 13 but before the
    // parameters: the pair of window 12 is still there and resumes.
    let other = tempfile::tempdir().unwrap();
    let newer = StateInfo { window: 13, ..info.clone() };
    state::save(other.path(), &params, &PublicAdam::zeros(params.specs()), &newer).unwrap();
    std::fs::copy(other.path().join(state::optimizer_file(13)), dir.path().join(state::optimizer_file(13))).unwrap();
    let (i4, _, a4) = state::load(dir.path(), &micro(), "hp", &Device::Cpu).unwrap().unwrap();
    assert_eq!((i4.window, &a4), (12, &adam));
    // Without the optimizer state of the parameters' window, the node rejoins.
    std::fs::remove_file(dir.path().join(state::optimizer_file(12))).unwrap();
    assert!(state::load(dir.path(), &micro(), "hp", &Device::Cpu).unwrap().is_none());
}

#[test]
fn a_checkpoint_with_hostile_moments_is_refused() {
    let (params, mut adam) = trained();
    adam.v[1][0] = -1.0;
    let bytes = state::checkpoint_bytes(&params, &adam, 4).unwrap();
    let e = state::params_from_checkpoint(&bytes, &micro(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("negative"), "{e}");
    adam.v[1][0] = 0.0;
    adam.m[2][0] = f32::NAN;
    let bytes = state::checkpoint_bytes(&params, &adam, 4).unwrap();
    assert!(state::params_from_checkpoint(&bytes, &micro(), &Device::Cpu).is_err());
    // Without its optimizer state, a checkpoint is refused too (a v3 checkpoint).
    let plain = bistro_train::state::checkpoint_bytes(&params, &PublicAdam::zeros(params.specs()), 4).unwrap();
    assert!(state::params_from_checkpoint(&plain, &micro(), &Device::Cpu).is_ok());
    let mut table = Vec::new();
    for (i, s) in params.specs().iter().enumerate() {
        table.push((s.name.clone(), s.shape.clone(), params.to_vec(i).unwrap()));
    }
    let v3 = bistro_model::checkpoint::to_safetensors_bytes(&table, Default::default()).unwrap();
    let e = state::params_from_checkpoint(&v3, &micro(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}
