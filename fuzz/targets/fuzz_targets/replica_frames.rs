#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| barnacle_fuzz::replica_frames(data));
