//! Host names as compared everywhere (DNS answers, SNIs, ServiceEntry
//! hosts): lower case, without the root's trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}
