//! `cargo +nightly fuzz run cni_input` (from agent/): bytes as the CNI
//! plugin's stdin config (with a previous result), CNI_ARGS and the request
//! the agent parses. Seeds: corpus/cni_input, also run by `cargo xtask test`
//! (agent/tests/fuzz_seeds.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nodemesh_cni::plugin::fuzz_input(data);
});
