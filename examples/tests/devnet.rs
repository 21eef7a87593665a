//! The devnet end to end (small model, few windows): honest miners earn the weight,
//! cheaters earn nothing, poison never moves the model, held-out loss falls, every node
//! holds the same parameters, and the shared model is the centralised reference.

use bistro_examples::devnet::{DevnetOptions, Strategy, run_in_process};
use bistro_model::ModelConfig;

fn options(dir: &std::path::Path) -> DevnetOptions {
    let model = ModelConfig::new(8192, 32, 64, 1, 2, 2, 64, 1e-5);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("model.toml");
    std::fs::write(&path, toml::to_string(&model).unwrap()).unwrap();
    let mut o = DevnetOptions::new(&dir.join("run"));
    o.model = path.display().to_string();
    o.hparams.seq_len = 64;
    o.hparams.pages_per_window = 2;
    o.hparams.rows_per_page = 2;
    o.hparams.warmup_windows = 1;
    o.hparams.learning_rate = 2.0;
    o.compression = 2;
    o.heldout_pages = 4;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_network_learns_and_matches_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 3;
    o.validators = 2;
    o.windows = 6;
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    assert!(r.all_nodes_identical, "nodes diverged");
    for w in &r.windows {
        assert!(
            w.max_abs_diff_vs_reference <= 1e-6,
            "window {}: shared model differs from the reference by {}",
            w.window,
            w.max_abs_diff_vs_reference
        );
        assert_eq!(w.accepted.len(), 3, "window {}: {:?}", w.window, w.rejected);
    }
    let first = r.windows[0].heldout_loss;
    assert!(r.final_heldout_loss < first - 0.05, "held-out loss did not fall: {first} -> {}", r.final_heldout_loss);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheaters_earn_nothing_and_poison_never_lands() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(tmp.path());
    o.miners = 2;
    o.validators = 1;
    o.windows = 4;
    o.adversaries = Strategy::CHEATS.to_vec();
    let r = run_in_process(&o).await.unwrap();
    eprintln!("{}", r.summary());
    assert!(r.all_nodes_identical, "nodes diverged");
    let honest: f64 = r.shares.iter().filter(|(h, _)| r.strategies[*h] == Strategy::Honest).map(|(_, s)| s).sum();
    assert!(honest > 0.95, "honest miners hold only {honest:.4} of the weight");
    for (h, s) in &r.shares {
        if r.strategies[h] != Strategy::Honest {
            assert!(*s < 0.01, "{h} holds {s:.4} of the weight");
        }
    }
    for w in &r.windows {
        let poison = w.rejected.iter().find(|(h, _)| h.ends_with("poison"));
        assert!(
            matches!(poison, Some((_, reason)) if reason == "outlier"),
            "window {}: poison not rejected: {:?}",
            w.window,
            w.rejected
        );
        assert!(!w.accepted.iter().any(|h| h.ends_with("poison")));
    }
    // Poison never moves the model beyond an honest update: every step stays small.
    let svg = r.svg();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}
