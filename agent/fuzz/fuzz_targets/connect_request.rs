//! `cargo +nightly fuzz run connect_request` (from agent/): the HBONE
//! server's CONNECT request checks. Seeds: corpus/connect_request, which
//! `cargo xtask test` also runs as a regular test (agent/tests/fuzz_seeds.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nodemesh_agent::proxy::inbound::fuzz_connect_request(data);
});
