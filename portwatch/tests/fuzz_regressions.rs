//! Replays every committed fuzz input (`fuzz/corpus/<target>/`, the seeds, and
//! `fuzz/regressions/<target>/`, inputs that once crashed a target) through the same
//! checks the libFuzzer targets run, so plain `cargo test` keeps them fixed on machines
//! without libFuzzer. `cargo xtask fuzz` runs the targets themselves.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod checks;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("listing fuzz inputs").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn committed_fuzz_inputs_pass_their_checks() {
    let mut replayed = 0;
    let mut failed = Vec::new();
    for (target, check) in checks::TARGETS {
        let wrapper = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/fuzz_targets")
            .join(format!("{target}.rs"));
        assert!(wrapper.is_file(), "{} is missing", wrapper.display());
        let seeds = inputs("corpus", target);
        assert!(
            !seeds.is_empty(),
            "fuzz/corpus/{target}/ has no seed inputs"
        );
        for path in seeds.iter().chain(&inputs("regressions", target)) {
            let data = std::fs::read(path).expect("reading a fuzz input");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    assert!(failed.is_empty(), "fuzz inputs that fail: {failed:#?}");
    eprintln!("replayed {replayed} fuzz inputs");
}
