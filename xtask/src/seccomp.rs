//! The DaemonSet's seccomp profile, derived from the systemd unit's `SystemCallFilter=`:
//! one allow list for both ways of running the agent. systemd's groups (`@system-service`
//! ...) are expanded by `systemd-analyze syscall-filter`, nested groups included, into
//! the OCI profile format the kubelet loads (`seccompProfile.type: Localhost`).
//!
//! `cargo xtask package` regenerates it and fails when the committed
//! `packaging/k8s/seccomp-portwatch.json` differs; `--write-seccomp` rewrites it.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// The profile for `unit` (the unit file's text).
pub fn profile(unit: &str) -> anyhow::Result<Value> {
    let filter = unit
        .lines()
        .find_map(|l| l.strip_prefix("SystemCallFilter="))
        .context("portwatch.service has no SystemCallFilter= line")?;
    let out = Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .context("running systemd-analyze syscall-filter (package systemd)")?;
    if !out.status.success() {
        bail!(
            "systemd-analyze syscall-filter failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let groups = parse_groups(&String::from_utf8_lossy(&out.stdout));
    let names = expand(filter.split_whitespace(), &groups)?;
    Ok(json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        // EPERM, as the unit's SystemCallErrorNumber=: a call outside the list fails
        // rather than killing the sensor.
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [{ "names": names, "action": "SCMP_ACT_ALLOW" }],
    }))
}

/// `systemd-analyze syscall-filter` output: `@group` headers, then indented members
/// (`@nested` or a call name; `#` lines are comments).
fn parse_groups(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('@') {
            current = Some(format!("@{}", name.trim()));
            groups.entry(format!("@{}", name.trim())).or_default();
        } else if line.starts_with(char::is_whitespace) {
            let item = line.trim();
            if item.is_empty() || item.starts_with('#') {
                continue;
            }
            if let Some(g) = &current {
                groups
                    .get_mut(g)
                    .expect("header seen")
                    .push(item.to_owned());
            }
        } else {
            current = None;
        }
    }
    groups
}

/// Every call name `items` (calls and `@groups`) stands for, sorted.
fn expand<'a>(
    items: impl IntoIterator<Item = &'a str>,
    groups: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let mut names = BTreeSet::new();
    let mut todo: Vec<String> = items.into_iter().map(str::to_owned).collect();
    let mut seen = BTreeSet::new();
    while let Some(item) = todo.pop() {
        if item.starts_with('@') {
            if !seen.insert(item.clone()) {
                continue;
            }
            let members = groups
                .get(&item)
                .with_context(|| format!("systemd-analyze does not know the group {item}"))?;
            todo.extend(members.iter().cloned());
        } else {
            names.insert(item);
        }
    }
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_groups_expand_once_and_sorted() {
        let text = "@a\n    # comment\n    @b\n    read\n\n@b\n    write\n    @a\n    close\n";
        let groups = parse_groups(text);
        assert_eq!(groups["@a"], ["@b", "read"]);
        assert_eq!(
            expand(["@a", "bpf"], &groups).unwrap(),
            ["bpf", "close", "read", "write"]
        );
        assert!(expand(["@nope"], &groups).is_err());
    }
}
