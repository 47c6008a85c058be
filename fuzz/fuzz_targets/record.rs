#![no_main]
//! See `portwatch_fuzz::record` for what this target asserts.

libfuzzer_sys::fuzz_target!(|data: &[u8]| portwatch_fuzz::record(data));
