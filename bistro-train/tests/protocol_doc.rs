//! `docs/PROTOCOL.md` stays the truth: its table of hyper-parameter defaults equals
//! `HParams::default()`, field for field, and names every field.

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
