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
