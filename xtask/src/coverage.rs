//! Which tests really ran in a full run, and where.
//!
//! A test that cannot run on some kernel prints `skipped: why` and passes (docs/STYLE.md: skip
//! with a printed reason, and make sure CI still runs it where it can). `cargo xtask ci`
//! runs the same tests on the host and, per hook set, on Debian's 6.1 and 6.12: it reads
//! every part's libtest output (`--show-output` prints each passing test's captured
//! output) and fails when a test skipped everywhere it was tried, so a missing tool or an
//! unexpected kernel can never turn a test into a silent pass.

use std::collections::BTreeMap;

/// What one test did in one place.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    /// `binary::test`, e.g. `sensor::io_uring_listen_is_reported`.
    pub test: String,
    /// `Some(why)` when it passed without doing its work (`skipped: ...`, or `ignored`).
    pub skipped: Option<String>,
}

/// Outcomes in libtest's output as `cargo test -- --show-output` prints it. `Running
/// ... (target/.../deps/NAME-HASH)` and `Doc-tests NAME` lines name the binary that
/// follows; before any, the binary is `bin` (the guest runs one binary at a time).
/// Failed tests are not listed: they fail the part they ran in.
pub fn parse(text: &str, bin: &str) -> Vec<Outcome> {
    // libtest ends a binary's run with `successes:`, each passing test's captured output
    // under `---- NAME stdout ----`, then `successes:` again and the names, indented.
    // The names are what counts as passed: a `test NAME ... ok` line can be split by a
    // child process writing to the inherited stderr while the test ran.
    #[derive(PartialEq)]
    enum Section {
        Running,
        Outputs,
        Names,
        Failures,
    }
    let mut bin = bin.to_owned();
    let mut section = Section::Running;
    let mut passed: Vec<String> = Vec::new();
    let mut skipped: BTreeMap<String, String> = BTreeMap::new();
    // The test whose captured output is being printed.
    let mut current: Option<String> = None;
    for line in text.lines() {
        let l = line.trim_end();
        let trimmed = l.trim_start();
        if let Some(path) = trimmed
            .strip_prefix("Running ")
            .and_then(|r| r.rsplit_once(" ("))
            .map(|(_, p)| p.trim_end_matches(')'))
        {
            bin = binary_name(path);
            section = Section::Running;
            continue;
        }
        if let Some(name) = trimmed.strip_prefix("Doc-tests ") {
            bin = format!("doc-{}", name.trim());
            section = Section::Running;
            continue;
        }
        match l {
            "successes:" => {
                section = if section == Section::Outputs {
                    Section::Names
                } else {
                    Section::Outputs
                };
                current = None;
                continue;
            }
            "failures:" => {
                section = Section::Failures;
                continue;
            }
            _ => {}
        }
        if section == Section::Names && !l.starts_with("    ") {
            section = Section::Running;
        }
        // Only while tests run: a test's captured output may hold any line.
        if let Some(rest) = l
            .strip_prefix("test ")
            .filter(|_| section == Section::Running)
        {
            if let Some((name, verdict)) = rest.split_once(" ... ") {
                let key = format!("{bin}::{name}");
                if verdict == "ok" {
                    passed.push(key);
                } else if verdict.starts_with("ignored") {
                    skipped.insert(key, "ignored".into());
                }
            }
            continue;
        }
        match section {
            Section::Outputs => {
                if let Some(name) = l
                    .strip_prefix("---- ")
                    .and_then(|r| r.strip_suffix(" stdout ----"))
                {
                    current = Some(format!("{bin}::{name}"));
                } else if let (Some(test), Some(at)) = (&current, l.find("skipped: ")) {
                    skipped
                        .entry(test.clone())
                        .or_insert_with(|| l[at..].to_owned());
                }
            }
            Section::Names => match l.strip_prefix("    ") {
                Some(name) if !name.trim().is_empty() => {
                    passed.push(format!("{bin}::{}", name.trim()));
                }
                _ => {}
            },
            Section::Running | Section::Failures => {}
        }
    }
    passed.sort();
    passed.dedup();
    let mut out: Vec<Outcome> = passed
        .into_iter()
        .map(|test| {
            let skipped = skipped.remove(&test);
            Outcome { test, skipped }
        })
        .collect();
    // What is left did not pass: ignored tests (a skip), and skip lines of tests that
    // then failed (their failure fails the part).
    out.extend(
        skipped
            .into_iter()
            .filter(|(_, why)| why == "ignored")
            .map(|(test, why)| Outcome {
                test,
                skipped: Some(why),
            }),
    );
    out
}

/// `sensor` from `target/release/deps/sensor-0123456789abcdef`.
fn binary_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('-') {
        Some((name, hash)) if !hash.is_empty() && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => file.to_owned(),
    }
}

/// Every test's outcomes across the parts of one run.
#[derive(Default)]
pub struct Coverage {
    /// Test -> (places it ran in, `place: why` it skipped in).
    tests: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

impl Coverage {
    /// Records `place`'s outcomes (`host`, `6.1 direct`, ...).
    pub fn add(&mut self, place: &str, outcomes: &[Outcome]) {
        for o in outcomes {
            let (ran, skipped) = self.tests.entry(o.test.clone()).or_default();
            match &o.skipped {
                None => ran.push(place.to_owned()),
                Some(why) => skipped.push(format!("{place}: {why}")),
            }
        }
    }

