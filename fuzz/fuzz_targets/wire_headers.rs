#![no_main]
// See nbdfault_fuzz::wire for the input format and the invariants.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdfault_fuzz::wire::headers(data));
