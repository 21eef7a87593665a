//! The GPU benchmark's harness runs (on the CPU, `tiny`) and prints a well-formed result, so
//! a GPU session does not spend its device time on a harness bug.

#[test]
fn gpu_bench_cpu_smoke_prints_a_train_step_result() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpu_bench")).arg("--cpu-smoke").output().expect("runs");
    assert!(out.status.success(), "gpu_bench --cpu-smoke failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with('{')).expect("a JSON line");
    for key in ["\"what\":\"train_step\"", "\"model\":\"tiny\"", "\"tokens_per_s\":", "\"mfu\":"] {
        assert!(line.contains(key), "{key} missing from {line}");
    }
}
