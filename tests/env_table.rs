//! README's "Environment variables" table is what the binary reads: every
//! `[env: ...]` that `--help` of each subcommand prints is a row naming
//! that subcommand and flag, and every row naming a subcommand is in that
//! subcommand's `--help`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const SUBCOMMANDS: [&str; 6] = ["serve", "send", "listen", "token", "jwks", "outbox init"];

/// variable -> {(subcommand, flag)}
type Table = BTreeMap<String, BTreeSet<(String, String)>>;

fn from_help() -> Table {
    let mut table = Table::new();
    for sub in SUBCOMMANDS {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.args(sub.split(' ')).arg("--help");
        for (k, _) in std::env::vars() {
            if k.starts_with("HERALD_") {
                cmd.env_remove(k);
            }
        }
        // Set but empty: counts as unset, and --help does not show it as `X=`.
        cmd.env("HERALD_NODE_ID", "").env("HERALD_TLS_CA", "");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "herald {sub} --help failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut flag = None;
        for line in text.lines() {
            let t = line.trim_start();
            // `-u, --user <USER>`: the long name after a short one.
            let t = match t.as_bytes() {
                [b'-', c, b',', b' ', ..] if *c != b'-' => &t[4..],
                _ => t,
            };
            if let Some(rest) = t.strip_prefix("--") {
                flag = Some(rest.split([' ', '=', '<']).next().unwrap().to_string());
            }
            let mut rest = line;
            while let Some(at) = rest.find("[env: ") {
                rest = &rest[at + 6..];
                let var: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let flag = flag
                    .clone()
                    .unwrap_or_else(|| panic!("{var} before any flag in herald {sub} --help"));
                table
                    .entry(var)
                    .or_default()
                    .insert((sub.to_string(), flag));
            }
        }
    }
    table
}

fn from_readme() -> Table {
    let readme = include_str!("../README.md");
    let start = readme
        .find("### Environment variables")
        .expect("README has an Environment variables section");
    let mut table = Table::new();
    for line in readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with("| variable"))
        .skip(2)
    {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let var = cells[1].trim_matches('`').to_string();
        let flag = cells[3]
            .split('`')
            .nth(1)
            .and_then(|f| f.strip_prefix("--"))
            .unwrap_or_else(|| panic!("row {var}: the setting column names no --flag"))
            .to_string();
        let subs: BTreeSet<(String, String)> = SUBCOMMANDS
            .iter()
            .filter(|s| cells[2].contains(&format!("`{s}`")))
            .map(|s| (s.to_string(), flag.clone()))
            .collect();
        assert!(
            table.insert(var.clone(), subs).is_none(),
            "{var} is listed twice"
        );
    }
    table
}

#[test]
fn the_readme_environment_table_matches_every_subcommands_help() {
    let help = from_help();
    let readme = from_readme();
    assert!(
        help.len() > 40,
        "too few variables parsed from --help: {help:?}"
    );
    for (var, uses) in &help {
        assert_eq!(
            readme.get(var),
            Some(uses),
            "{var}: --help says {uses:?}; README's table says {:?}",
            readme.get(var)
        );
    }
    for var in readme.keys() {
        assert!(
            help.contains_key(var),
            "README lists {var}, which no subcommand reads"
        );
    }
}
