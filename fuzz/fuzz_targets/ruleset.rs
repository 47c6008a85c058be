#![no_main]
//! See `portwatch_fuzz::ruleset` for what this target asserts.

libfuzzer_sys::fuzz_target!(|data: &[u8]| portwatch_fuzz::ruleset(data));
