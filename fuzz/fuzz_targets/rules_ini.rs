#![no_main]
// See nbdfault_fuzz::rules for the input format and the invariants.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdfault_fuzz::rules::ini(data));
