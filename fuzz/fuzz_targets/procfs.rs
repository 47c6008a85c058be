#![no_main]
//! See `portwatch_fuzz::procfs` for what this target asserts.

libfuzzer_sys::fuzz_target!(|data: &[u8]| portwatch_fuzz::procfs(data));
