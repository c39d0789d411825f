#![no_main]
// See nbdfault_fuzz::session for the input format and the invariants.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdfault_fuzz::session::to_client(data));
