//! Slices: index selection properties, exact encoding of the codes, aggregation invariants,
//! and one crafted bad file for every rejection reason.

use bistro_model::{ModelConfig, Params, param_specs};
use bistro_train::hparams::Aggregation;
use bistro_train::slices::quant::{Codec, Quantised};
use bistro_train::slices::{
    self, Contribution, Rejection, SliceExpectation, SliceIndices, SliceMeta, aggregate, decode, encode, slice_len,
};
use candle_core::Device;
use proptest::prelude::*;

fn micro() -> ModelConfig {
    ModelConfig::new(50, 16, 24, 2, 4, 2, 16, 1e-5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn indices_are_distinct_in_range_and_deterministic(
        vocab in 3usize..200, hidden_heads in 1usize..4, layers in 1usize..3,
        compression in 1usize..40, seed in any::<[u8; 32]>(), other in any::<[u8; 32]>(),
    ) {
        let cfg = ModelConfig::new(vocab, 8 * hidden_heads, 12, layers, hidden_heads, 1, 8, 1e-5);
        let specs = param_specs(&cfg);
        let a = SliceIndices::select(&specs, &seed, compression);
        prop_assert_eq!(&a, &SliceIndices::select(&specs, &seed, compression));
        for (s, idx) in specs.iter().zip(a.all()) {
            prop_assert_eq!(idx.len(), slice_len(s.numel(), compression));
            prop_assert_eq!(idx.len(), (s.numel() / compression).max(1));
            prop_assert!(idx.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
            prop_assert!(idx.iter().all(|&i| (i as usize) < s.numel()));
        }
        if seed != other && compression > 2 {
            prop_assert_ne!(a, SliceIndices::select(&specs, &other, compression));
        }
    }
}

#[test]
fn index_selection_is_pinned_and_uniform() {
    let spec =
        vec![bistro_model::ParamSpec { name: "w".into(), shape: vec![1000], kind: bistro_model::ParamKind::Linear }];
    let a = SliceIndices::select(&spec, &[7u8; 32], 100);
    // Regression pin: a change here changes every node's slices (a protocol change).
    assert_eq!(a.param(0), &[21, 84, 276, 535, 681, 730, 737, 827, 844, 978]);
    // Every coordinate is chosen with probability k/n: count over many seeds.
    let mut hits = vec![0u32; 1000];
    for s in 0..2000u32 {
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&s.to_le_bytes());
        for &i in SliceIndices::select(&spec, &seed, 10).param(0) {
            hits[i as usize] += 1;
        }
    }
    // Expected 200 per coordinate (2000 draws of 100 of 1000); allow a wide band.
    let (min, max) = (hits.iter().min().unwrap(), hits.iter().max().unwrap());
    assert!(*min > 130 && *max < 270, "min {min} max {max}");
}

fn setup() -> (Params, SliceIndices, SliceExpectation) {
    let cfg = micro();
    let params = Params::genesis(&cfg, 3, &Device::Cpu).unwrap();
    let idx = SliceIndices::select(params.specs(), &[1u8; 32], 4);
    let meta = SliceMeta::new(5, "alice", "parent-a", 4, "hph", &cfg.hash().unwrap());
    let exp = slices::expectation(&params, &idx, meta, 1 << 20, Codec::TWO_BIT);
    (params, idx, exp)
}

/// A smooth stand-in for a gradient at the slice indices.
fn honest_grads(idx: &SliceIndices, salt: f32) -> Vec<Vec<f32>> {
    idx.all().iter().map(|ids| (0..ids.len()).map(|j| ((j as f32 + salt) * 0.37).sin() * 1e-2).collect()).collect()
}

fn honest_codes(idx: &SliceIndices, salt: f32) -> Vec<Quantised> {
    let dithers = slices::dithers(&[1u8; 32], "alice", idx);
    slices::encode_gradient(&Codec::TWO_BIT, &honest_grads(idx, salt), &dithers)
}

#[test]
fn encode_decode_is_exact_and_checks_out_against_the_gradient() {
    let (_, idx, exp) = setup();
    let codes = honest_codes(&idx, 0.0);
    let bytes = encode(&exp.meta, &exp.names, &Codec::TWO_BIT, &codes).unwrap();
    let back = decode(&bytes, &exp).unwrap();
    assert_eq!(back.codes, codes);
    assert_eq!(back.values, codes.iter().map(|q| Codec::TWO_BIT.decode(q)).collect::<Vec<_>>());
    // The validator's check against the same gradient and the miner's public dithers: no
    // inconsistent code, e = 0; against another gradient: inconsistent.
    let dithers = slices::dithers(&[1u8; 32], "alice", &idx);
    let tol = Codec::TWO_BIT.tolerance(1e-3);
    let mut honest = slices::quant::Consistency::default();
    let mut other = slices::quant::Consistency::default();
    for (((g, h), q), u) in honest_grads(&idx, 0.0).iter().zip(&honest_grads(&idx, 5.0)).zip(&back.codes).zip(&dithers)
    {
        honest.merge(&Codec::TWO_BIT.check(g, q, u, tol));
        other.merge(&Codec::TWO_BIT.check(h, q, u, tol));
    }
    assert_eq!((honest.inconsistent, honest.relative_error()), (0, 0.0), "{honest:?}");
    assert!(other.relative_error() > 0.1, "{other:?}");
    // The wire bytes are what the codec says: 2 bits a value and a scale per 64.
    let wire: usize = idx.all().iter().map(|i| Codec::TWO_BIT.encoded_len(i.len())).sum();
    assert!(bytes.len() > wire && bytes.len() < wire + 4096, "{} bytes for {wire} of codes", bytes.len());
}

#[test]
fn aggregate_of_identical_honest_slices_is_the_single_update() {
    let (_, idx, _) = setup();
    let v = honest_grads(&idx, 1.0);
    for n in [1usize, 2, 3, 4, 8] {
        let contribs: Vec<Contribution> =
            (0..n).map(|i| Contribution { hotkey: format!("m{i}"), values: v.clone() }).collect();
        for rule in [Aggregation::Mean, Aggregation::Median, Aggregation::TrimmedMean { trim: 0.25 }] {
            let out = aggregate(&idx.lengths(), &contribs, &rule);
            assert_eq!(out.values, v, "n = {n}, rule {rule:?}");
        }
    }
    let none = aggregate(&idx.lengths(), &[], &Aggregation::Mean);
    assert!(none.values.iter().flatten().all(|&x| x == 0.0) && none.used.is_empty());
}

#[test]
fn arrival_order_does_not_change_the_result() {
    let (_, idx, _) = setup();
    let mut contribs: Vec<Contribution> =
        (0..6).map(|i| Contribution { hotkey: format!("m{i}"), values: honest_grads(&idx, i as f32) }).collect();
    for rule in [Aggregation::Mean, Aggregation::Median, Aggregation::TrimmedMean { trim: 0.2 }] {
        let a = aggregate(&idx.lengths(), &contribs, &rule);
        contribs.reverse();
        let b = aggregate(&idx.lengths(), &contribs, &rule);
        contribs.swap(0, 3);
        let c = aggregate(&idx.lengths(), &contribs, &rule);
        let bits = |x: &Vec<Vec<f32>>| x.iter().flatten().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.values), bits(&b.values));
        assert_eq!(bits(&a.values), bits(&c.values));
        assert_eq!(a.used, b.used);
    }
}

