//! `cargo +nightly fuzz run workloads_file` (from agent/): a workloads file
//! through parsing, the store's incremental updates and resolution. Seeds:
//! corpus/workloads_file, also run by `cargo xtask test`
//! (agent/tests/fuzz_seeds.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nodemesh_agent::state::file::fuzz_workloads_file(data);
});
