#![no_main]
// The check lives in src/ids.rs, so tests/fuzz.rs replays the corpus through it on stable.
libfuzzer_sys::fuzz_target!(|data: &[u8]| spoold_fuzz::ids::check(data));
