#![no_main]
//! See `portwatch_fuzz::relp` for what this target asserts.

libfuzzer_sys::fuzz_target!(|data: &[u8]| portwatch_fuzz::relp(data));
