//! The agent's DNS proxy for enrolled pods.
//!
//! The kernel sends a pod's UDP queries to port 53 to the agent's listener
//! in the pod (127.0.0.1 / ::1, [`DNS_PORT`]); TCP queries arrive on the
//! outbound listener like any redirected connection and are handed here.
//! Each query is forwarded to the upstreams, in order, from a socket inside
//! the pod's netns that carries the agent's mark (so the hooks let it pass
//! and the pod's own network view applies), and the answer goes back to the
//! app unchanged. Its A/AAAA answers are recorded under the pod
//! ([`DnsRecords`]) for their TTL.
//!
//! What the app sees when something fails: an upstream that refuses or
//! does not answer within `dns.timeoutMs` is skipped; when none answers,
//! SERVFAIL, never silence. A query that does not parse gets FORMERR (when
//! it has a header to answer) and is not forwarded. Answers that do not
//! parse or are truncated are passed on as they are, and not recorded.
//!
//! [`DNS_PORT`]: nodemesh_common::DNS_PORT
use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData, RecordType},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use super::DnsRecords;
use crate::{config::DnsSettings, datapath::PodNetwork};

/// The largest DNS message (UDP with EDNS, or TCP's 2-byte length).
const MAX_MESSAGE: usize = 65535;
/// Queries of one listener in flight at once; past it, SERVFAIL at once (a
/// pod resolving without end cannot take the agent's descriptors).
const MAX_IN_FLIGHT: usize = 64;
/// A TCP client that sends nothing for this long is closed (RFC 7766
/// leaves it to the server; resolvers send their queries at once).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// glibc reads at most this many `nameserver` lines (MAXNS).
const MAX_NAMESERVERS: usize = 3;
/// CNAME hops followed from a queried name to its addresses.
const MAX_CNAME_HOPS: usize = 16;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Protocol {
    udp,
    tcp,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    /// An upstream's answer went back to the app.
    answered,
    /// No upstream answered (or too many queries were in flight): the
    /// agent answered SERVFAIL.
    servfail,
    /// The query did not parse: FORMERR, not forwarded.
    invalid,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    protocol: Protocol,
    result: Outcome,
}

/// `nodemesh_dns_*`, registered by the proxy itself.
struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    recorded: Counter,
}

impl DnsMetrics {
    fn new(registry: &mut Registry, records: &Arc<DnsRecords>) -> Self {
        let m = Self {
            queries: Family::default(),
            recorded: Counter::default(),
        };
        registry.register(
            "dns_queries",
            "DNS queries of enrolled pods the agent answered, by protocol and result (answered: an upstream's answer; servfail: no upstream answered; invalid: the query did not parse)",
            m.queries.clone(),
        );
        registry.register(
            "dns_answers_recorded",
            "DNS answers whose addresses were recorded for the pod that asked",
            m.recorded.clone(),
        );
        registry.register_collector(Box::new(RecordsCollector(Arc::downgrade(records))));
        m
    }

    fn query(&self, protocol: Protocol, result: Outcome) {
        self.queries
            .get_or_create(&QueryLabels { protocol, result })
            .inc();
    }
}

/// `nodemesh_dns_records`: read from the records at scrape time.
struct RecordsCollector(std::sync::Weak<DnsRecords>);

impl std::fmt::Debug for RecordsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordsCollector")
    }
}

impl prometheus_client::collector::Collector for RecordsCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric as _, metrics::gauge::ConstGauge};
        let Some(records) = self.0.upgrade() else {
            return Ok(());
        };
        let held = ConstGauge::new(records.len() as i64);
        let metric = encoder.encode_descriptor(
            "dns_records",
            "DNS records (name, address) held for enrolled pods, all pods together.",
            None,
            held.metric_type(),
        )?;
        held.encode(metric)
    }
}

/// The pod a query came from.
#[derive(Clone, Copy)]
pub struct DnsClient<'a> {
    /// Its key, for logs.
    pub pod: &'a str,
    pub workload_id: u32,
    pub network: &'a dyn PodNetwork,
}

/// Forwards enrolled pods' queries and records their answers.
pub struct DnsProxy {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    mark: u32,
    records: Arc<DnsRecords>,
    metrics: DnsMetrics,
}

