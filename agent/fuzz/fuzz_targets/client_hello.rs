//! `cargo +nightly fuzz run client_hello` (from agent/): a connection's
//! first bytes through the TLS ClientHello SNI parser (egress peeks at
//! every meshed pod's TLS this way). Seeds: corpus/client_hello, real
//! ClientHellos from rustls and other protocols' first bytes, also run by
//! `cargo xtask test` (agent/tests/fuzz_seeds.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nodemesh_agent::proxy::sni::fuzz_client_hello(data);
});
