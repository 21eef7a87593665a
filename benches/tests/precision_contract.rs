//! The protocol's numeric contract on the CPU (`docs/PROTOCOL.md`, "Honest tolerance"): every
//! honest f32 way of computing a window's gradient (exact f64, another accumulation order,
//! the composed reference ops) lands far inside the code tolerance (its codes check out
//! exactly against the validator's f32 gradient), and a bf16-autocast gradient lands
//! outside it, which is why bf16 miners are not allowed.

#[test]
fn f32_ways_are_inside_the_tolerance_and_bf16_is_not() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_precision"))
        .args(["--model", "tiny", "--windows", "0"])
        .output()
        .expect("runs");
    assert!(out.status.success(), "precision failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |way: &str, name: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.contains("\"what\":\"honest_e\"") && l.contains(&format!("\"way\":\"{way}\"")))
            .unwrap_or_else(|| panic!("no result for {way} in {stdout}"));
        let v = line
            .split(&format!("\"{name}\":"))
            .nth(1)
            .and_then(|r| r.split([',', '}']).next())
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        v.parse().unwrap_or_else(|_| panic!("bad {name} in {line}"))
    };
    let e_of = |way: &str| field(way, "e");
    let tol = bistro_train::HParams::default().honest_tolerance;
    for way in ["f64", "f32-order", "f32-composed"] {
        let e = e_of(way);
        assert!(e < tol / 100.0, "{way}: honest f32 e = {e} is not far inside the tolerance {tol}");
    }
    let bf16 = e_of("bf16");
    assert!(bf16 > tol, "bf16 e = {bf16} fits the tolerance {tol}: the contract (no bf16 miners) needs revisiting");
    // Protocol v4: the code check. Honest f32 ways drift far less than the bin tolerance and
    // their codes check out exactly; bf16's do not.
    let bins_tol = bistro_train::HParams::default().code_tolerance_bins;
    for way in ["f64", "f32-order", "f32-composed"] {
        let (bins, codes_e) = (field(way, "bins"), field(way, "codes_e"));
        assert!(bins < bins_tol / 10.0, "{way}: honest drift {bins} bins is not far inside {bins_tol}");
        assert_eq!(codes_e, 0.0, "{way}: honest codes do not check out exactly");
    }
    let bf16_codes = field("bf16", "codes_e");
    assert!(bf16_codes > tol, "bf16 codes_e = {bf16_codes} fits the tolerance {tol}");
}