impl DnsProxy {
    /// `settings.upstreams`, or when empty the nameservers of the agent's
    /// own `/etc/resolv.conf` (as ztunnel's DNS proxy does).
    pub fn new(
        settings: &DnsSettings,
        mark: u32,
        records: Arc<DnsRecords>,
        registry: &mut Registry,
    ) -> Self {
        let upstreams = if settings.upstreams.is_empty() {
            system_nameservers(Path::new("/etc/resolv.conf"))
        } else {
            settings.upstreams.clone()
        };
        Self::with_upstreams(upstreams, settings, mark, records, registry)
    }

    pub fn with_upstreams(
        upstreams: Vec<SocketAddr>,
        settings: &DnsSettings,
        mark: u32,
        records: Arc<DnsRecords>,
        registry: &mut Registry,
    ) -> Self {
        if settings.capture {
            if upstreams.is_empty() {
                warn!(
                    "dns.capture is on but there is no upstream (dns.upstreams empty, no nameserver in /etc/resolv.conf): enrolled pods' DNS gets SERVFAIL"
                );
            } else {
                info!(upstreams = ?upstreams, "DNS of enrolled pods forwarded");
            }
            for u in upstreams.iter().filter(|u| u.ip().is_loopback()) {
                warn!(upstream = %u, "a loopback DNS upstream is the pod's own loopback: queries are forwarded from inside each pod");
            }
        }
        let metrics = DnsMetrics::new(registry, &records);
        Self {
            upstreams,
            timeout: Duration::from_millis(settings.timeout_ms),
            mark,
            records,
            metrics,
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Serves a pod's UDP listener until the future is dropped. Each query
    /// is answered in its own task, so a slow upstream holds up no other.
    pub async fn serve_udp(
        self: &Arc<Self>,
        pod: &str,
        workload_id: u32,
        network: Arc<dyn PodNetwork>,
        socket: UdpSocket,
    ) {
        // Queries in flight answer through this loop, which alone holds the
        // socket: dropped with this future (unenrolment, drain), it closes
        // at once, as a socket left bound beside a new agent's would keep
        // receiving (SO_REUSEPORT) what nobody reads.
        let mut in_flight: JoinSet<Option<(Vec<u8>, SocketAddr)>> = JoinSet::new();
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let received = tokio::select! {
                r = socket.recv_from(&mut buf) => r,
                Some(done) = in_flight.join_next() => {
                    if let Ok(Some((answer, peer))) = done
                        && let Err(e) = socket.send_to(&answer, peer).await
                    {
                        debug!(pod, %peer, "DNS reply: {e}");
                    }
                    continue;
                }
            };
            let (n, peer) = match received {
                Ok(r) => r,
                Err(e) => {
                    // Not expected on a bound UDP socket; whatever it is,
                    // the next datagram may be fine, but never spin.
                    debug!(pod, "DNS listener: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let query = buf[..n].to_vec();
            if in_flight.len() >= MAX_IN_FLIGHT {
                self.metrics.query(Protocol::udp, Outcome::servfail);
                if let Some(answer) = servfail_for(&query) {
                    let _ = socket.send_to(&answer, peer).await;
                }
                continue;
            }
            let (this, network) = (self.clone(), network.clone());
            let pod = pod.to_owned();
            in_flight.spawn(async move {
                let client = DnsClient {
                    pod: &pod,
                    workload_id,
                    network: &*network,
                };
                let answer = this.answer(client, &query, Protocol::udp).await?;
                Some((answer, peer))
            });
        }
    }

    /// DNS over TCP (RFC 7766: a 2-byte length before each message,
    /// several queries per connection, answered in order) until the client
    /// closes or idles.
    pub async fn serve_tcp(&self, client: DnsClient<'_>, stream: &mut TcpStream) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
                Ok(Ok(len)) => usize::from(len),
                _ => return,
            };
            let query = &mut buf[..len];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(query)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(answer) = self.answer(client, query, Protocol::tcp).await else {
                return;
            };
            let mut framed = Vec::with_capacity(answer.len() + 2);
            framed.extend_from_slice(&(answer.len() as u16).to_be_bytes());
            framed.extend_from_slice(&answer);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// The answer to one query (None: nothing can be answered, as to a
    /// datagram without even a header).
    async fn answer(
        &self,
        client: DnsClient<'_>,
        query: &[u8],
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let parsed = match Message::from_vec(query) {
            Ok(m) if m.metadata.message_type == MessageType::Query && !m.queries.is_empty() => m,
            Ok(_) | Err(_) => {
                debug!(pod = client.pod, "DNS query that does not parse: FORMERR");
                self.metrics.query(protocol, Outcome::invalid);
                return formerr_for(query);
            }
        };
        for upstream in &self.upstreams {
            let exchange = self.exchange(client.network, *upstream, query, protocol);
            let answer = match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    debug!(pod = client.pod, %upstream, "DNS upstream: {e}");
                    continue;
                }
                Err(_) => {
                    debug!(pod = client.pod, %upstream, ms = self.timeout.as_millis(), "DNS upstream did not answer in time");
                    continue;
                }
            };
            self.metrics.query(protocol, Outcome::answered);
            self.record(client.workload_id, &parsed, &answer);
            return Some(answer);
        }
        self.metrics.query(protocol, Outcome::servfail);
        debug!(pod = client.pod, name = %parsed.queries[0].name(), "no DNS upstream answered: SERVFAIL");
        Some(servfail(&parsed))
    }

    /// One query to one upstream, from inside the pod, over the client's
    /// protocol (a truncated UDP answer makes the client ask over TCP).
    async fn exchange(
        &self,
        network: &dyn PodNetwork,
        upstream: SocketAddr,
        query: &[u8],
        protocol: Protocol,
    ) -> io::Result<Vec<u8>> {
        match protocol {
            Protocol::udp => {
                let socket = network.udp_socket(upstream, self.mark)?;
                // Connected: only the upstream's datagrams are read, and a
                // refusal (ICMP) fails the read at once.
                socket.connect(upstream).await?;
                socket.send(query).await?;
                let mut buf = vec![0u8; MAX_MESSAGE];
                loop {
                    let n = socket.recv(&mut buf).await?;
                    // A fresh socket per query: only a late answer to
                    // nothing else, or noise, has another ID.
                    if n >= 2 && buf[..2] == query[..2] {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                }
            }
            Protocol::tcp => {
                let socket = network.socket(upstream, self.mark, false)?;
                let mut stream = socket.connect(upstream).await?;
                let mut framed = Vec::with_capacity(query.len() + 2);
                framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
                framed.extend_from_slice(query);
                stream.write_all(&framed).await?;
                let len = usize::from(stream.read_u16().await?);
                let mut buf = vec![0u8; len];
                stream.read_exact(&mut buf).await?;
                Ok(buf)
            }
        }
    }

    /// Records the addresses the answer gives each A/AAAA question's name
    /// (through CNAMEs: under the name asked), with the smallest TTL on the
    /// way. Truncated, failed or unparseable answers record nothing.
    fn record(&self, workload_id: u32, query: &Message, answer: &[u8]) {
        let Ok(answer) = Message::from_vec(answer) else {
            return;
        };
        if answer.metadata.truncation || answer.metadata.response_code != ResponseCode::NoError {
            return;
        }
        let mut recorded = false;
        for q in &query.queries {
            if !matches!(q.query_type(), RecordType::A | RecordType::AAAA) {
                continue;
            }
            if let Some((ips, ttl)) = addresses_of(&answer, q.name(), q.query_type()) {
                self.records.record(
                    workload_id,
                    &q.name().to_ascii(),
                    &ips,
                    Duration::from_secs(u64::from(ttl)),
                );
                recorded = true;
            }
        }
        if recorded {
            self.metrics.recorded.inc();
        }
    }
}

/// The addresses of type `rtype` the answer section gives `name`, following
/// CNAMEs, and the smallest TTL of the records used.
pub(super) fn addresses_of(
    answer: &Message,
    name: &Name,
    rtype: RecordType,
) -> Option<(Vec<IpAddr>, u32)> {
    let mut name = name.clone();
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CNAME_HOPS {
        let mut ips = Vec::new();
        let mut ips_ttl = u32::MAX;
        let mut alias = None;
        for r in answer.answers.iter().filter(|r| r.name == name) {
            match &r.data {
                RData::A(a) if rtype == RecordType::A => {
                    ips.push(IpAddr::V4(a.0));
                    ips_ttl = ips_ttl.min(r.ttl);
                }
                RData::AAAA(a) if rtype == RecordType::AAAA => {
                    ips.push(IpAddr::V6(a.0));
                    ips_ttl = ips_ttl.min(r.ttl);
                }
                RData::CNAME(c) => alias = Some((c.0.clone(), r.ttl)),
                _ => {}
            }
        }
        if !ips.is_empty() {
            return Some((ips, ttl.min(ips_ttl)));
        }
        let (target, t) = alias?;
        ttl = ttl.min(t);
        name = target;
    }
    None
}

/// SERVFAIL for a parsed query: its ID, opcode, question and RD bit.
fn servfail(query: &Message) -> Vec<u8> {
    let mut m = Message::error_msg(
        query.metadata.id,
        query.metadata.op_code,
        ResponseCode::ServFail,
    );
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = query.queries.clone();
    m.to_vec()
        .unwrap_or_else(|_| header_only(query_header(&[]), 2))
}

/// SERVFAIL for raw query bytes (parsed if possible).
fn servfail_for(query: &[u8]) -> Option<Vec<u8>> {
    match Message::from_vec(query) {
        Ok(m) => Some(servfail(&m)),
        Err(_) => formerr_for(query),
    }
}

/// FORMERR for bytes that do not parse, if they at least hold an ID.
fn formerr_for(query: &[u8]) -> Option<Vec<u8>> {
    (query.len() >= 12).then(|| header_only(query_header(query), 1))
}

/// (ID, opcode, RD) of a query's raw header.
fn query_header(query: &[u8]) -> (u16, u8, bool) {
    match query {
        [a, b, flags, ..] => (
            u16::from_be_bytes([*a, *b]),
            (flags >> 3) & 0x0f,
            flags & 1 != 0,
        ),
        _ => (0, u8::from(OpCode::Query), false),
    }
}

/// A response of a header only: QR and RA set, no sections.
fn header_only((id, opcode, rd): (u16, u8, bool), rcode: u8) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&id.to_be_bytes());
    h[2] = 0x80 | (opcode << 3) | u8::from(rd);
    h[3] = 0x80 | (rcode & 0x0f);
    h
}

/// The `nameserver` addresses of a resolv.conf (port 53), at most three as
/// glibc reads; IPv6 zone suffixes (`%eth0`) are dropped.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next()?;
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let addr = words.next()?.split('%').next()?;
            let ip: IpAddr = addr.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .take(MAX_NAMESERVERS)
        .collect()
}

