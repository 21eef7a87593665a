//! The CPU gradient-difference norm for 1..64 miners of the `1b` slice size (4,016,240
//! values at compression 300), in GB/s over the bytes it must read
//! (`(2 + miners) * n * 4`), next to this machine's copy bandwidth measured in the same run
//! (a plain 1 GiB copy: bytes read + written).

use bistro_kernels::cpu::diff_norms;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const N: usize = 4_016_240;

fn kernels(c: &mut Criterion) {
    let mut g = c.benchmark_group("memcpy");
    g.sample_size(10);
    let src = vec![1u8; 1 << 30];
    let mut dst = vec![0u8; 1 << 30];
    g.throughput(Throughput::Bytes(2 << 30));
    g.bench_function("copy_1GiB", |b| b.iter(|| dst.copy_from_slice(std::hint::black_box(&src))));
    g.finish();
    drop((src, dst));

    let theta: Vec<f32> = (0..N).map(|i| (i as f32 * 1e-3).sin() * 0.02).collect();
    let gv: Vec<f32> = (0..N).map(|i| (i as f32 * 7e-3).cos() * 1e-3).collect();
    let slices: Vec<Vec<f32>> =
        (0..64).map(|k| theta.iter().zip(&gv).map(|(t, g)| t - 0.5 * g + k as f32 * 1e-7).collect()).collect();
    let mut g = c.benchmark_group("grad_diff_norm_cpu_1b");
    g.sample_size(10);
    for m in [1usize, 8, 64] {
        let refs: Vec<&[f32]> = slices[..m].iter().map(Vec::as_slice).collect();
        g.throughput(Throughput::Bytes(((2 + m) * N * 4) as u64));
        g.bench_function(format!("{m}_miners"), |b| b.iter(|| diff_norms(&theta, &gv, 0.5, &refs).expect("norms")));
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
