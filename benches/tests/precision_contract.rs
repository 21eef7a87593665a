//! The protocol's numeric contract on the CPU (`docs/PROTOCOL.md`, "Honest tolerance"): every
//! honest f32 way of computing a window's gradient (exact f64, another accumulation order,
//! the composed reference ops) lands far inside `honest_tolerance`, and a bf16-autocast
//! gradient lands outside it, which is why bf16 miners are not allowed.

#[test]
fn f32_ways_are_inside_the_tolerance_and_bf16_is_not() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_precision"))
        .args(["--model", "tiny", "--windows", "0"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "precision failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let e_of = |way: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.contains("\"what\":\"honest_e\"") && l.contains(&format!("\"way\":\"{way}\"")))
            .unwrap_or_else(|| panic!("no result for {way} in {stdout}"));
        let v = line.split("\"e\":").nth(1).and_then(|r| r.split(',').next()).expect("an e field");
        v.parse().unwrap_or_else(|_| panic!("bad e in {line}"))
    };
    let tol = bistro_train::HParams::default().honest_tolerance;
    for way in ["f64", "f32-order", "f32-composed"] {
        let e = e_of(way);
        assert!(e < tol / 100.0, "{way}: honest f32 e = {e} is not far inside the tolerance {tol}");
    }
    let bf16 = e_of("bf16");
    assert!(bf16 > tol, "bf16 e = {bf16} fits the tolerance {tol}: the contract (no bf16 miners) needs revisiting");
}