fn system_nameservers(path: &Path) -> Vec<SocketAddr> {
    match crate::files::read_text(path, crate::files::MAX_CONFIG_BYTES) {
        Ok(text) => nameservers(&text),
        Err(e) => {
            warn!("DNS upstreams: {e}");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::Query,
        rr::{
            Record,
            rdata::{A, AAAA, CNAME},
        },
    };
    use tokio::net::TcpListener;

    use super::*;
    use crate::datapath::loopback::LoopbackNetwork;

    fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn name(n: &str) -> Name {
        Name::from_ascii(n).unwrap()
    }

    /// What the test's upstream answers; None: it stays silent.
    fn upstream_answer(query: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(query).unwrap();
        let question = q.queries[0].clone();
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.add_query(question.clone());
        let aaaa = question.query_type() == RecordType::AAAA;
        let addr = |n: &str, ttl: u32, last: u8| {
            let data = match aaaa {
                true => RData::AAAA(AAAA(Ipv6Addr::new(
                    0xfd00,
                    0x240,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0x200 + u16::from(last),
                ))),
                false => RData::A(A(Ipv4Addr::new(10, 240, 0, last))),
            };
            Record::from_rdata(name(n), ttl, data)
        };
        match question.name().to_ascii().to_ascii_lowercase().as_str() {
            "pim.example.com." => {
                m.add_answer(addr("pim.example.com.", 60, 201));
                m.add_answer(addr("pim.example.com.", 60, 202));
            }
            "www.pim.example.com." => {
                let alias = CNAME(name("pim.example.com."));
                m.add_answer(Record::from_rdata(
                    name("www.pim.example.com."),
                    20,
                    RData::CNAME(alias),
                ));
                m.add_answer(addr("pim.example.com.", 60, 201));
            }
            "big.example.com." => {
                m.metadata.truncation = true;
                m.add_answer(addr("big.example.com.", 60, 210));
            }
            "mangled.example.com." => {
                return Some(vec![query[0], query[1], 0x81, 0x80, 0xde, 0xad]);
            }
            "slow.example.com." => return None,
            _ => m.metadata.response_code = ResponseCode::NXDomain,
        }
        Some(m.to_vec().unwrap())
    }

    async fn udp_upstream() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0; 4096];
            loop {
                let (n, peer) = s.recv_from(&mut buf).await.unwrap();
                if let Some(a) = upstream_answer(&buf[..n]) {
                    s.send_to(&a, peer).await.unwrap();
                }
            }
        });
        addr
    }

    async fn tcp_upstream() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    while let Ok(len) = s.read_u16().await {
                        let mut q = vec![0; usize::from(len)];
                        s.read_exact(&mut q).await.unwrap();
                        let a = upstream_answer(&q).unwrap();
                        s.write_all(&(a.len() as u16).to_be_bytes()).await.unwrap();
                        s.write_all(&a).await.unwrap();
                    }
                });
            }
        });
        addr
    }

    /// A UDP port nothing listens on: the kernel refuses datagrams to it.
    fn refused_port() -> SocketAddr {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    }

    struct Setup {
        proxy: Arc<DnsProxy>,
        records: Arc<DnsRecords>,
        registry: Registry,
        network: Arc<LoopbackNetwork>,
    }

    fn setup(pod_ip: Ipv4Addr, upstreams: Vec<SocketAddr>, timeout_ms: u64) -> Setup {
        let records = Arc::new(DnsRecords::default());
        let mut registry = Registry::default();
        let settings = DnsSettings {
            timeout_ms,
            ..Default::default()
        };
        let proxy =
            DnsProxy::with_upstreams(upstreams, &settings, 0, records.clone(), &mut registry);
        Setup {
            proxy: Arc::new(proxy),
            records,
            registry,
            network: Arc::new(LoopbackNetwork::new(pod_ip)),
        }
    }

    impl Setup {
        /// The pod's UDP listener, served as workload 7; its address.
        fn listen(&self) -> SocketAddr {
            let socket = self
                .network
                .udp_bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .unwrap();
            let addr = socket.local_addr().unwrap();
            let (proxy, network) = (self.proxy.clone(), self.network.clone());
            tokio::spawn(async move { proxy.serve_udp("shop/app", 7, network, socket).await });
            addr
        }

        fn metrics(&self) -> String {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
            text
        }
    }

    async fn ask(app: &UdpSocket, to: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
        ask_within(app, to, query, Duration::from_secs(3)).await
    }

    async fn ask_within(
        app: &UdpSocket,
        to: SocketAddr,
        query: &[u8],
        within: Duration,
    ) -> Option<Vec<u8>> {
        app.send_to(query, to).await.unwrap();
        let mut buf = vec![0; 4096];
        let (n, from) = tokio::time::timeout(within, app.recv_from(&mut buf))
            .await
            .ok()?
            .unwrap();
        assert_eq!(from, to);
        Some(buf[..n].to_vec())
    }

    #[tokio::test]
    async fn udp_answers_pass_unchanged_and_their_addresses_are_recorded_per_pod() {
        let s = setup(
            Ipv4Addr::new(127, 0, 53, 1),
            vec![udp_upstream().await],
            1000,
        );
        let listener = s.listen();
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let v4 = |last| IpAddr::from([10, 240, 0, last]);

        let q = query(0x1234, "PIM.example.com.", RecordType::A);
        assert_eq!(
            ask(&app, listener, &q).await.unwrap(),
            upstream_answer(&q).unwrap()
        );
        // Under the name asked, lowercase, for workload 7 only.
        assert!(s.records.resolved(7, "pim.example.com", v4(201)));
        assert!(s.records.resolved(7, "pim.example.com", v4(202)));
        assert!(!s.records.resolved(8, "pim.example.com", v4(201)));
        let q = query(2, "pim.example.com.", RecordType::AAAA);
        assert_eq!(
            ask(&app, listener, &q).await.unwrap(),
            upstream_answer(&q).unwrap()
        );
        let v6: IpAddr = "fd00:240::2c9".parse().unwrap();
        assert!(s.records.resolved(7, "pim.example.com", v6));

        // Through a CNAME: recorded under the name asked, with the
        // smaller TTL of the chain.
        let q = query(3, "www.pim.example.com.", RecordType::A);
        assert_eq!(
            ask(&app, listener, &q).await.unwrap(),
            upstream_answer(&q).unwrap()
        );
        assert_eq!(
            s.records.names_of(7, v4(201)),
            vec!["pim.example.com", "www.pim.example.com"]
        );
        let dump = s.records.dump();
        let www = dump["7"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "www.pim.example.com")
            .unwrap()
            .clone();
        let left = www["validForSeconds"].as_u64().unwrap();
        assert!((20 + 29..=20 + 30).contains(&left), "{www}");

        // Truncated, unparseable and NXDOMAIN answers: passed on, not
        // recorded.
        let held = s.records.len();
        for n in [
            "big.example.com.",
            "mangled.example.com.",
            "nowhere.example.com.",
        ] {
            let q = query(4, n, RecordType::A);
            assert_eq!(
                ask(&app, listener, &q).await.unwrap(),
                upstream_answer(&q).unwrap(),
                "{n}"
            );
        }
        assert_eq!(s.records.len(), held);

        let m = s.metrics();
        assert!(
            m.contains(r#"dns_queries_total{protocol="udp",result="answered"} 6"#),
            "{m}"
        );
        assert!(m.contains("dns_answers_recorded_total 3"), "{m}");
        assert!(m.contains("dns_records 5"), "{m}");
    }

    #[tokio::test]
    async fn no_upstream_answering_is_a_prompt_servfail_and_a_refusing_one_is_skipped() {
        let silent = udp_upstream().await;
        let s = setup(
            Ipv4Addr::new(127, 0, 53, 2),
            vec![refused_port(), silent],
            300,
        );
        let listener = s.listen();
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();

        // The refused upstream is skipped at once; the second answers.
        let started = tokio::time::Instant::now();
        let q = query(9, "pim.example.com.", RecordType::A);
        assert_eq!(
            ask(&app, listener, &q).await.unwrap(),
            upstream_answer(&q).unwrap()
        );
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );

        // Neither answers: SERVFAIL with the query's ID and question,
        // after the one timeout.
        let started = tokio::time::Instant::now();
        let q = query(10, "slow.example.com.", RecordType::A);
        let a = Message::from_vec(&ask(&app, listener, &q).await.unwrap()).unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(a.metadata.id, 10);
        assert_eq!(a.metadata.message_type, MessageType::Response);
        assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
        assert!(a.metadata.recursion_desired);
        assert_eq!(a.queries[0].name(), &name("slow.example.com."));

        // No upstream at all: SERVFAIL at once.
        let none = setup(Ipv4Addr::new(127, 0, 53, 3), vec![], 300);
        let listener = none.listen();
        let a = Message::from_vec(&ask(&app, listener, &q).await.unwrap()).unwrap();
        assert_eq!(a.metadata.response_code, ResponseCode::ServFail);

        let m = s.metrics();
        assert!(
            m.contains(r#"dns_queries_total{protocol="udp",result="servfail"} 1"#),
            "{m}"
        );
        assert!(
            m.contains(r#"dns_queries_total{protocol="udp",result="answered"} 1"#),
            "{m}"
        );
    }

    #[tokio::test]
    async fn malformed_queries_get_formerr_and_the_listener_carries_on() {
        let s = setup(
            Ipv4Addr::new(127, 0, 53, 4),
            vec![udp_upstream().await],
            1000,
        );
        let listener = s.listen();
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut garbage = vec![0xab, 0xcd, 0x01, 0x00];
        garbage.extend_from_slice(&[0xff; 20]);
        let a = ask(&app, listener, &garbage).await.unwrap();
        assert_eq!(&a[..2], &[0xab, 0xcd]);
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[3] & 0x0f, 1, "FORMERR");
        // An answer sent as a query: FORMERR too.
        let q = query(5, "pim.example.com.", RecordType::A);
        let as_query = upstream_answer(&q).unwrap();
        let a = ask(&app, listener, &as_query).await.unwrap();
        assert_eq!(a[3] & 0x0f, 1, "FORMERR");
        // Too short to answer at all: silence.
        let short = ask_within(&app, listener, &[1, 2, 3], Duration::from_millis(300));
        assert!(short.await.is_none());
        // Still serving.
        assert_eq!(
            ask(&app, listener, &q).await.unwrap(),
            upstream_answer(&q).unwrap()
        );
        let m = s.metrics();
        assert!(
            m.contains(r#"dns_queries_total{protocol="udp",result="invalid"} 3"#),
            "{m}"
        );
        assert!(
            s.records
                .resolved(7, "pim.example.com", IpAddr::from([10, 240, 0, 201]))
        );
    }

    #[tokio::test]
    async fn tcp_answers_several_queries_per_connection_in_order() {
        let pod = Ipv4Addr::new(127, 0, 53, 5);
        let s = setup(pod, vec![tcp_upstream().await], 1000);
        let listener = TcpListener::bind((pod, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (proxy, network) = (s.proxy.clone(), s.network.clone());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let client = DnsClient {
                pod: "shop/app",
                workload_id: 7,
                network: &*network,
            };
            proxy.serve_tcp(client, &mut stream).await;
        });
        let mut app = TcpStream::connect(addr).await.unwrap();
        // Both queries written before reading: pipelined.
        let queries = [
            query(21, "pim.example.com.", RecordType::A),
            query(22, "www.pim.example.com.", RecordType::A),
        ];
        for q in &queries {
            app.write_all(&(q.len() as u16).to_be_bytes())
                .await
                .unwrap();
            app.write_all(q).await.unwrap();
        }
        for q in &queries {
            let len = app.read_u16().await.unwrap();
            let mut a = vec![0; usize::from(len)];
            app.read_exact(&mut a).await.unwrap();
            assert_eq!(a, upstream_answer(q).unwrap());
        }
        assert!(
            s.records
                .resolved(7, "www.pim.example.com", IpAddr::from([10, 240, 0, 201]))
        );
        let m = s.metrics();
        assert!(
            m.contains(r#"dns_queries_total{protocol="tcp",result="answered"} 2"#),
            "{m}"
        );
    }

    #[tokio::test]
    async fn queries_in_flight_are_bounded_and_a_dropped_listener_closes_at_once() {
        let s = setup(
            Ipv4Addr::new(127, 0, 53, 6),
            vec![udp_upstream().await],
            5000,
        );
        let socket = s
            .network
            .udp_bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap();
        let listener = socket.local_addr().unwrap();
        let (proxy, network) = (s.proxy.clone(), s.network.clone());
        let served =
            tokio::spawn(async move { proxy.serve_udp("shop/app", 7, network, socket).await });
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // The upstream never answers these: they stay in flight.
        for id in 0..MAX_IN_FLIGHT as u16 {
            let q = query(id, "slow.example.com.", RecordType::A);
            app.send_to(&q, listener).await.unwrap();
        }
        // One more is answered SERVFAIL at once.
        let q = query(999, "pim.example.com.", RecordType::A);
        let a = Message::from_vec(&ask(&app, listener, &q).await.unwrap()).unwrap();
        assert_eq!(
            (a.metadata.id, a.metadata.response_code),
            (999, ResponseCode::ServFail)
        );
        // Unenrolment drops the listener's task: the socket is closed then
        // and there, not once the queries in flight time out.
        served.abort();
        let _ = served.await;
        std::net::UdpSocket::bind(listener).expect("the listener's address is free");
    }

    #[test]
    fn nameservers_of_a_resolv_conf() {
        let conf = "# generated\nsearch shop.svc.cluster.local\nnameserver 10.96.0.10\n;nameserver 10.0.0.9\nnameserver fe80::1%eth0 # link-local\nnameserver   fd00::53\nnameserver 10.0.0.4\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            nameservers(conf),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
                "[fd00::53]:53".parse().unwrap(),
            ]
        );
        assert!(nameservers("").is_empty());
    }
}
