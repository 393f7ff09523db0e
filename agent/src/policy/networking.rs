//! Checks and compiles Istio's `networking.istio.io` ServiceEntry and
//! DestinationRule documents into the egress registry's types, with the
//! same file:line:column errors as the security kinds. Fields the agent
//! does not honour are accepted with a warning that names them (a rule
//! written for Envoy still loads), never silently.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use super::{
    diagnostics::Ctx,
    model::{ClientTls, ConnectionPool, Document, N, OutlierDetection, S, Spec},
};
use crate::{
    ipblock::IpBlock,
    registry::{
        ConnectPolicy, DestinationRule, EndpointAddress, HostMatch, Keepalive, OriginationTls,
        OutlierPolicy, Resolution, ServiceEndpoint, ServiceEntry, ServicePort, TlsMode,
        parse_duration,
    },
};

/// Istio's port protocols (`protocol` of a ServiceEntry port).
const PROTOCOLS: [&str; 10] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "MYSQL", "REDIS",
];

/// Defaults of Istio's `outlierDetection` (Envoy's).
const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

fn number(ctx: &mut Ctx<'_>, n: &N, path: &str, min: i64, max: i64) -> Option<i64> {
    if n.value < min || n.value > max {
        ctx.error_at(
            n.referenced.line(),
            n.referenced.column(),
            path,
            format!("{} is not in {min}..={max}", n.value),
        );
        return None;
    }
    Some(n.value)
}

fn port_number(ctx: &mut Ctx<'_>, n: &N, path: &str) -> Option<u16> {
    number(ctx, n, path, 1, 65535).map(|v| v as u16)
}

fn duration(ctx: &mut Ctx<'_>, s: &Option<S>, path: &str) -> Option<Duration> {
    let s = s.as_ref()?;
    match parse_duration(&s.value) {
        Ok(d) if !d.is_zero() => Some(d),
        Ok(_) => {
            ctx.error(s, path, "must be more than zero");
            None
        }
        Err(e) => {
            ctx.error(s, path, e);
            None
        }
    }
}

fn warn_unhonoured(ctx: &mut Ctx<'_>, present: bool, path: &str, why: &str) {
    if present {
        ctx.warn(path, why);
    }
}

