//! DNS of enrolled pods. The kernel hooks send a pod's queries (UDP and
//! TCP port 53) to the agent, which forwards them and records each answer
//! under the pod ([`DnsRecords`]): the egress path names destinations and
//! checks SNIs with what the pod itself resolved.
mod proxy;
mod records;
mod resolver;

pub use proxy::{DnsClient, DnsProxy, nameservers};
pub use records::DnsRecords;
pub use resolver::Resolver;