    /// How many distinct tests ran somewhere.
    pub fn ran(&self) -> usize {
        self.tests.values().filter(|(r, _)| !r.is_empty()).count()
    }

    /// Tests that skipped wherever they were tried, each with where and why.
    pub fn ran_nowhere(&self) -> Vec<String> {
        self.tests
            .iter()
            .filter(|(_, (ran, _))| ran.is_empty())
            .map(|(t, (_, why))| format!("{t} ({})", why.join("; ")))
            .collect()
    }

    /// Tests that skipped somewhere and ran elsewhere, with where each ran.
    pub fn ran_elsewhere(&self) -> Vec<String> {
        self.tests
            .iter()
            .filter(|(_, (ran, skipped))| !ran.is_empty() && !skipped.is_empty())
            .map(|(t, (ran, skipped))| {
                format!(
                    "{t}: skipped on {}; ran on {}",
                    places(skipped),
                    ran.join(", ")
                )
            })
            .collect()
    }
}

/// `host, 6.1 stable` from `["host: skipped: ...", "6.1 stable: skipped: ..."]`.
fn places(skips: &[String]) -> String {
    skips
        .iter()
        .map(|s| s.split_once(": ").map_or(s.as_str(), |(p, _)| p))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
   Compiling tests v0.1.0
     Running unittests src/main.rs (target/release/deps/portwatch-0123456789abcdef)

running 2 tests
test btf::tests::offsets ... ok
test procfs::tests::cgroup ... ok

successes:

---- btf::tests::offsets stdout ----
skipped: /sys/kernel/btf/vmlinux is not readable on this machine

successes:
    btf::tests::offsets
    procfs::tests::cgroup

test result: ok. 2 passed; 0 failed; 0 ignored
     Running tests/hooks.rs (target/release/deps/hooks-fedcba9876543210)

running 3 tests
test both_hook_sets_report_identical_events ... ok
test direct_where_unavailable_is_a_one_line_error ... portwatch: warning: noise
ok
test slow_one ... ignored

successes:

---- both_hook_sets_report_identical_events stdout ----
skipped: this kernel cannot run the direct hook set, so there is nothing to compare

successes:
    both_hook_sets_report_identical_events
    direct_where_unavailable_is_a_one_line_error

test result: ok. 2 passed; 0 failed; 1 ignored
   Doc-tests portwatch_common

running 0 tests
";

    #[test]
    fn host_output_names_binaries_passes_and_skips() {
        let o = parse(HOST, "?");
        let skipped = |t: &str| o.iter().find(|o| o.test == t).map(|o| o.skipped.clone());
        assert_eq!(
            skipped("portwatch::btf::tests::offsets"),
            Some(Some(
                "skipped: /sys/kernel/btf/vmlinux is not readable on this machine".into()
            ))
        );
        assert_eq!(skipped("portwatch::procfs::tests::cgroup"), Some(None));
        assert!(
            skipped("hooks::both_hook_sets_report_identical_events").is_some_and(
                |s| s.is_some_and(|s| s.starts_with("skipped: this kernel cannot run"))
            )
        );
        // Its verdict came on the next line, after a child's output: the successes list
        // still names it.
        assert_eq!(
            skipped("hooks::direct_where_unavailable_is_a_one_line_error"),
            Some(None)
        );
        assert_eq!(skipped("hooks::slow_one"), Some(Some("ignored".into())));
        assert_eq!(o.len(), 5, "{o:?}");
    }

    #[test]
    fn a_skip_must_be_made_up_for_elsewhere() {
        let mut c = Coverage::default();
        c.add("host", &parse(HOST, "?"));
        let guest = "\
test both_hook_sets_report_identical_events ... ok
test direct_where_unavailable_is_a_one_line_error ... ok

successes:

---- direct_where_unavailable_is_a_one_line_error stdout ----
skipped: this kernel runs the direct set (\"fentry\"), so there is no error to check

successes:
    both_hook_sets_report_identical_events
    direct_where_unavailable_is_a_one_line_error

test result: ok. 2 passed; 0 failed
";
        c.add("6.12 direct", &parse(guest, "hooks"));
        let nowhere = c.ran_nowhere();
        assert_eq!(nowhere.len(), 2, "{nowhere:?}");
        assert!(nowhere[0].starts_with("hooks::slow_one (host: ignored)"));
        assert!(nowhere[1].starts_with("portwatch::btf::tests::offsets (host: skipped: "));
        let elsewhere = c.ran_elsewhere();
        assert_eq!(
            elsewhere,
            vec![
                "hooks::both_hook_sets_report_identical_events: skipped on host; ran on 6.12 direct",
                "hooks::direct_where_unavailable_is_a_one_line_error: skipped on 6.12 direct; \
                 ran on host",
            ]
        );
        assert_eq!(c.ran(), 3);
    }
}