/// The spec fields of each networking kind.
pub fn foreign_fields(kind: &str, spec: &Spec) -> Vec<&'static str> {
    let security = [
        (spec.selector.is_some(), "selector"),
        (spec.action.is_some(), "action"),
        (spec.rules.is_some(), "rules"),
        (spec.provider.is_some(), "provider"),
        (spec.target_ref.is_some(), "targetRef"),
        (spec.target_refs.is_some(), "targetRefs"),
        (spec.mtls.is_some(), "mtls"),
        (spec.port_level_mtls.is_some(), "portLevelMtls"),
    ];
    let entry = [
        (spec.hosts.is_some(), "hosts"),
        (spec.addresses.is_some(), "addresses"),
        (spec.ports.is_some(), "ports"),
        (spec.location.is_some(), "location"),
        (spec.resolution.is_some(), "resolution"),
        (spec.endpoints.is_some(), "endpoints"),
        (spec.subject_alt_names.is_some(), "subjectAltNames"),
    ];
    let rule = [
        (spec.host.is_some(), "host"),
        (spec.traffic_policy.is_some(), "trafficPolicy"),
        (spec.subsets.is_some(), "subsets"),
    ];
    let shared = [
        (spec.export_to.is_some(), "exportTo"),
        (spec.workload_selector.is_some(), "workloadSelector"),
    ];
    let present = |list: &[(bool, &'static str)]| -> Vec<&'static str> {
        list.iter().filter(|(p, _)| *p).map(|(_, f)| *f).collect()
    };
    match kind {
        "ServiceEntry" => [present(&security), present(&rule)].concat(),
        "DestinationRule" => [present(&security), present(&entry)].concat(),
        // The security kinds have none of the networking fields.
        _ => [present(&entry), present(&rule), present(&shared)].concat(),
    }
}

fn shared_warnings(ctx: &mut Ctx<'_>, spec: &Spec, at: &dyn Fn(&str) -> String) {
    warn_unhonoured(
        ctx,
        spec.export_to.is_some(),
        &at("spec.exportTo"),
        "not honoured: every namespace on this node sees the entry",
    );
    warn_unhonoured(
        ctx,
        spec.workload_selector.is_some(),
        &at("spec.workloadSelector"),
        "not honoured: the entry applies to every meshed pod",
    );
}

pub fn service_entry(
    ctx: &mut Ctx<'_>,
    doc: &Document,
    namespace: &str,
    at: &dyn Fn(&str) -> String,
) -> Option<ServiceEntry> {
    let spec = &doc.spec;
    let errors_before = ctx.error_count();
    shared_warnings(ctx, spec, at);
    warn_unhonoured(
        ctx,
        spec.subject_alt_names.is_some(),
        &at("spec.subjectAltNames"),
        "not honoured: set the names to verify in a DestinationRule's tls.subjectAltNames",
    );
    let mut hosts = Vec::new();
    match &spec.hosts {
        Some(list) if !list.is_empty() => {
            for (i, h) in list.iter().enumerate() {
                match HostMatch::parse(&h.value) {
                    Ok(m) => hosts.push(m),
                    Err(e) => ctx.error(h, at(&format!("spec.hosts[{i}]")), e),
                }
            }
        }
        _ => ctx.error(&doc.kind, at("spec.hosts"), "required: at least one host"),
    }
    let addresses = ctx
        .list(&spec.addresses, &at("spec.addresses"), IpBlock::parse)
        .unwrap_or_default();
    let mut ports: Vec<ServicePort> = Vec::new();
    match &spec.ports {
        Some(list) if !list.is_empty() => {
            for (i, p) in list.iter().enumerate() {
                let path = at(&format!("spec.ports[{i}]"));
                let Some(number) = port_number(ctx, &p.number, &format!("{path}.number")) else {
                    continue;
                };
                if ports.iter().any(|q| q.number == number) {
                    ctx.error_at(
                        p.number.referenced.line(),
                        p.number.referenced.column(),
                        &format!("{path}.number"),
                        format!("port {number} is listed twice"),
                    );
                }
                let protocol = match &p.protocol {
                    Some(proto) => {
                        let upper = proto.value.to_ascii_uppercase();
                        if !PROTOCOLS.contains(&upper.as_str()) {
                            ctx.error(
                                proto,
                                format!("{path}.protocol"),
                                format!("{:?} is not one of {}", proto.value, PROTOCOLS.join(", ")),
                            );
                        }
                        upper
                    }
                    None => "TCP".into(),
                };
                let target_port = p
                    .target_port
                    .as_ref()
                    .and_then(|t| port_number(ctx, t, &format!("{path}.targetPort")));
                ports.push(ServicePort {
                    number,
                    name: p
                        .name
                        .as_ref()
                        .map(|n| n.value.clone())
                        .unwrap_or_else(|| format!("{}-{number}", protocol.to_ascii_lowercase())),
                    protocol,
                    target_port,
                });
            }
        }
        _ => ctx.error(&doc.kind, at("spec.ports"), "required: at least one port"),
    }
    let resolution = match spec.resolution.as_ref().map(|r| (r, r.value.as_str())) {
        None | Some((_, "NONE")) => Resolution::None,
        Some((_, "STATIC")) => Resolution::Static,
        Some((_, "DNS")) => Resolution::Dns,
        Some((_, "DNS_ROUND_ROBIN")) => Resolution::DnsRoundRobin,
        Some((r, other)) => {
            ctx.error(
                r,
                at("spec.resolution"),
                format!("{other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            );
            Resolution::None
        }
    };
    let mesh_external = match spec.location.as_ref().map(|l| (l, l.value.as_str())) {
        None | Some((_, "MESH_EXTERNAL")) => true,
        Some((_, "MESH_INTERNAL")) => false,
        Some((l, other)) => {
            ctx.error(
                l,
                at("spec.location"),
                format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
            );
            true
        }
    };
    if matches!(resolution, Resolution::Dns | Resolution::DnsRoundRobin)
        && spec.endpoints.is_none()
        && let Some((i, h)) = hosts.iter().enumerate().find(|(_, h)| h.is_wildcard())
    {
        let s = &spec.hosts.as_ref().expect("parsed above")[i];
        ctx.error(
            s,
            at(&format!("spec.hosts[{i}]")),
            format!("{h} is a wildcard: with resolution DNS and no endpoints the agent resolves the host itself, which a wildcard cannot be"),
        );
    }
    let mut endpoints = Vec::new();
    for (i, e) in spec.endpoints.iter().flatten().enumerate() {
        let path = at(&format!("spec.endpoints[{i}]"));
        warn_unhonoured(
            ctx,
            e.network.is_some(),
            &format!("{path}.network"),
            "not honoured: one network",
        );
        warn_unhonoured(
            ctx,
            e.weight.is_some(),
            &format!("{path}.weight"),
            "not honoured: endpoints take equal turns",
        );
        warn_unhonoured(
            ctx,
            e.service_account.is_some(),
            &format!("{path}.serviceAccount"),
            "not honoured: a third party has no mesh identity",
        );
        let Some(address) = &e.address else {
            ctx.error(&doc.kind, format!("{path}.address"), "required");
            continue;
        };
        let addr = match (address.value.parse::<IpAddr>(), resolution) {
            (Ok(ip), _) => EndpointAddress::Ip(ip),
            (Err(_), Resolution::Dns | Resolution::DnsRoundRobin) => {
                match HostMatch::parse(&address.value) {
                    Ok(HostMatch::Exact(n)) => EndpointAddress::Name(n),
                    _ => {
                        ctx.error(
                            address,
                            format!("{path}.address"),
                            format!("{:?} is not an IP address or host name", address.value),
                        );
                        continue;
                    }
                }
            }
            (Err(_), _) => {
                ctx.error(
                    address,
                    format!("{path}.address"),
                    format!(
                        "{:?} is not an IP address (names need resolution DNS)",
                        address.value
                    ),
                );
                continue;
            }
        };
        let mut endpoint_ports = BTreeMap::new();
        for (name, n) in e.ports.iter().flatten() {
            let p = format!("{path}.ports.{name}");
            if !ports.iter().any(|sp| &sp.name == name) {
                ctx.error_at(
                    n.referenced.line(),
                    n.referenced.column(),
                    &p,
                    format!("no port of this entry is named {name:?}"),
                );
            }
            if let Some(v) = port_number(ctx, n, &p) {
                endpoint_ports.insert(name.clone(), v);
            }
        }
        endpoints.push(ServiceEndpoint {
            address: addr,
            ports: endpoint_ports,
            labels: e.labels.clone(),
            locality: e.locality.as_ref().map(|l| l.value.clone()),
        });
    }
    match resolution {
        Resolution::Static if endpoints.is_empty() && ctx.error_count() == errors_before => {
            ctx.error(
                &doc.kind,
                at("spec.endpoints"),
                "resolution STATIC needs endpoints",
            );
        }
        Resolution::None if spec.endpoints.is_some() => {
            let r = spec.resolution.as_ref().unwrap_or(&doc.kind);
            ctx.error(
                r,
                at("spec.endpoints"),
                "resolution NONE connects to the address the app chose: endpoints need STATIC or DNS",
            );
        }
        _ => {}
    }
    if ctx.error_count() > errors_before {
        return None;
    }
    Some(ServiceEntry {
        name: ctx.policy.clone(),
        namespace: namespace.to_owned(),
        hosts,
        addresses,
        ports,
        resolution,
        endpoints,
        mesh_external,
    })
}

/// A DestinationRule's host: a short name is a service of the rule's
/// namespace (Istio's rule).
fn rule_host(v: &str, namespace: &str) -> Result<HostMatch, String> {
    if !v.contains('.') && v != "*" {
        return HostMatch::parse(&format!("{v}.{namespace}.svc.cluster.local"));
    }
    HostMatch::parse(v)
}

pub fn destination_rule(
    ctx: &mut Ctx<'_>,
    doc: &Document,
    namespace: &str,
    base_dir: Option<&std::path::Path>,
    at: &dyn Fn(&str) -> String,
) -> Option<DestinationRule> {
    let spec = &doc.spec;
    let errors_before = ctx.error_count();
    shared_warnings(ctx, spec, at);
    warn_unhonoured(
        ctx,
        spec.subsets.is_some(),
        &at("spec.subsets"),
        "not honoured: subsets need L7 routing (a VirtualService), which the node agent does not do",
    );
    let host = match &spec.host {
        Some(h) => match rule_host(&h.value, namespace) {
            Ok(m) => Some(m),
            Err(e) => {
                ctx.error(h, at("spec.host"), e);
                None
            }
        },
        None => {
            ctx.error(&doc.kind, at("spec.host"), "required");
            None
        }
    };
    let mut policy = ConnectPolicy::default();
    let mut ports = BTreeMap::new();
    if let Some(tp) = &spec.traffic_policy {
        let path = at("spec.trafficPolicy");
        warn_unhonoured(
            ctx,
            tp.load_balancer.is_some(),
            &format!("{path}.loadBalancer"),
            "not honoured: round robin over the endpoints not ejected",
        );
        warn_unhonoured(
            ctx,
            tp.tunnel.is_some(),
            &format!("{path}.tunnel"),
            "not honoured",
        );
        warn_unhonoured(
            ctx,
            tp.proxy_protocol.is_some(),
            &format!("{path}.proxyProtocol"),
            "not honoured",
        );
        policy = connect_policy(
            ctx,
            &path,
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
            tp.tls.as_ref(),
            base_dir,
        );
        for (i, pl) in tp.port_level_settings.iter().flatten().enumerate() {
            let p = format!("{path}.portLevelSettings[{i}]");
            warn_unhonoured(
                ctx,
                pl.load_balancer.is_some(),
                &format!("{p}.loadBalancer"),
                "not honoured: round robin over the endpoints not ejected",
            );
            let Some(sel) = &pl.port else {
                ctx.error(&doc.kind, format!("{p}.port"), "required");
                continue;
            };
            let Some(number) = port_number(ctx, &sel.number, &format!("{p}.port.number")) else {
                continue;
            };
            let port_policy = connect_policy(
                ctx,
                &p,
                pl.connection_pool.as_ref(),
                pl.outlier_detection.as_ref(),
                pl.tls.as_ref(),
                base_dir,
            );
            ports.insert(number, port_policy);
        }
    }
    if ctx.error_count() > errors_before {
        return None;
    }
    policy.rule = Some(ctx.policy.clone());
    for p in ports.values_mut() {
        p.rule = Some(ctx.policy.clone());
    }
    Some(DestinationRule {
        name: ctx.policy.clone(),
        namespace: namespace.to_owned(),
        host: host?,
        policy,
        ports,
    })
}

fn connect_policy(
    ctx: &mut Ctx<'_>,
    path: &str,
    pool: Option<&ConnectionPool>,
    outlier: Option<&OutlierDetection>,
    tls: Option<&ClientTls>,
    base_dir: Option<&std::path::Path>,
) -> ConnectPolicy {
    let mut policy = ConnectPolicy::default();
    if let Some(pool) = pool {
        warn_unhonoured(
            ctx,
            pool.http.is_some(),
            &format!("{path}.connectionPool.http"),
            "not honoured: HTTP settings need L7, which the node agent does not do for this destination",
        );
        if let Some(tcp) = &pool.tcp {
            let p = format!("{path}.connectionPool.tcp");
            policy.max_connections = tcp
                .max_connections
                .as_ref()
                .and_then(|n| number(ctx, n, &format!("{p}.maxConnections"), 1, u32::MAX.into()))
                .map(|n| n as u32);
            policy.connect_timeout =
                duration(ctx, &tcp.connect_timeout, &format!("{p}.connectTimeout"));
            warn_unhonoured(
                ctx,
                tcp.max_connection_duration.is_some(),
                &format!("{p}.maxConnectionDuration"),
                "not honoured",
            );
            warn_unhonoured(
                ctx,
                tcp.idle_timeout.is_some(),
                &format!("{p}.idleTimeout"),
                "not honoured",
            );
            if let Some(k) = &tcp.tcp_keepalive {
                let kp = format!("{p}.tcpKeepalive");
                policy.keepalive = Some(Keepalive {
                    time: duration(ctx, &k.time, &format!("{kp}.time")),
                    interval: duration(ctx, &k.interval, &format!("{kp}.interval")),
                    probes: k
                        .probes
                        .as_ref()
                        .and_then(|n| number(ctx, n, &format!("{kp}.probes"), 1, 127))
                        .map(|n| n as u32),
                });
            }
        }
    }
    if let Some(o) = outlier {
        policy.outlier = outlier_policy(ctx, &format!("{path}.outlierDetection"), o);
    }
    if let Some(t) = tls {
        policy.tls = origination(ctx, &format!("{path}.tls"), t, base_dir);
    }
    policy
}

fn outlier_policy(ctx: &mut Ctx<'_>, path: &str, o: &OutlierDetection) -> Option<OutlierPolicy> {
    let count = |ctx: &mut Ctx<'_>, n: &Option<N>, field: &str| {
        n.as_ref()
            .and_then(|n| number(ctx, n, &format!("{path}.{field}"), 0, u32::MAX.into()))
            .map(|n| n as u32)
    };
    let five = count(ctx, &o.consecutive_5xx_errors, "consecutive5xxErrors")
        .or(count(ctx, &o.consecutive_errors, "consecutiveErrors"))
        .unwrap_or(DEFAULT_CONSECUTIVE_5XX);
    let gateway = count(
        ctx,
        &o.consecutive_gateway_errors,
        "consecutiveGatewayErrors",
    )
    .unwrap_or(0);
    warn_unhonoured(
        ctx,
        o.split_external_local_origin_errors.is_some()
            || o.consecutive_local_origin_failures.is_some(),
        &format!("{path}.splitExternalLocalOriginErrors"),
        "not honoured: at L4 every error is a connect failure (local origin)",
    );
    if let Some(m) = &o.min_health_percent
        && m.value != 0
    {
        ctx.warn(
            format!("{path}.minHealthPercent"),
            "not honoured: when every endpoint is ejected, all are used again",
        );
    }
    let max_ejection_percent = o
        .max_ejection_percent
        .as_ref()
        .and_then(|n| number(ctx, n, &format!("{path}.maxEjectionPercent"), 0, 100))
        .map(|n| n as u32)
        .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT);
    let interval =
        duration(ctx, &o.interval, &format!("{path}.interval")).unwrap_or(DEFAULT_INTERVAL);
    let base_ejection_time = duration(
        ctx,
        &o.base_ejection_time,
        &format!("{path}.baseEjectionTime"),
    )
    .unwrap_or(DEFAULT_BASE_EJECTION);
    // For opaque TCP, Istio counts a connect failure as a 5xx and as a
    // gateway error: the lower enabled threshold ejects first.
    let consecutive_errors = match (five, gateway) {
        (0, 0) => {
            ctx.warn(
                path.to_owned(),
                "both consecutive5xxErrors and consecutiveGatewayErrors are 0: nothing is ever ejected",
            );
            return None;
        }
        (0, g) => g,
        (f, 0) => f,
        (f, g) => f.min(g),
    };
    Some(OutlierPolicy {
        consecutive_errors,
        interval,
        base_ejection_time,
        max_ejection_percent,
    })
}

fn origination(
    ctx: &mut Ctx<'_>,
    path: &str,
    t: &ClientTls,
    base_dir: Option<&std::path::Path>,
) -> Option<OriginationTls> {
    let mode = match t.mode.value.as_str() {
        "DISABLE" => return None,
        "SIMPLE" => TlsMode::Simple,
        "MUTUAL" => TlsMode::Mutual,
        "ISTIO_MUTUAL" => {
            ctx.warn(
                format!("{path}.mode"),
                "ISTIO_MUTUAL: traffic between meshed pods is already mutual TLS (HBONE); nothing to originate",
            );
            return None;
        }
        other => {
            ctx.error(
                &t.mode,
                format!("{path}.mode"),
                format!("{other:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
            );
            return None;
        }
    };
    warn_unhonoured(
        ctx,
        t.credential_name.is_some(),
        &format!("{path}.credentialName"),
        "not honoured: the agent reads no Secrets; give clientCertificate, privateKey and caCertificates as files",
    );
    warn_unhonoured(
        ctx,
        t.insecure_skip_verify == Some(true),
        &format!("{path}.insecureSkipVerify"),
        "not honoured: the agent always verifies the server's certificate",
    );
    warn_unhonoured(
        ctx,
        t.ca_crl.is_some(),
        &format!("{path}.caCrl"),
        "not honoured",
    );
    // Relative paths are relative to the policy file's directory.
    let file = |s: &Option<S>| -> Option<PathBuf> {
        s.as_ref().map(|s| match base_dir {
            Some(d) => d.join(&s.value),
            None => PathBuf::from(&s.value),
        })
    };
    if mode == TlsMode::Mutual {
        for (v, field) in [
            (&t.client_certificate, "clientCertificate"),
            (&t.private_key, "privateKey"),
        ] {
            if v.is_none() {
                ctx.error(
                    &t.mode,
                    format!("{path}.{field}"),
                    "required with mode MUTUAL",
                );
            }
        }
    }
    let sni = t
        .sni
        .as_ref()
        .and_then(|s| match HostMatch::parse(&s.value) {
            Ok(HostMatch::Exact(n)) => Some(n),
            _ => {
                ctx.error(
                    s,
                    format!("{path}.sni"),
                    format!("{:?} is not a host name", s.value),
                );
                None
            }
        });
    let ca_certificates = file(&t.ca_certificates);
    let client_certificate = file(&t.client_certificate);
    let private_key = file(&t.private_key);
    let subject_alt_names: Vec<String> = t
        .subject_alt_names
        .iter()
        .flatten()
        .map(|s| s.value.clone())
        .collect();
    let client = match (mode, &client_certificate, &private_key) {
        (TlsMode::Mutual, Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (TlsMode::Mutual, _, _) => return None,
        _ => None,
    };
    let config = match crate::tls::origination::client_config(
        ca_certificates.as_deref(),
        client,
        &subject_alt_names,
    ) {
        Ok(c) => c,
        Err(e) => {
            let at = t
                .ca_certificates
                .as_ref()
                .or(t.client_certificate.as_ref())
                .unwrap_or(&t.mode);
            ctx.error(at, path.to_owned(), e);
            return None;
        }
    };
    Some(OriginationTls {
        mode,
        sni,
        ca_certificates,
        client_certificate,
        private_key,
        subject_alt_names,
        config,
    })
}
