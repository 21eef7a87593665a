//! The documents stay the truth: `docs/PROTOCOL.md`'s table of hyper-parameter defaults
//! equals `HParams::default()`, field for field, and names every field; the README's list of
//! library dependencies equals the manifests.

use bistro_train::hparams::HParams;

#[test]
fn protocol_doc_defaults_match_the_code() {
    let doc = include_str!("../../docs/PROTOCOL.md");
    let table: std::collections::BTreeMap<String, String> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.trim_matches('`').to_string();
            let value = cells.get(2)?.trim_matches('`').to_string();
            Some((name, value))
        })
        .collect();
    let defaults: toml::Table = toml::from_str(&toml::to_string(&HParams::default()).unwrap()).unwrap();
    for (name, value) in &defaults {
        let documented = table.get(name).unwrap_or_else(|| panic!("docs/PROTOCOL.md does not list `{name}`"));
        let code = match value {
            toml::Value::String(s) => format!("\"{s}\""),
            toml::Value::Table(t) => t.get("rule").and_then(|r| r.as_str()).unwrap_or_default().to_string(),
            other => other.to_string(),
        };
        let same = match (documented.parse::<f64>(), code.parse::<f64>()) {
            (Ok(a), Ok(b)) => a == b,
            _ => *documented == code,
        };
        assert!(same, "docs/PROTOCOL.md says `{name}` = {documented}, the code says {code}");
    }
}

#[test]
fn readme_crate_dependencies_match_the_manifests() {
    let readme = include_str!("../../README.md");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dirs = [
        ("bistro-model", "bistro-model"),
        ("bistro-train", "bistro-train"),
        ("bistro-validate", "bistro-validate"),
        ("bistro-chain", "bistro-chain"),
        ("bistro-kernels", "kernels"),
    ];
    for (name, dir) in dirs {
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap()).unwrap();
        let mut deps: Vec<String> =
            manifest["dependencies"].as_table().unwrap().keys().filter(|k| k.starts_with("bistro-")).cloned().collect();
        deps.sort();
        let line = readme
            .lines()
            .find(|l| l.starts_with(&format!("- `{name}` depends on ")))
            .unwrap_or_else(|| panic!("README lists no dependencies of {name}"));
        let listed: Vec<String> = if line.ends_with("nothing of the workspace") {
            Vec::new()
        } else {
            line.split("depends on ").nth(1).unwrap().split(", ").map(|d| d.trim_matches('`').to_string()).collect()
        };
        assert_eq!(listed, deps, "README's dependencies of {name}");
    }
}

#[test]
fn protocol_doc_states_the_fixed_constants() {
    use bistro_train::network::attestation;
    use bistro_train::protocol::{self, tags};
    let doc = include_str!("../../docs/PROTOCOL.md");
    for tag in [
        tags::STATE,
        tags::LINK,
        tags::UPDATE,
        tags::PAGES,
        tags::SLICE_INDICES,
        tags::HPARAMS,
        tags::MODEL_CONFIG,
        tags::GENESIS,
        tags::ATTESTATION,
        tags::VERDICTS,
        tags::ASSIGNMENT,
    ] {
        let tag = std::str::from_utf8(tag).unwrap();
        assert!(doc.contains(&format!("\"{tag}")), "docs/PROTOCOL.md does not name the tag {tag:?}");
    }
    assert!(doc.contains(&format!("version {}", protocol::PROTOCOL_VERSION)), "protocol version");
    // Key formats: the document's pattern with its placeholders filled in is the code's key.
    let pattern = |prefix: &str| -> String {
        let at = doc.find(&format!("`{prefix}-{{")).unwrap_or_else(|| panic!("no `{prefix}-{{..}}` key in the doc"));
        doc[at + 1..].split('`').next().unwrap().to_string()
    };
    let fill = |p: String| p.replace("{window}", "7").replace("{w}", "7").replace("{c}", "7").replace("{hotkey}", "hk");
    assert_eq!(fill(pattern("slice")), protocol::slice_key(7, "hk"));
    assert_eq!(fill(pattern("aggregate")), protocol::aggregate_key(7));
    assert_eq!(fill(pattern("checkpoint")), protocol::checkpoint_key(7));
    assert_eq!(fill(pattern("attestation")), attestation::attestation_key(7));
    assert_eq!(fill(pattern("verdicts")), bistro_train::verdicts::verdicts_key(7));
    // Limits and the reward rule, as the document writes them.
    let stated = [
        format!("{} bytes per tensor", protocol::HEADER_BYTES_PER_TENSOR),
        format!("{} KiB of metadata", protocol::SLICE_METADATA_BYTES / 1024),
        format!("{} MiB of metadata", protocol::AGGREGATE_METADATA_BYTES >> 20),
        format!("(e / tol)^{}", protocol::HONESTY_EXPONENT),
        format!("{} s", protocol::PEER_TIMEOUT.as_secs()),
        format!("RECORD_WEIGHT = {}", protocol::RECORD_WEIGHT),
        format!("for {} windows, `attestation::DISPUTED_LEAD_SKIP`", attestation::DISPUTED_LEAD_SKIP),
        format!("{} windows, `attestation::STALLED_SKIP`", attestation::STALLED_SKIP),
        format!("one of the {} before it, `RECENT_WINDOWS`", attestation::RECENT_WINDOWS),
        format!("at most {}, `protocol::REPAIR_SOURCES`", protocol::REPAIR_SOURCES),
        format!("{} s, `protocol::REPAIR_BUDGET`", protocol::REPAIR_BUDGET.as_secs()),
        format!(
            "at most {} KiB and {} statements",
            attestation::MAX_ATTESTATION_BYTES / 1024,
            attestation::MAX_STATEMENTS
        ),
    ];
    for s in stated {
        assert!(doc.contains(&s), "docs/PROTOCOL.md does not state `{s}`");
    }
}
