#![no_main]
//! See `portwatch_fuzz::remediation` for what this target asserts.

libfuzzer_sys::fuzz_target!(|data: &[u8]| portwatch_fuzz::remediation(data));
