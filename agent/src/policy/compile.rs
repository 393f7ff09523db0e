//! Checks and compiles policy documents: what parsing cannot check (CIDRs,
//! ports, principals, which fields belong to which kind), each error with the
//! file, line, column and field path.
use std::{collections::BTreeMap, path::Path};

pub use super::diagnostics::{PolicyError, PolicyWarning};
use super::{
    diagnostics::Ctx,
    model::{Condition, Document, Operation, S, Source, Spec},
};
pub use crate::ipblock::IpBlock;

/// API groups accepted unchanged: Istio's and ours.
pub const API_VERSIONS: [&str; 4] = [
    "security.istio.io/v1",
    "security.istio.io/v1beta1",
    "security.nodemesh.dev/v1",
    "security.nodemesh.dev/v1alpha1",
];

/// Istio's networking group, for ServiceEntry and DestinationRule.
pub const NETWORKING_API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// The kinds of each group.
const SECURITY_KINDS: [&str; 2] = ["AuthorizationPolicy", "PeerAuthentication"];
const NETWORKING_KINDS: [&str; 2] = ["ServiceEntry", "DestinationRule"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl StrMatch {
    fn parse(v: &str) -> Result<Self, String> {
        if v == "*" {
            return Ok(Self::Any);
        }
        let stars = v.matches('*').count();
        match (stars, v.strip_suffix('*'), v.strip_prefix('*')) {
            (0, _, _) => Ok(Self::Exact(v.to_owned())),
            (1, Some(p), _) => Ok(Self::Prefix(p.to_owned())),
            (1, _, Some(s)) => Ok(Self::Suffix(s.to_owned())),
            _ => Err(format!("{v:?}: '*' may only start or end a value")),
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

/// One match list with its negation; `None`: the field was absent.
#[derive(Debug, Clone)]
pub struct Field<T> {
    pub any_of: Option<Vec<T>>,
    pub none_of: Option<Vec<T>>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            any_of: None,
            none_of: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SourceMatch {
    pub principals: Field<StrMatch>,
    pub namespaces: Field<StrMatch>,
    pub ip_blocks: Field<IpBlock>,
}

#[derive(Debug, Clone, Default)]
pub struct OperationMatch {
    pub ports: Field<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKey {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

#[derive(Debug, Clone)]
pub enum ConditionValues {
    Strings(Field<StrMatch>),
    Ips(Field<IpBlock>),
    Ports(Field<u16>),
}

#[derive(Debug, Clone)]
pub struct ConditionMatch {
    pub key: ConditionKey,
    pub values: ConditionValues,
}

#[derive(Debug, Clone, Default)]
pub struct RuleMatch {
    /// Any one must match; empty: any source.
    pub from: Vec<SourceMatch>,
    /// Any one must match; empty: any operation.
    pub to: Vec<OperationMatch>,
    /// All must match.
    pub when: Vec<ConditionMatch>,
    /// The rule names L7 attributes, which L4 cannot see: an ALLOW rule with
    /// them never matches; in a DENY rule they are ignored (ztunnel).
    pub has_l7: bool,
}

#[derive(Debug, Clone)]
pub struct AuthorizationPolicy {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<RuleMatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    Strict,
    Permissive,
    Disable,
    Unset,
}

#[derive(Debug, Clone)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub port_modes: BTreeMap<u16, MtlsMode>,
}

#[derive(Debug, Default)]
pub struct Compiled {
    pub authorization: Vec<AuthorizationPolicy>,
    pub peer_authentication: Vec<PeerAuthentication>,
    pub service_entries: Vec<crate::registry::ServiceEntry>,
    pub destination_rules: Vec<crate::registry::DestinationRule>,
    pub warnings: Vec<PolicyWarning>,
}

fn parse_port(v: &str) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{v:?} is not a port (1-65535)"))
}

fn parse_principal(v: &str) -> Result<StrMatch, String> {
    if v.starts_with("spiffe://") {
        return Err(format!(
            "{v:?}: principals are written without spiffe:// (e.g. cluster.local/ns/shop/sa/cart)"
        ));
    }
    if v.is_empty() {
        return Err("empty principal".into());
    }
    StrMatch::parse(v)
}

/// `namespace/name` as the principal of that service account in any trust
/// domain (Istio's `serviceAccounts`: no wildcards).
fn parse_service_account(v: &str) -> Result<StrMatch, String> {
    match v.split_once('/') {
        Some((ns, sa))
            if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !v.contains('*') =>
        {
            Ok(StrMatch::Suffix(format!("/ns/{ns}/sa/{sa}")))
        }
        _ => Err(format!(
            "{v:?}: a service account is namespace/name, without wildcards"
        )),
    }
}

fn parse_namespace(v: &str) -> Result<StrMatch, String> {
    if v.is_empty() {
        return Err("empty namespace".into());
    }
    StrMatch::parse(v)
}

const L7_WHEN_PREFIXES: [&str; 3] = ["request.", "connection.sni", "experimental."];

fn source(ctx: &mut Ctx<'_>, s: &Source, path: &str) -> SourceMatch {
    for (present, field) in [
        (s.request_principals.is_some(), "requestPrincipals"),
        (s.not_request_principals.is_some(), "notRequestPrincipals"),
    ] {
        if present {
            ctx.warn(
                format!("{path}.{field}"),
                "an L7 field, which L4 enforcement cannot see",
            );
        }
    }
    let mut ip_blocks = ctx.list(&s.ip_blocks, &format!("{path}.ipBlocks"), IpBlock::parse);
    // At L4 the remote IP is the peer's IP.
    if let Some(more) = ctx.list(
        &s.remote_ip_blocks,
        &format!("{path}.remoteIpBlocks"),
        IpBlock::parse,
    ) {
        ip_blocks.get_or_insert_with(Vec::new).extend(more);
    }
    let mut not_ip_blocks = ctx.list(
        &s.not_ip_blocks,
        &format!("{path}.notIpBlocks"),
        IpBlock::parse,
    );
    if let Some(more) = ctx.list(
        &s.not_remote_ip_blocks,
        &format!("{path}.notRemoteIpBlocks"),
        IpBlock::parse,
    ) {
        not_ip_blocks.get_or_insert_with(Vec::new).extend(more);
    }
    let by_service_account = s.service_accounts.is_some() || s.not_service_accounts.is_some();
    if by_service_account
        && (s.principals.is_some()
            || s.not_principals.is_some()
            || s.namespaces.is_some()
            || s.not_namespaces.is_some())
    {
        let at = s
            .service_accounts
            .iter()
            .chain(&s.not_service_accounts)
            .flatten()
            .next();
        if let Some(at) = at {
            ctx.error(
                at,
                format!("{path}.serviceAccounts"),
                "cannot be set with namespaces or principals (Istio's rule)",
            );
        }
    }
    let principals = match by_service_account {
        true => Field {
            any_of: ctx.list(
                &s.service_accounts,
                &format!("{path}.serviceAccounts"),
                parse_service_account,
            ),
            none_of: ctx.list(
                &s.not_service_accounts,
                &format!("{path}.notServiceAccounts"),
                parse_service_account,
            ),
        },
        false => Field {
            any_of: ctx.list(
                &s.principals,
                &format!("{path}.principals"),
                parse_principal,
            ),
            none_of: ctx.list(
                &s.not_principals,
                &format!("{path}.notPrincipals"),
                parse_principal,
            ),
        },
    };
    SourceMatch {
        principals,
        namespaces: Field {
            any_of: ctx.list(
                &s.namespaces,
                &format!("{path}.namespaces"),
                parse_namespace,
            ),
            none_of: ctx.list(
                &s.not_namespaces,
                &format!("{path}.notNamespaces"),
                parse_namespace,
            ),
        },
        ip_blocks: Field {
            any_of: ip_blocks,
            none_of: not_ip_blocks,
        },
    }
}

fn operation(ctx: &mut Ctx<'_>, o: &Operation, path: &str) -> (OperationMatch, bool) {
    let mut l7 = false;
    for (present, field) in [
        (o.hosts.is_some(), "hosts"),
        (o.not_hosts.is_some(), "notHosts"),
        (o.methods.is_some(), "methods"),
        (o.not_methods.is_some(), "notMethods"),
        (o.paths.is_some(), "paths"),
        (o.not_paths.is_some(), "notPaths"),
    ] {
        if present {
            l7 = true;
            ctx.warn(
                format!("{path}.{field}"),
                "an L7 field, which L4 enforcement cannot see",
            );
        }
    }
    (
        OperationMatch {
            ports: Field {
                any_of: ctx.list(&o.ports, &format!("{path}.ports"), parse_port),
                none_of: ctx.list(&o.not_ports, &format!("{path}.notPorts"), parse_port),
            },
        },
        l7,
    )
}

fn condition(ctx: &mut Ctx<'_>, c: &Condition, path: &str) -> Result<Option<ConditionMatch>, ()> {
    let key = match c.key.value.as_str() {
        "source.ip" | "remote.ip" => ConditionKey::SourceIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" | "source.serviceAccount" => ConditionKey::SourcePrincipal,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        k if L7_WHEN_PREFIXES.iter().any(|p| k.starts_with(p)) => {
            ctx.warn(
                format!("{path}.key"),
                &format!("{k} is an L7 attribute, which L4 enforcement cannot see"),
            );
            return Ok(None);
        }
        k => {
            ctx.error(
                &c.key,
                format!("{path}.key"),
                format!("unknown condition key {k:?}"),
            );
            return Err(());
        }
    };
    if c.values.is_none() && c.not_values.is_none() {
        ctx.error(
            &c.key,
            path.to_owned(),
            "a condition needs values or notValues",
        );
        return Err(());
    }
    let (v, nv) = (format!("{path}.values"), format!("{path}.notValues"));
    let values = match key {
        ConditionKey::SourceIp | ConditionKey::DestinationIp => ConditionValues::Ips(Field {
            any_of: ctx.list(&c.values, &v, IpBlock::parse),
            none_of: ctx.list(&c.not_values, &nv, IpBlock::parse),
        }),
        ConditionKey::DestinationPort => ConditionValues::Ports(Field {
            any_of: ctx.list(&c.values, &v, parse_port),
            none_of: ctx.list(&c.not_values, &nv, parse_port),
        }),
        ConditionKey::SourcePrincipal => {
            let parse = match c.key.value.as_str() {
                "source.serviceAccount" => parse_service_account,
                _ => parse_principal,
            };
            ConditionValues::Strings(Field {
                any_of: ctx.list(&c.values, &v, parse),
                none_of: ctx.list(&c.not_values, &nv, parse),
            })
        }
        ConditionKey::SourceNamespace => ConditionValues::Strings(Field {
            any_of: ctx.list(&c.values, &v, parse_namespace),
            none_of: ctx.list(&c.not_values, &nv, parse_namespace),
        }),
    };
    Ok(Some(ConditionMatch { key, values }))
}

fn mtls_mode(ctx: &mut Ctx<'_>, m: &S, path: &str) -> MtlsMode {
    match m.value.as_str() {
        "STRICT" => MtlsMode::Strict,
        "PERMISSIVE" => MtlsMode::Permissive,
        "DISABLE" => MtlsMode::Disable,
        "UNSET" => MtlsMode::Unset,
        other => {
            ctx.error(
                m,
                path.to_owned(),
                format!("{other:?} is not STRICT, PERMISSIVE, DISABLE or UNSET"),
            );
            MtlsMode::Unset
        }
    }
}

/// Fields present in `spec` that `kind` does not have.
fn foreign_fields(kind: &str, spec: &Spec) -> Vec<&'static str> {
    if NETWORKING_KINDS.contains(&kind) {
        return super::networking::foreign_fields(kind, spec);
    }
    let mut out = Vec::new();
    let authz = kind == "AuthorizationPolicy";
    if authz {
        if spec.mtls.is_some() {
            out.push("mtls");
        }
        if spec.port_level_mtls.is_some() {
            out.push("portLevelMtls");
        }
    } else {
        if spec.action.is_some() {
            out.push("action");
        }
        if spec.rules.is_some() {
            out.push("rules");
        }
        if spec.provider.is_some() {
            out.push("provider");
        }
        if spec.target_ref.is_some() {
            out.push("targetRef");
        }
        if spec.target_refs.is_some() {
            out.push("targetRefs");
        }
    }
    out.extend(super::networking::foreign_fields(kind, spec));
    out
}

/// Compiles one file's documents. `index` numbers documents for paths.
pub fn compile(file: &Path, docs: &[Document], out: &mut Compiled) -> Result<(), Vec<PolicyError>> {
    let mut ctx = Ctx {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
        policy: String::new(),
    };
    for (d, doc) in docs.iter().enumerate() {
        let at = |f: &str| format!("document {d}: {f}");
        let kind = doc.kind.value.as_str();
        let versions: &[&str] = match kind {
            k if NETWORKING_KINDS.contains(&k) => &NETWORKING_API_VERSIONS,
            _ => &API_VERSIONS,
        };
        if !versions.contains(&doc.api_version.value.as_str()) {
            ctx.error(
                &doc.api_version,
                at("apiVersion"),
                format!(
                    "{:?} is not one of {} (for {kind})",
                    doc.api_version.value,
                    versions.join(", ")
                ),
            );
            continue;
        }
        let namespace = doc
            .metadata
            .namespace
            .as_ref()
            .map(|n| n.value.clone())
            .unwrap_or_else(|| "default".into());
        ctx.policy = format!("{namespace}/{}", doc.metadata.name.value);
        if !SECURITY_KINDS.contains(&kind) && !NETWORKING_KINDS.contains(&kind) {
            ctx.error(
                &doc.kind,
                at("kind"),
                format!(
                    "{kind:?} is not one of {}, {}",
                    SECURITY_KINDS.join(", "),
                    NETWORKING_KINDS.join(", ")
                ),
            );
            continue;
        }
        for f in foreign_fields(kind, &doc.spec) {
            ctx.error(
                &doc.kind,
                at(&format!("spec.{f}")),
                format!("not a field of {kind}"),
            );
        }
        match kind {
            "ServiceEntry" => {
                if let Some(e) = super::networking::service_entry(&mut ctx, doc, &namespace, &at) {
                    out.service_entries.push(e);
                }
                continue;
            }
            "DestinationRule" => {
                if let Some(r) = super::networking::destination_rule(
                    &mut ctx,
                    doc,
                    &namespace,
                    file.parent(),
                    &at,
                ) {
                    out.destination_rules.push(r);
                }
                continue;
            }
            _ => {}
        }
        // `selector: {}` selects nothing in particular: namespace-wide.
        let selector = doc
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .filter(|labels| !labels.is_empty());
        if kind == "PeerAuthentication" {
            let mode = match &doc.spec.mtls {
                Some(m) => mtls_mode(&mut ctx, &m.mode, &at("spec.mtls.mode")),
                None => MtlsMode::Unset,
            };
            let mut port_modes = BTreeMap::new();
            for (port, m) in doc.spec.port_level_mtls.iter().flatten() {
                let path = at(&format!("spec.portLevelMtls.{port}.mode"));
                let mode = mtls_mode(&mut ctx, &m.mode, &path);
                match parse_port(port) {
                    Ok(p) => {
                        port_modes.insert(p, mode);
                    }
                    Err(e) => ctx.error(&m.mode, at(&format!("spec.portLevelMtls.{port}")), e),
                }
            }
            if selector.is_none()
                && let Some((_, first)) = doc.spec.port_level_mtls.iter().flatten().next()
            {
                ctx.error(
                    &first.mode,
                    at("spec.portLevelMtls"),
                    "needs spec.selector: port-level modes apply to selected workloads only",
                );
            }
            out.peer_authentication.push(PeerAuthentication {
                name: ctx.policy.clone(),
                namespace,
                selector,
                mode,
                port_modes,
            });
            continue;
        }
        // As ztunnel: a policy bound to a Gateway, waypoint or Service, or
        // delegated to an external authorizer, is not a node agent's to
        // enforce (Istio sends it to the waypoint or gateway); left out,
        // with a warning, never an error that would hold the whole set.
        if doc.spec.target_ref.is_some() || doc.spec.target_refs.is_some() {
            let field = match doc.spec.target_ref.is_some() {
                true => "spec.targetRef",
                false => "spec.targetRefs",
            };
            ctx.warn(
                at(field),
                "binds the policy to a Gateway, waypoint or Service, which enforce it; not a node agent's policy (left out)",
            );
            continue;
        }
        if doc.spec.action.as_ref().map(|a| a.value.as_str()) == Some("CUSTOM") {
            ctx.warn(
                at("spec.action"),
                "CUSTOM delegates to an external authorizer at a waypoint or gateway; not a node agent's policy (left out)",
            );
            continue;
        }
        let action = match doc.spec.action.as_ref().map(|a| a.value.as_str()) {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            Some(other) => {
                let a = doc.spec.action.as_ref().expect("matched Some");
                ctx.error(
                    a,
                    at("spec.action"),
                    format!("{other:?}: L4 supports ALLOW, DENY and AUDIT"),
                );
                continue;
            }
        };
        if doc.spec.provider.is_some() {
            ctx.error(
                &doc.kind,
                at("spec.provider"),
                "only with action CUSTOM (an external authorizer)",
            );
        }
        let mut rules = Vec::new();
        for (r, rule) in doc.spec.rules.iter().flatten().enumerate() {
            let path = at(&format!("spec.rules[{r}]"));
            let from = rule
                .from
                .iter()
                .enumerate()
                .map(|(i, f)| source(&mut ctx, &f.source, &format!("{path}.from[{i}].source")))
                .collect();
            let mut has_l7 = rule.from.iter().any(|f| {
                f.source.request_principals.is_some() || f.source.not_request_principals.is_some()
            });
            let mut to = Vec::new();
            for (i, t) in rule.to.iter().enumerate() {
                let (op, l7) =
                    operation(&mut ctx, &t.operation, &format!("{path}.to[{i}].operation"));
                has_l7 |= l7;
                to.push(op);
            }
            let mut when = Vec::new();
            for (i, c) in rule.when.iter().enumerate() {
                match condition(&mut ctx, c, &format!("{path}.when[{i}]")) {
                    Ok(Some(c)) => when.push(c),
                    Ok(None) => has_l7 = true,
                    Err(()) => {}
                }
            }
            rules.push(RuleMatch {
                from,
                to,
                when,
                has_l7,
            });
        }
        out.authorization.push(AuthorizationPolicy {
            name: ctx.policy.clone(),
            namespace,
            selector: selector.unwrap_or_default(),
            action,
            rules,
        });
    }
    out.warnings.append(&mut ctx.warnings);
    if ctx.errors.is_empty() {
        Ok(())
    } else {
        Err(ctx.errors)
    }
}
