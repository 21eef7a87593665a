//! The CUDA kernel against the CPU kernel on random data of many sizes. Runs only in a
//! `cuda` build on a machine with a GPU; elsewhere it prints why it was skipped.
#![cfg(feature = "cuda")]

use bistro_kernels::cpu::diff_norms;
use bistro_kernels::cuda::CudaDiffNorm;

fn data(n: usize, m: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = bistro_kernels::rng::XorShift::new(seed);
    let mut next = move || rng.uniform() as f32 - 0.5;
    let theta: Vec<f32> = (0..n).map(|_| next() * 0.1).collect();
    let gv: Vec<f32> = (0..n).map(|_| next() * 0.01).collect();
    let slices = (0..m)
        .map(|k| theta.iter().zip(&gv).map(|(&t, &g)| t - 0.5 * (g + next() * 0.01 * (k + 1) as f32)).collect())
        .collect();
    (theta, gv, slices)
}

#[test]
fn nvrtc_compiles_the_kernel() {
    match bistro_kernels::cuda::ptx() {
        Ok(ptx) => {
            assert!(ptx.contains(".entry bistro_diff_norms"), "{ptx}");
            // The project's one PTX baseline, shared with the fused ops.
            let target = format!(".target {}", bistro_kernels::ptx::PTX_ARCH.replace("compute_", "sm_"));
            assert!(ptx.contains(&target), "PTX must target {target}");
        }
        // The library itself is missing (a cuda build run without the toolkit's libraries).
        Err(e) if e.to_string().contains("load") => eprintln!("SKIPPED: NVRTC is not available ({e})"),
        Err(e) => panic!("the CUDA source does not compile: {e}"),
    }
}

#[test]
fn cuda_kernel_matches_cpu() {
    let gpu = match CudaDiffNorm::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: no usable CUDA device ({e})");
            return;
        }
    };
    for (n, m) in [(1, 1), (255, 2), (16 * 1024, 3), (16 * 1024 + 1, 1), (100_003, 8), (4_016_240, 4)] {
        let (t, g, s) = data(n, m, n as u64);
        let refs: Vec<&[f32]> = s.iter().map(Vec::as_slice).collect();
        let a = diff_norms(&t, &g, 0.5, &refs).unwrap();
        let b = gpu.diff_norms(&t, &g, 0.5, &refs).unwrap();
        assert!((a.gv_sq - b.gv_sq).abs() <= 1e-5 * a.gv_sq, "n={n}: {} vs {}", a.gv_sq, b.gv_sq);
        for (x, y) in a.sq_dist.iter().zip(&b.sq_dist) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-30), "n={n}: {x} vs {y}");
        }
        // Deterministic: the same inputs give the same bits.
        assert_eq!(b, gpu.diff_norms(&t, &g, 0.5, &refs).unwrap());
    }
}
