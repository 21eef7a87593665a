//! The public optimizer state is shared state: the same step on every node, in the state
//! hash, in checkpoints and in the local state, so a joiner or a restarted node resumes it
//! exactly; a torn local state is not loaded; a hostile checkpoint's moments are refused.
//! The local state names itself by its lineage identity, which a restart replays.

use bistro_model::{ModelConfig, Params};
use bistro_train::accepted::state_hash;
use bistro_train::lineage;
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
    let link = lineage::Link { parent: "a".repeat(64), window: 11, update: "b".repeat(64), full: Some(hash.clone()) };
    let bytes = state::checkpoint_bytes(&params, &adam, 12, Some(&link)).unwrap();
    let (p2, a2) = state::params_from_checkpoint(&bytes, &micro(), &Device::Cpu).unwrap();
    assert_eq!(a2, adam);
    assert_eq!(state_hash(&p2, &a2).unwrap(), hash);
    // It names its state by its anchored link.
    assert_eq!(state::checkpoint_link(&bytes), Some(link.clone()));
    // The local state directory, named by the identity, its full hash checked on load.
    let dir = tempfile::tempdir().unwrap();
    let info = StateInfo {
        window: 12,
        hparams_hash: "hp".into(),
        model_hash: micro().hash().unwrap(),
        state: Some(link.id()),
        base_full: Some(hash.clone()),
        ..Default::default()
    };
    state::save(dir.path(), &params, &adam, &info).unwrap();
    let (i3, p3, a3) = state::load(dir.path(), &micro(), "hp", &Device::Cpu).unwrap().unwrap();
    assert_eq!((i3.window, &a3, i3.state.as_deref()), (12, &adam, Some(link.id().as_str())));
    assert_eq!(state_hash(&p3, &a3).unwrap(), hash);
    // Saved values that no longer hash to the saved full hash are not loaded.
    let wrong = tempfile::tempdir().unwrap();
    state::save(wrong.path(), &params, &adam, &StateInfo { base_full: Some("c".repeat(64)), ..info.clone() }).unwrap();
    assert!(state::load(wrong.path(), &micro(), "hp", &Device::Cpu).unwrap().is_none());
    // Killed after the weights were written, before state.json: the identity of the newer
    // weights is read from the weights file itself.
    let lag = tempfile::tempdir().unwrap();
    state::save(lag.path(), &params, &adam, &StateInfo { window: 13, state: Some("d".repeat(64)), ..info.clone() })
        .unwrap();
    std::fs::write(lag.path().join("state.json"), serde_json::to_vec(&info).unwrap()).unwrap();
    let (i5, _, _) = state::load(lag.path(), &micro(), "hp", &Device::Cpu).unwrap().unwrap();
    assert_eq!((i5.window, i5.state), (13, Some("d".repeat(64))));
    // A process killed after writing the optimizer state of window 13 but before the
    // parameters: the pair of window 12 is still there and resumes.
    let other = tempfile::tempdir().unwrap();
    let newer = StateInfo { window: 13, base_full: None, ..info.clone() };
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
    let bytes = state::checkpoint_bytes(&params, &adam, 4, None).unwrap();
    let e = state::params_from_checkpoint(&bytes, &micro(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("negative"), "{e}");
    adam.v[1][0] = 0.0;
    adam.m[2][0] = f32::NAN;
    let bytes = state::checkpoint_bytes(&params, &adam, 4, None).unwrap();
    assert!(state::params_from_checkpoint(&bytes, &micro(), &Device::Cpu).is_err());
    // Without its optimizer state, a checkpoint is refused too (a v3 checkpoint).
    let plain = bistro_train::state::checkpoint_bytes(&params, &PublicAdam::zeros(params.specs()), 4, None).unwrap();
    assert!(state::params_from_checkpoint(&plain, &micro(), &Device::Cpu).is_ok());
    let mut table = Vec::new();
    for (i, s) in params.specs().iter().enumerate() {
        table.push((s.name.clone(), s.shape.clone(), params.to_vec(i).unwrap()));
    }
    let v3 = bistro_model::checkpoint::to_safetensors_bytes(&table, Default::default()).unwrap();
    let e = state::params_from_checkpoint(&v3, &micro(), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}

/// One window's update: the public step of `w` at its coordinates.
fn update(params: &Params, w: u64) -> state::JournalEntry {
    let h = bistro_train::HParams::default();
    let indices = SliceIndices::select(params.specs(), &(100 + w).to_le_bytes(), 4);
    let values =
        indices.all().iter().map(|ids| ids.iter().map(|&i| ((i as f32) * 0.7).cos() * 1e-2).collect()).collect();
    state::JournalEntry { window: w, indices, values, step: AdamStep::of(&h, w), included: true, full: None }
}

/// Between full saves a node writes only each window's update; a restart replays them onto
/// the last full save and gets the same state, bit for bit, and the same identity. A missing
/// or damaged entry, or a replay that does not give the recorded identity (or an anchor's
/// full hash), makes the node rejoin from the network instead; a process killed between an
/// entry and `state.json` resumes a window earlier.
#[test]
fn a_journal_of_updates_replays_to_the_same_state() {
    let (params, mut adam) = trained();
    let dir = tempfile::tempdir().unwrap();
    let s12 = state_hash(&params, &adam).unwrap();
    let base = StateInfo {
        window: 12,
        hparams_hash: "hp".into(),
        model_hash: micro().hash().unwrap(),
        state: Some(s12.clone()),
        base_full: Some(s12.clone()),
        ..Default::default()
    };
    state::save(dir.path(), &params, &adam, &base).unwrap();
    // Window 12 applies an update, 13 none, 14 one (an anchor, with its full hash).
    let e12 = update(&params, 12);
    adam.apply(&params, &e12.indices, &e12.values, &e12.step).unwrap();
    let s13 = lineage::produce(&s12, 12, true, &e12.values, None).id;
    let at = |window: u64, journal: Vec<u64>, state: &str| StateInfo {
        window,
        base: Some(12),
        journal,
        state: Some(state.to_string()),
        base_state: Some(s12.clone()),
        ..base.clone()
    };
    state::append_journal(dir.path(), &e12, &at(13, vec![12], &s13)).unwrap();
    state::write_info(dir.path(), &at(14, vec![12], &s13)).unwrap();
    let mut e14 = update(&params, 14);
    adam.apply(&params, &e14.indices, &e14.values, &e14.step).unwrap();
    let full15 = state_hash(&params, &adam).unwrap();
    e14.full = Some(full15.clone());
    let s15 = lineage::produce(&s13, 14, true, &e14.values, Some(full15.clone())).id;
    state::append_journal(dir.path(), &e14, &at(15, vec![12, 14], &s15)).unwrap();
    let load = || state::load(dir.path(), &micro(), "hp", &Device::Cpu).unwrap();
    let (info, p, a) = load().expect("the journaled state loads");
    assert_eq!((info.window, info.state.as_deref()), (15, Some(s15.as_str())));
    assert_eq!(a, adam);
    assert_eq!(state_hash(&p, &a).unwrap(), full15);
    // Each window wrote only its update: at 1/4 of the coordinates, an index and a value
    // each (8 bytes) against 16 bytes per parameter for a full save.
    let size = |name: String| std::fs::metadata(dir.path().join(name)).unwrap().len();
    let full = size("model.safetensors".into()) + size(state::optimizer_file(12));
    let entry = size(state::journal_file(14));
    assert!(entry * 6 < full, "a journal entry of {entry} bytes against a full save of {full}");
    // Killed between the entry of window 15 and its state.json: resumes at 15.
    let e15 = update(&params, 15);
    let mut a16 = adam.clone();
    a16.apply(&params.deep_clone().unwrap(), &e15.indices, &e15.values, &e15.step).unwrap();
    std::fs::write(dir.path().join("state.json.keep"), std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
    state::append_journal(dir.path(), &e15, &at(16, vec![12, 14, 15], "00")).unwrap();
    std::fs::rename(dir.path().join("state.json.keep"), dir.path().join("state.json")).unwrap();
    assert_eq!(load().unwrap().0.window, 15);
    // A replay that does not give the recorded identity, a damaged entry, a missing one,
    // an anchor entry whose full hash the replay does not reach: rejoin.
    state::write_info(dir.path(), &at(15, vec![12, 14], &"ab".repeat(32))).unwrap();
    assert!(load().is_none());
    state::write_info(dir.path(), &at(15, vec![12, 14], &s15)).unwrap();
    let path = dir.path().join(state::journal_file(14));
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    assert!(load().is_none());
    std::fs::remove_file(&path).unwrap();
    assert!(load().is_none());
    let lying = state::JournalEntry { full: Some("e".repeat(64)), ..e14.clone() };
    let s15_lying = lineage::produce(&s13, 14, true, &e14.values, lying.full.clone()).id;
    state::append_journal(dir.path(), &lying, &at(15, vec![12, 14], &s15_lying)).unwrap();
    assert!(load().is_none());
    // A full save clears the journal.
    std::fs::write(&path, &good).unwrap();
    let at15 = StateInfo { window: 15, state: Some(s15.clone()), base_full: Some(full15.clone()), ..base.clone() };
    state::save(dir.path(), &params, &adam, &at15).unwrap();
    assert!(!dir.path().join(state::journal_file(12)).exists() && !path.exists());
    let (info, _, a) = load().unwrap();
    assert_eq!((info.window, info.base, a), (15, Some(15), adam));
}

/// Small states are saved in full every 8 windows; a large one journals until the journal
/// has written as much as a full save, at most 64 windows.
#[test]
fn large_states_journal_longer() {
    let coords = |preset: &str, c: usize| -> (usize, usize) {
        let cfg = ModelConfig::preset(preset).unwrap();
        let specs = bistro_model::param_specs(&cfg);
        let n = specs.iter().map(|s| bistro_train::slices::slice_len(s.shape.iter().product(), c)).sum();
        (cfg.num_params(), n)
    };
    let (p, n) = coords("small", 24);
    assert_eq!(state::full_save_period(p, n), state::JOURNAL_WINDOWS);
    let (p, n) = coords("125m", 24);
    assert_eq!(state::full_save_period(p, n), 48, "2.15 GB of state, 45 MB a window");
    let (p, n) = coords("1b", 32);
    assert_eq!(state::full_save_period(p, n), state::MAX_JOURNAL_WINDOWS);
}
