//! Decisions: which policies select a workload (an index, not a scan), and
//! Istio's order — any matching DENY denies; with no ALLOW policy selecting
//! the workload, allow; otherwise one ALLOW must match. AUDIT never decides.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::compile::{
    Action, AuthorizationPolicy, ConditionKey, ConditionMatch, ConditionValues, Field,
    OperationMatch, RuleMatch, SourceMatch, StrMatch,
};
use crate::identity::Identity;

/// What a decision looks at: the connection as the destination sees it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// From the client certificate; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_namespace: &'a str,
    pub dst_labels: &'a BTreeMap<String, String>,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `policy`: the ALLOW policy that matched; `None`: none selects it.
    Allow { policy: Option<String> },
    /// `policy`: the DENY policy that matched; `None`: ALLOW policies select
    /// the workload and none matched.
    Deny { policy: Option<String> },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// Policies of one namespace, by the first label of their selector.
#[derive(Debug, Default)]
struct NamespaceIndex {
    all_workloads: Vec<usize>,
    /// label key -> label value -> policies (looked up by &str, no allocation).
    by_label: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl NamespaceIndex {
    fn add(&mut self, i: usize, p: &AuthorizationPolicy) {
        match p.selector.iter().next() {
            None => self.all_workloads.push(i),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(i),
        }
    }

    fn candidates<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = usize> + 'a {
        self.all_workloads.iter().copied().chain(
            labels
                .iter()
                .filter_map(|(k, v)| self.by_label.get(k.as_str())?.get(v.as_str()))
                .flatten()
                .copied(),
        )
    }
}

#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<AuthorizationPolicy>,
    by_namespace: HashMap<String, NamespaceIndex>,
    root_namespace: String,
}

impl PolicySet {
    pub fn new(policies: Vec<AuthorizationPolicy>, root_namespace: &str) -> Self {
        let mut set = Self {
            policies,
            by_namespace: HashMap::new(),
            root_namespace: root_namespace.to_owned(),
        };
        for (i, p) in set.policies.iter().enumerate() {
            set.by_namespace
                .entry(p.namespace.clone())
                .or_default()
                .add(i, p);
        }
        set
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// `namespace/name` of every policy, for `/config_dump`.
    pub fn names(&self) -> Vec<String> {
        self.policies.iter().map(|p| p.name.clone()).collect()
    }

    /// Policies that select the destination workload: its namespace's and
    /// the root namespace's (mesh-wide), whose selector labels it carries.
    fn selecting<'a>(
        &'a self,
        r: &'a Request<'_>,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        let own = self.by_namespace.get(r.dst_namespace);
        let root = (r.dst_namespace != self.root_namespace)
            .then(|| self.by_namespace.get(&self.root_namespace))
            .flatten();
        own.into_iter()
            .chain(root)
            .flat_map(|idx| idx.candidates(r.dst_labels))
            .map(|i| &self.policies[i])
            .filter(|p| {
                p.selector
                    .iter()
                    .all(|(k, v)| r.dst_labels.get(k) == Some(v))
            })
    }

    pub fn decide(&self, r: &Request<'_>) -> Decision {
        let principal = r.src_identity.map(principal);
        let r = &Facts {
            r,
            principal: principal.as_deref(),
        };
        let mut any_allow = false;
        let mut allowed_by = None;
        for p in self.selecting(r.r) {
            match p.action {
                Action::Deny
                    if p.rules
                        .iter()
                        .any(|rule| rule_matches(rule, r, Action::Deny)) =>
                {
                    return Decision::Deny {
                        policy: Some(p.name.clone()),
                    };
                }
                Action::Allow => {
                    any_allow = true;
                    if allowed_by.is_none()
                        && p.rules
                            .iter()
                            .any(|rule| rule_matches(rule, r, Action::Allow))
                    {
                        allowed_by = Some(p.name.clone());
                    }
                }
                _ => {}
            }
        }
        match (any_allow, allowed_by) {
            (false, _) => Decision::Allow { policy: None },
            (true, Some(p)) => Decision::Allow { policy: Some(p) },
            (true, None) => Decision::Deny { policy: None },
        }
    }
}

fn field<T>(f: &Field<T>, matches: impl Fn(&T) -> bool) -> bool {
    f.any_of.as_ref().is_none_or(|v| v.iter().any(&matches))
        && f.none_of.as_ref().is_none_or(|v| !v.iter().any(&matches))
}

/// A string attribute that may be missing (no identity): a positive list
/// never matches a missing value, a negative list always lets it through.
fn optional_str(f: &Field<StrMatch>, value: Option<&str>) -> bool {
    match value {
        Some(v) => field(f, |m| m.matches(v)),
        None => f.any_of.is_none(),
    }
}

/// Istio principals are SPIFFE IDs without the scheme.
fn principal(id: &Identity) -> String {
    format!(
        "{}/ns/{}/sa/{}",
        id.trust_domain, id.namespace, id.service_account
    )
}

/// A request and what is derived from it once per decision.
struct Facts<'a> {
    r: &'a Request<'a>,
    principal: Option<&'a str>,
}

impl Facts<'_> {
    fn namespace(&self) -> Option<&str> {
        self.r.src_identity.map(|i| i.namespace.as_str())
    }
}

fn source_matches(s: &SourceMatch, f: &Facts<'_>) -> bool {
    optional_str(&s.principals, f.principal)
        && optional_str(&s.namespaces, f.namespace())
        && field(&s.ip_blocks, |b| b.contains(f.r.src_ip))
}

fn operation_matches(o: &OperationMatch, f: &Facts<'_>) -> bool {
    field(&o.ports, |p| *p == f.r.dst_port)
}

fn condition_matches(c: &ConditionMatch, f: &Facts<'_>) -> bool {
    let r = f.r;
    match (&c.key, &c.values) {
        (ConditionKey::SourceIp, ConditionValues::Ips(f)) => field(f, |b| b.contains(r.src_ip)),
        (ConditionKey::DestinationIp, ConditionValues::Ips(f)) => {
            field(f, |b| b.contains(r.dst_ip))
        }
        (ConditionKey::DestinationPort, ConditionValues::Ports(f)) => {
            field(f, |p| *p == r.dst_port)
        }
        (ConditionKey::SourcePrincipal, ConditionValues::Strings(v)) => {
            optional_str(v, f.principal)
        }
        (ConditionKey::SourceNamespace, ConditionValues::Strings(v)) => {
            optional_str(v, f.namespace())
        }
        _ => false,
    }
}

fn rule_matches(rule: &RuleMatch, r: &Facts<'_>, action: Action) -> bool {
    // ztunnel: an ALLOW rule that needs L7 attributes never matches; a DENY
    // rule is matched on its L4 parts alone (so it denies more).
    if rule.has_l7 && action == Action::Allow {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, r)))
        && rule.when.iter().all(|c| condition_matches(c, r))
}