#[test]
fn every_rejection_reason_from_a_crafted_file() {
    let (_, idx, exp) = setup();
    let c = Codec::TWO_BIT;
    let good = honest_codes(&idx, 2.0);
    let good_bytes = encode(&exp.meta, &exp.names, &c, &good).unwrap();
    assert!(decode(&good_bytes, &exp).is_ok());
    let code = |bytes: &[u8]| decode(bytes, &exp).unwrap_err().code();
    let wires: Vec<Vec<u8>> = good.iter().map(|q| c.to_bytes(q)).collect();

    // Truncated safetensors.
    assert_eq!(code(&good_bytes[..good_bytes.len() - 7]), "malformed");
    assert_eq!(code(&good_bytes[..5]), "malformed");
    assert_eq!(code(b""), "malformed");
    // Huge header length.
    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend_from_slice(&good_bytes[8..]);
    assert_eq!(code(&huge), "malformed");
    // Header that is not JSON.
    let mut garbage = 8u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"notjson!");
    assert_eq!(code(&garbage), "malformed");
    // Too large.
    let small = SliceExpectation { max_bytes: 100, ..exp.clone() };
    assert!(matches!(decode(&good_bytes, &small), Err(Rejection::TooLarge { .. })));
    // Another hotkey's metadata (a copied slice).
    let other = SliceMeta { hotkey: "bob".into(), ..exp.meta.clone() };
    let e = decode(&encode(&other, &exp.names, &c, &good).unwrap(), &exp).unwrap_err();
    assert!(matches!(&e, Rejection::Metadata { field, .. } if field == "hotkey"), "{e}");
    // A stale window.
    let stale = SliceMeta { window: 4, ..exp.meta.clone() };
    assert!(
        matches!(decode(&encode(&stale, &exp.names, &c, &good).unwrap(), &exp).unwrap_err(), Rejection::Metadata { field, .. } if field == "window")
    );
    // Built on another state (red team 3, F5): its own code, never a penalty.
    let other_state = SliceMeta { parent: "another-state".into(), ..exp.meta.clone() };
    let e = decode(&encode(&other_state, &exp.names, &c, &good).unwrap(), &exp).unwrap_err();
    assert!(matches!(&e, Rejection::StaleState { found, .. } if found == "another-state"), "{e}");
    assert_eq!(e.code(), "stale-state");
    // Wrong hparams hash.
    let hp = SliceMeta { hparams_hash: "x".into(), ..exp.meta.clone() };
    assert_eq!(code(&encode(&hp, &exp.names, &c, &good).unwrap()), "metadata");
    // NaN, infinite and negative scales.
    for bad in [f32::NAN, f32::INFINITY, -1.0] {
        let mut q = good.clone();
        q[3].scales[0] = bad;
        let e = decode(&encode(&exp.meta, &exp.names, &c, &q).unwrap(), &exp).unwrap_err();
        assert!(matches!(&e, Rejection::NonFinite { index: 0, .. }), "{e}");
    }
    // Wrong length.
    let mut short = wires.clone();
    short[2].pop();
    let e = decode(&slices::format::encode_raw(&exp.meta, &exp.names, &short).unwrap(), &exp).unwrap_err();
    assert!(matches!(&e, Rejection::WrongShape { name, .. } if name == &exp.names[2]), "{e}");
    // Missing and unexpected keys.
    let (mut names, mut vals) = (exp.names.clone(), wires.clone());
    names.remove(1);
    vals.remove(1);
    assert_eq!(code(&slices::format::encode_raw(&exp.meta, &names, &vals).unwrap()), "missing-key");
    let (mut names, mut vals) = (exp.names.clone(), wires.clone());
    names.push("model.evil".into());
    vals.push(vec![1]);
    assert_eq!(code(&slices::format::encode_raw(&exp.meta, &names, &vals).unwrap()), "unexpected-key");
    // Wrong dtype (signed bytes) and a 2-D tensor.
    let meta_map: std::collections::HashMap<String, String> =
        safetensors::SafeTensors::read_metadata(&good_bytes).unwrap().1.metadata().clone().unwrap();
    let mut tv = Vec::new();
    for (i, (n, b)) in exp.names.iter().zip(&wires).enumerate() {
        let dtype = if i == 0 { safetensors::Dtype::I8 } else { safetensors::Dtype::U8 };
        tv.push((n.clone(), safetensors::tensor::TensorView::new(dtype, vec![b.len()], b).unwrap()));
    }
    let bytes = safetensors::serialize(tv, Some(meta_map.clone())).unwrap();
    assert_eq!(code(&bytes), "dtype");
    let mut tv = Vec::new();
    for (i, (n, b)) in exp.names.iter().zip(&wires).enumerate() {
        let shape = if i == 1 && b.len().is_multiple_of(2) { vec![2, b.len() / 2] } else { vec![b.len()] };
        tv.push((n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::U8, shape, b).unwrap()));
    }
    assert_eq!(code(&safetensors::serialize(tv, Some(meta_map)).unwrap()), "shape");
}

