//! The agent's own resolution of registry hosts (ServiceEntry `resolution:
//! DNS`): A and AAAA asked of the same upstreams pods' queries go to, from
//! the agent's network, answers cached for their TTL.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RecordType},
};
use tokio::{net::UdpSocket, time::Instant};

/// Answers are kept at least this long (a TTL of 0 would mean a lookup per
/// connection) and at most this long (a name that moves is followed).
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(300);

pub struct Resolver {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    cache: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

impl Resolver {
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            upstreams,
            timeout,
            cache: Mutex::default(),
        }
    }

    /// The addresses of `host` (IPv4 first), from the cache while valid.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let host = crate::hostname::normalize(host);
        let now = Instant::now();
        if let Some((ips, until)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&host)
            && *until > now
        {
            return Ok(ips.clone());
        }
        let name = Name::from_ascii(format!("{host}.")).map_err(|e| format!("not a name: {e}"))?;
        let (v4, v6) = tokio::join!(
            self.ask(&name, RecordType::A),
            self.ask(&name, RecordType::AAAA)
        );
        let mut ips = Vec::new();
        let mut ttl = MAX_TTL;
        let mut errors = Vec::new();
        for answer in [v4, v6] {
            match answer {
                Ok((found, t)) => {
                    if !found.is_empty() {
                        ttl = ttl.min(t);
                    }
                    ips.extend(found);
                }
                Err(e) => errors.push(e),
            }
        }
        if ips.is_empty() {
            return Err(match errors.is_empty() {
                true => "no A or AAAA record".into(),
                false => errors.join("; "),
            });
        }
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host, (ips.clone(), now + ttl.max(MIN_TTL)));
        Ok(ips)
    }

    /// One question, to each upstream in turn until one answers.
    async fn ask(&self, name: &Name, rtype: RecordType) -> Result<(Vec<IpAddr>, Duration), String> {
        if self.upstreams.is_empty() {
            return Err("no DNS upstream (dns.upstreams, /etc/resolv.conf)".into());
        }
        let id: u16 = rand_id();
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name.clone(), rtype));
        let query = m.to_vec().map_err(|e| e.to_string())?;
        let mut last = String::new();
        for upstream in &self.upstreams {
            match tokio::time::timeout(self.timeout, exchange(*upstream, &query, id)).await {
                Ok(Ok(answer)) => return parse(&answer, name, rtype),
                Ok(Err(e)) => last = format!("{upstream}: {e}"),
                Err(_) => {
                    last = format!("{upstream}: no answer in {} ms", self.timeout.as_millis())
                }
            }
        }
        Err(last)
    }
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // A query id an off-path attacker cannot guess (RFC 5452).
    let _ = crate::tls::provider().secure_random.fill(&mut b);
    u16::from_ne_bytes(b)
}

async fn exchange(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Only the answer to this query (its id) counts.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return Ok(buf[..n].to_vec());
        }
    }
}

/// The addresses an answer gives `name` (through CNAMEs, as pods' answers
/// are recorded) and their lowest TTL.
fn parse(answer: &[u8], name: &Name, rtype: RecordType) -> Result<(Vec<IpAddr>, Duration), String> {
    let m = Message::from_vec(answer).map_err(|e| format!("unreadable answer: {e}"))?;
    match m.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Err("no such name (NXDOMAIN)".into()),
        other => return Err(format!("answered {other}")),
    }
    Ok(super::proxy::addresses_of(&m, name, rtype)
        .map(|(ips, ttl)| (ips, Duration::from_secs(u64::from(ttl))))
        .unwrap_or((Vec::new(), MAX_TTL)))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::rr::{RData, Record, rdata::A};

    use super::*;

    /// A one-name DNS server on loopback; counts the questions it gets.
    async fn server(ttl: u32) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, from) = s.recv_from(&mut buf).await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut m = Message::response(q.metadata.id, OpCode::Query);
                m.add_query(q.queries[0].clone());
                let qname = q.queries[0].name().clone();
                if q.queries[0].name().to_ascii() == "missing.example.com." {
                    m.metadata.response_code = ResponseCode::NXDomain;
                } else if q.queries[0].query_type() == RecordType::A {
                    for last in [201, 202] {
                        m.add_answer(Record::from_rdata(
                            qname.clone(),
                            ttl,
                            RData::A(A(Ipv4Addr::new(10, 240, 0, last))),
                        ));
                    }
                }
                s.send_to(&m.to_vec().unwrap(), from).await.unwrap();
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn resolves_and_caches_for_the_ttl() {
        let (addr, asked) = server(60).await;
        let r = Resolver::new(vec![addr], Duration::from_secs(2));
        let ips = r.resolve("PIM.example.com").await.unwrap();
        assert_eq!(
            ips,
            vec![
                IpAddr::from([10, 240, 0, 201]),
                IpAddr::from([10, 240, 0, 202])
            ]
        );
        let before = asked.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(r.resolve("pim.example.com.").await.unwrap(), ips);
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "cached"
        );
        let e = r.resolve("missing.example.com").await.unwrap_err();
        assert!(e.contains("NXDOMAIN"), "{e}");
    }

    #[tokio::test]
    async fn an_upstream_that_never_answers_is_an_error_in_time() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = Resolver::new(
            vec![silent.local_addr().unwrap()],
            Duration::from_millis(100),
        );
        let t = tokio::time::Instant::now();
        let e = r.resolve("pim.example.com").await.unwrap_err();
        assert!(e.contains("no answer in 100 ms"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
