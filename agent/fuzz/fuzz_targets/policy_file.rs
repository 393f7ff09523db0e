//! `cargo +nightly fuzz run policy_file` (from agent/): policy YAML through
//! parsing, checks, the index and a decision. Seeds: corpus/policy_file,
//! also run by `cargo xtask test` (agent/tests/fuzz_seeds.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nodemesh_agent::policy::fuzz_policy_file(data);
});