#[test]
fn header_bomb() {
    // A 100 MB header of 1.68 M empty tensors: rejected from its length field alone, before
    // a byte of it is parsed or allocated for.
    let (_, _, exp) = setup();
    let entry = r#""t0000000":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"#;
    let n = 100_000_000 / entry.len();
    let mut header = String::with_capacity(n * entry.len() + 2);
    header.push('{');
    for i in 0..n {
        header.push_str(&entry.replace("t0000000", &format!("t{i:07}")));
    }
    header.pop();
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let big = SliceExpectation { max_bytes: u64::MAX, ..exp.clone() };
    let e = decode(&bytes, &big).unwrap_err();
    assert_eq!(e.code(), "malformed");
    assert!(e.to_string().contains("exceeds the bound"), "{e}");
    // The size cap of a real expectation already refuses the object by its size.
    assert_eq!(decode(&bytes, &exp).unwrap_err().code(), "too-large");
    assert!(exp.max_bytes < 4 * 1024 * 1024, "size cap {} does not follow the expected object", exp.max_bytes);
    // Within the bound but full of empty tensors: parsed once, then refused by its keys.
    let small: String = (0..50).map(|i| entry.replace("t0000000", &format!("t{i:07}"))).collect();
    let header = format!("{{{}}}", small.trim_end_matches(','));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    assert_eq!(decode(&bytes, &exp).unwrap_err().code(), "metadata");
}
