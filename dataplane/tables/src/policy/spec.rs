//! NetworkPolicy's objects as sources describe them (shared by control and the data plane): the
//! [`NamespaceSpec`]s, [`PodSpec`]s and [`NetworkPolicySpec`]s a source (the Kubernetes watchers,
//! the static file) reports, and their checked form, [`Policy`], which [`Policy::from_spec`]
//! builds or refuses with a [`SpecError`] naming the field.
//!
//! The spec types follow `networking.k8s.io/v1` field by field, with values still as the API
//! carries them (CIDRs and protocols as strings, a port as a number or a name), so that every
//! source shares one validation and one set of field names in its rejections
//! (`spec.ingress[0].from[1].ipBlock.except[0]`). Validation refuses what the API server refuses
//! (an invalid CIDR, an `except` outside its `cidr`, a port out of range, `endPort` below `port` or
//! with a named port, an unknown protocol or operator, a peer with no selector, an `ipBlock` with a
//! selector beside it), so a newer or laxer server cannot hand the compiler something it would
//! have to guess about.
//!
//! Semantics kept here (the compiler relies on them):
//!
//! - `policyTypes` absent: `Ingress`, plus `Egress` when the policy has egress rules (the API
//!   server's defaulting).
//! - A selector is the AND of its `matchLabels` (as `In` with one value) and `matchExpressions`;
//!   an empty selector selects everything.
//! - A peer with `podSelector` only: pods of the policy's namespace; `namespaceSelector` only:
//!   every pod of the matching namespaces; both: the matching pods of the matching namespaces;
//!   `ipBlock`: addresses in `cidr` outside every `except`.
//! - A rule without peers matches every peer; without ports, every port (and every protocol).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries with its own name (set by API servers since 1.21; the
/// policy compiler adds it where a source did not).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A transport protocol a NetworkPolicy port names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyProtocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl PolicyProtocol {
    /// Every protocol.
    pub const ALL: [PolicyProtocol; 3] = [PolicyProtocol::Tcp, PolicyProtocol::Udp, PolicyProtocol::Sctp];

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            PolicyProtocol::Tcp => 6,
            PolicyProtocol::Udp => 17,
            PolicyProtocol::Sctp => 132,
        }
    }

    /// The protocol of an IP protocol number, if a policy can name it.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(PolicyProtocol::Tcp),
            17 => Some(PolicyProtocol::Udp),
            132 => Some(PolicyProtocol::Sctp),
            _ => None,
        }
    }

    /// As Kubernetes spells it.
    pub const fn name(self) -> &'static str {
        match self {
            PolicyProtocol::Tcp => "TCP",
            PolicyProtocol::Udp => "UDP",
            PolicyProtocol::Sctp => "SCTP",
        }
    }

    /// Parses `TCP`, `UDP` or `SCTP` (exactly, as the API server does).
    ///
    /// # Errors
    /// A reason naming the value.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "TCP" => Ok(PolicyProtocol::Tcp),
            "UDP" => Ok(PolicyProtocol::Udp),
            "SCTP" => Ok(PolicyProtocol::Sctp),
            other => Err(format!("{other:?} is not one of TCP, UDP, SCTP")),
        }
    }
}

impl fmt::Display for PolicyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A namespace: its name and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
}

/// A named container port of a pod (what a policy's named port resolves to).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    /// `containers[].ports[].name`.
    pub name: String,
    /// Its protocol (`TCP` when the pod did not say).
    pub protocol: PolicyProtocol,
    /// `containerPort`.
    pub port: u16,
}

/// A pod, as far as policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `status.podIPs` (empty until the pod has one). Host-network pods should not be reported:
    /// their addresses are their node's.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName` (empty until scheduled).
    pub node: String,
    /// Named container ports (unnamed ones play no part in policy).
    pub ports: Vec<NamedPort>,
}

impl PodSpec {
    /// `namespace/name`: the key sources and rejections use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A label selector as the API carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelectorSpec {
    /// `matchLabels`.
    pub match_labels: Labels,
    /// `matchExpressions`.
    pub match_expressions: Vec<RequirementSpec>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequirementSpec {
    /// `key`.
    pub key: String,
    /// `operator`: `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// `values`.
    pub values: Vec<String>,
}

/// `ipBlock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlockSpec {
    /// `cidr`.
    pub cidr: String,
    /// `except`.
    pub except: Vec<String>,
}

/// One peer of a rule (`from[]` / `to[]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSpec {
    /// `podSelector`.
    pub pod_selector: Option<LabelSelectorSpec>,
    /// `namespaceSelector`.
    pub namespace_selector: Option<LabelSelectorSpec>,
    /// `ipBlock`.
    pub ip_block: Option<IpBlockSpec>,
}

/// A port value: a number or a container port's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortValue {
    /// A port number (checked to be 1-65535).
    Number(i64),
    /// A named port.
    Name(String),
}

/// One `ports[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSpec {
    /// `protocol` (`TCP` when absent).
    pub protocol: Option<String>,
    /// `port` (every port of the protocol when absent).
    pub port: Option<PortValue>,
    /// `endPort`.
    pub end_port: Option<i64>,
}

/// One ingress or egress rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// `ports`.
    pub ports: Vec<PortSpec>,
    /// `from` (ingress) or `to` (egress).
    pub peers: Vec<PeerSpec>,
}

/// A `networking.k8s.io/v1` NetworkPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicySpec {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.podSelector`.
    pub pod_selector: LabelSelectorSpec,
    /// `spec.policyTypes`, as given (`None`: absent, defaulted by [`Policy::from_spec`]).
    pub policy_types: Option<Vec<String>>,
    /// `spec.ingress`.
    pub ingress: Vec<RuleSpec>,
    /// `spec.egress`.
    pub egress: Vec<RuleSpec>,
}

impl NetworkPolicySpec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a spec was refused: the field (as the API names it) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// `spec.ingress[0].ports[1].endPort`, ...
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl SpecError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError { field: field.into(), reason: reason.into() }
    }
}

/// A selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label is one of the values.
    In,
    /// The label is absent or none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One checked requirement (values sorted, deduplicated).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// The operator.
    pub op: Operator,
    /// The values (`In`, `NotIn`).
    pub values: Vec<String>,
}

impl Requirement {
    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            Operator::In => v.is_some_and(|v| self.values.binary_search(v).is_ok()),
            Operator::NotIn => v.is_none_or(|v| self.values.binary_search(v).is_err()),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A checked label selector: the AND of its requirements, sorted (so equal selectors compare
/// equal, and the compiler can share their results). Empty: selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// The requirements.
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Whether it selects everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Checks and converts a selector (`field` names it in errors).
    ///
    /// # Errors
    /// An unknown operator, `In`/`NotIn` without values, `Exists`/`DoesNotExist` with values, an
    /// empty key.
    pub fn from_spec(s: &LabelSelectorSpec, field: &str) -> Result<Selector, SpecError> {
        let mut requirements = Vec::with_capacity(s.match_labels.len() + s.match_expressions.len());
        for (k, v) in &s.match_labels {
            if k.is_empty() {
                return Err(SpecError::new(format!("{field}.matchLabels"), "a label key is empty"));
            }
            requirements.push(Requirement { key: k.clone(), op: Operator::In, values: vec![v.clone()] });
        }
        for (i, e) in s.match_expressions.iter().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            if e.key.is_empty() {
                return Err(SpecError::new(format!("{f}.key"), "empty"));
            }
            let op = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(SpecError::new(
                        format!("{f}.operator"),
                        format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                    ));
                }
            };
            let mut values = e.values.clone();
            match op {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(SpecError::new(format!("{f}.values"), format!("must not be empty for {}", e.operator)));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(SpecError::new(format!("{f}.values"), format!("must be empty for {}", e.operator)));
                }
                _ => {}
            }
            values.sort();
            values.dedup();
            requirements.push(Requirement { key: e.key.clone(), op, values });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r.op {
                Operator::In if r.values.len() == 1 => write!(f, "{}={}", r.key, r.values[0])?,
                Operator::In => write!(f, "{} in ({})", r.key, r.values.join(","))?,
                Operator::NotIn => write!(f, "{} notin ({})", r.key, r.values.join(","))?,
                Operator::Exists => write!(f, "{}", r.key)?,
                Operator::DoesNotExist => write!(f, "!{}", r.key)?,
            }
        }
        Ok(())
    }
}

/// Which namespaces a pod peer covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Namespaces {
    /// The policy's own namespace (no `namespaceSelector`).
    Own,
    /// The namespaces the selector matches.
    Matching(Selector),
}

/// A checked peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods: those `pods` selects, in `namespaces`.
    Pods {
        /// The namespaces.
        namespaces: Namespaces,
        /// The pods within them (empty: all).
        pods: Selector,
    },
    /// Addresses in `cidr` and in none of `except`.
    IpBlock {
        /// `cidr` (host bits cleared, as the API server's validation allows them).
        cidr: IpNet,
        /// `except`, each strictly inside `cidr`.
        except: Vec<IpNet>,
    },
}

impl Peer {
    /// Whether an address is in this peer's `ipBlock` (false for pod peers).
    pub fn block_contains(&self, addr: IpAddr) -> bool {
        match self {
            Peer::IpBlock { cidr, except } => cidr.contains(&addr) && !except.iter().any(|e| e.contains(&addr)),
            Peer::Pods { .. } => false,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pods { namespaces: Namespaces::Own, pods } => write!(f, "pods {pods}"),
            Peer::Pods { namespaces: Namespaces::Matching(ns), pods } => write!(f, "pods {pods} in namespaces {ns}"),
            Peer::IpBlock { cidr, except } if except.is_empty() => write!(f, "ipBlock {cidr}"),
            Peer::IpBlock { cidr, except } => {
                let e: Vec<String> = except.iter().map(ToString::to_string).collect();
                write!(f, "ipBlock {cidr} except {}", e.join(","))
            }
        }
    }
}

/// A checked port match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortMatch {
    /// Every port of the protocol.
    Any,
    /// `port` to `endPort` inclusive (one port: both equal).
    Range(u16, u16),
    /// A named container port of the destination pod.
    Named(String),
}

/// One checked `ports[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Port {
    /// The protocol.
    pub protocol: PolicyProtocol,
    /// Which ports of it.
    pub port: PortMatch,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortMatch::Any => write!(f, "{}/*", self.protocol),
            PortMatch::Range(a, b) if a == b => write!(f, "{}/{a}", self.protocol),
            PortMatch::Range(a, b) => write!(f, "{}/{a}-{b}", self.protocol),
            PortMatch::Named(n) => write!(f, "{}/{n}", self.protocol),
        }
    }
}

/// A checked rule: traffic from (ingress) or to (egress) one of `peers` on one of `ports`. Empty
/// `peers`: every peer; empty `ports`: every port of every protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The peers.
    pub peers: Vec<Peer>,
    /// The ports.
    pub ports: Vec<Port>,
}

/// A checked NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The pods of its namespace it applies to.
    pub pod_selector: Selector,
    /// Ingress rules when it is an ingress policy (an empty list: deny all ingress).
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules when it is an egress policy.
    pub egress: Option<Vec<Rule>>,
}

/// The two directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic into the selected pod.
    Ingress,
    /// Traffic out of the selected pod.
    Egress,
}

impl Direction {
    /// `Ingress` / `Egress`.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }
}

impl Policy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its rules in a direction, if it is a policy of that direction.
    pub fn rules(&self, d: Direction) -> Option<&[Rule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Checks a spec (see the module doc for what is refused).
    ///
    /// # Errors
    /// A [`SpecError`] naming the first offending field.
    pub fn from_spec(s: &NetworkPolicySpec) -> Result<Policy, SpecError> {
        if s.namespace.is_empty() {
            return Err(SpecError::new("metadata.namespace", "empty"));
        }
        if s.name.is_empty() {
            return Err(SpecError::new("metadata.name", "empty"));
        }
        let pod_selector = Selector::from_spec(&s.pod_selector, "spec.podSelector")?;
        let (mut ingress_on, mut egress_on) = (false, false);
        match &s.policy_types {
            // The API server's defaulting.
            None => {
                ingress_on = true;
                egress_on = !s.egress.is_empty();
            }
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => ingress_on = true,
                        "Egress" => egress_on = true,
                        other => {
                            return Err(SpecError::new(
                                format!("spec.policyTypes[{i}]"),
                                format!("{other:?} is not one of Ingress, Egress"),
                            ));
                        }
                    }
                }
            }
        }
        let rules = |list: &[RuleSpec], dir: &str, peers: &str| -> Result<Vec<Rule>, SpecError> {
            list.iter().enumerate().map(|(i, r)| rule(r, &format!("spec.{dir}[{i}]"), peers)).collect()
        };
        // Rules of a direction the policy does not take are checked too (the API server does) and
        // then ignored, as Kubernetes ignores them.
        let ingress = rules(&s.ingress, "ingress", "from")?;
        let egress = rules(&s.egress, "egress", "to")?;
        Ok(Policy {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            pod_selector,
            ingress: ingress_on.then_some(ingress),
            egress: egress_on.then_some(egress),
        })
    }
}

fn rule(r: &RuleSpec, field: &str, peers_name: &str) -> Result<Rule, SpecError> {
    let ports =
        r.ports.iter().enumerate().map(|(i, p)| port(p, &format!("{field}.ports[{i}]"))).collect::<Result<_, _>>()?;
    let peers = r
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| peer(p, &format!("{field}.{peers_name}[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(Rule { peers, ports })
}

fn port(p: &PortSpec, field: &str) -> Result<Port, SpecError> {
    let protocol = match &p.protocol {
        None => PolicyProtocol::Tcp,
        Some(s) => PolicyProtocol::parse(s).map_err(|r| SpecError::new(format!("{field}.protocol"), r))?,
    };
    let number = |n: i64, f: &str| -> Result<u16, SpecError> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| SpecError::new(format!("{field}.{f}"), format!("{n} is not in 1-65535")))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err(SpecError::new(format!("{field}.endPort"), "set without port")),
        (Some(PortValue::Name(n)), None) => {
            if n.is_empty() || n.len() > 15 || !n.bytes().any(|b| b.is_ascii_alphabetic()) {
                return Err(SpecError::new(format!("{field}.port"), format!("{n:?} is not a valid port name")));
            }
            PortMatch::Named(n.clone())
        }
        (Some(PortValue::Name(_)), Some(_)) => {
            return Err(SpecError::new(format!("{field}.endPort"), "set with a named port"));
        }
        (Some(PortValue::Number(n)), end) => {
            let a = number(*n, "port")?;
            let b = end.map(|e| number(e, "endPort")).transpose()?.unwrap_or(a);
            if b < a {
                return Err(SpecError::new(format!("{field}.endPort"), format!("{b} is below port {a}")));
            }
            PortMatch::Range(a, b)
        }
    };
    Ok(Port { protocol, port })
}

fn peer(p: &PeerSpec, field: &str) -> Result<Peer, SpecError> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => Err(SpecError::new(field, "names no podSelector, namespaceSelector or ipBlock")),
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            Err(SpecError::new(format!("{field}.ipBlock"), "may not be combined with a selector"))
        }
        (pods, ns, None) => {
            let pods = match pods {
                Some(s) => Selector::from_spec(s, &format!("{field}.podSelector"))?,
                None => Selector::default(),
            };
            let namespaces = match ns {
                Some(s) => Namespaces::Matching(Selector::from_spec(s, &format!("{field}.namespaceSelector"))?),
                None => Namespaces::Own,
            };
            Ok(Peer::Pods { namespaces, pods })
        }
        (None, None, Some(b)) => {
            let f = format!("{field}.ipBlock");
            let cidr = parse_net(&b.cidr).map_err(|r| SpecError::new(format!("{f}.cidr"), r))?;
            let mut except = Vec::with_capacity(b.except.len());
            for (i, e) in b.except.iter().enumerate() {
                let ef = format!("{f}.except[{i}]");
                let n = parse_net(e).map_err(|r| SpecError::new(&ef, r))?;
                if n.addr().is_ipv4() != cidr.addr().is_ipv4()
                    || !cidr.contains(&n)
                    || n.prefix_len() <= cidr.prefix_len()
                {
                    return Err(SpecError::new(ef, format!("{n} is not strictly inside cidr {cidr}")));
                }
                except.push(n);
            }
            Ok(Peer::IpBlock { cidr, except })
        }
    }
}

/// A CIDR; host bits are cleared (the API server accepts `10.0.0.1/24` in an `ipBlock`).
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| format!("{s:?} is not a CIDR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn sel(kv: &[(&str, &str)]) -> LabelSelectorSpec {
        LabelSelectorSpec { match_labels: labels(kv), match_expressions: vec![] }
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> RequirementSpec {
        RequirementSpec {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    fn policy() -> NetworkPolicySpec {
        NetworkPolicySpec { namespace: "x".into(), name: "p".into(), ..Default::default() }
    }

    #[test]
    fn selectors_follow_the_api() {
        let s = LabelSelectorSpec {
            match_labels: labels(&[("pod", "a")]),
            match_expressions: vec![
                expr("tier", "In", &["web", "api"]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
                expr("legacy", "DoesNotExist", &[]),
            ],
        };
        let s = Selector::from_spec(&s, "spec.podSelector").expect("valid");
        assert!(s.matches(&labels(&[("pod", "a"), ("tier", "api"), ("team", "t")])));
        assert!(s.matches(&labels(&[("pod", "a"), ("tier", "web"), ("team", ""), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("pod", "a"), ("tier", "web"), ("team", "t"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("pod", "a"), ("tier", "db"), ("team", "t")])));
        assert!(!s.matches(&labels(&[("pod", "a"), ("tier", "web")])), "team must exist");
        assert!(!s.matches(&labels(&[("pod", "a"), ("tier", "web"), ("team", "t"), ("legacy", "1")])));
        assert!(!s.matches(&labels(&[("pod", "b"), ("tier", "web"), ("team", "t")])));
        assert!(Selector::from_spec(&LabelSelectorSpec::default(), "s").expect("empty").matches(&Labels::new()));
        let field = |e: RequirementSpec| {
            Selector::from_spec(&LabelSelectorSpec { match_labels: Labels::new(), match_expressions: vec![e] }, "sel")
                .map_err(|e| e.field)
                .err()
        };
        assert_eq!(field(expr("k", "Equals", &["v"])).as_deref(), Some("sel.matchExpressions[0].operator"));
        assert_eq!(field(expr("k", "In", &[])).as_deref(), Some("sel.matchExpressions[0].values"));
        assert_eq!(field(expr("k", "Exists", &["v"])).as_deref(), Some("sel.matchExpressions[0].values"));
        assert_eq!(field(expr("", "Exists", &[])).as_deref(), Some("sel.matchExpressions[0].key"));
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let p = Policy::from_spec(&policy()).expect("valid");
        assert_eq!((p.ingress.as_deref().map(<[Rule]>::len), p.egress.is_none()), (Some(0), true));
        let with_egress = NetworkPolicySpec { egress: vec![RuleSpec::default()], ..policy() };
        let p = Policy::from_spec(&with_egress).expect("valid");
        assert!(p.ingress.is_some() && p.egress.as_ref().is_some_and(|e| e.len() == 1));
        let egress_only = NetworkPolicySpec { policy_types: Some(vec!["Egress".into()]), ..policy() };
        let p = Policy::from_spec(&egress_only).expect("valid");
        assert!(p.ingress.is_none() && p.egress.as_ref().is_some_and(Vec::is_empty), "deny all egress");
        let bad = NetworkPolicySpec { policy_types: Some(vec!["Ingress".into(), "Sideways".into()]), ..policy() };
        assert_eq!(Policy::from_spec(&bad).map_err(|e| e.field).err().as_deref(), Some("spec.policyTypes[1]"));
    }

    #[test]
    fn peers_and_ports_are_checked_naming_the_field() {
        let rule = |peers: Vec<PeerSpec>, ports: Vec<PortSpec>| NetworkPolicySpec {
            ingress: vec![RuleSpec::default(), RuleSpec { ports, peers }],
            ..policy()
        };
        let field = |p: NetworkPolicySpec| Policy::from_spec(&p).map_err(|e| e.field).err();
        let block = |cidr: &str, except: &[&str]| PeerSpec {
            ip_block: Some(IpBlockSpec { cidr: cidr.into(), except: except.iter().map(|e| (*e).to_owned()).collect() }),
            ..Default::default()
        };
        let num =
            |p: i64, end: Option<i64>| PortSpec { protocol: None, port: Some(PortValue::Number(p)), end_port: end };
        assert_eq!(
            field(rule(vec![block("10.0.0.0/33", &[])], vec![])).as_deref(),
            Some("spec.ingress[1].from[0].ipBlock.cidr")
        );
        assert_eq!(
            field(rule(vec![block("10.0.0.0/8", &["10.1.0.0/16", "11.0.0.0/16"])], vec![])).as_deref(),
            Some("spec.ingress[1].from[0].ipBlock.except[1]")
        );
        assert_eq!(
            field(rule(vec![block("10.0.0.0/8", &["10.0.0.0/8"])], vec![])).as_deref(),
            Some("spec.ingress[1].from[0].ipBlock.except[0]")
        );
        assert_eq!(field(rule(vec![PeerSpec::default()], vec![])).as_deref(), Some("spec.ingress[1].from[0]"));
        let both = PeerSpec { pod_selector: Some(sel(&[])), ..block("10.0.0.0/8", &[]) };
        assert_eq!(field(rule(vec![both], vec![])).as_deref(), Some("spec.ingress[1].from[0].ipBlock"));
        assert_eq!(field(rule(vec![], vec![num(0, None)])).as_deref(), Some("spec.ingress[1].ports[0].port"));
        assert_eq!(field(rule(vec![], vec![num(65536, None)])).as_deref(), Some("spec.ingress[1].ports[0].port"));
        assert_eq!(field(rule(vec![], vec![num(80, Some(79))])).as_deref(), Some("spec.ingress[1].ports[0].endPort"));
        assert_eq!(
            field(rule(vec![], vec![num(80, Some(70_000))])).as_deref(),
            Some("spec.ingress[1].ports[0].endPort")
        );
        let named = PortSpec { protocol: None, port: Some(PortValue::Name("http".into())), end_port: Some(90) };
        assert_eq!(field(rule(vec![], vec![named])).as_deref(), Some("spec.ingress[1].ports[0].endPort"));
        let proto = PortSpec { protocol: Some("ICMP".into()), ..Default::default() };
        assert_eq!(field(rule(vec![], vec![proto])).as_deref(), Some("spec.ingress[1].ports[0].protocol"));
        let end_only = PortSpec { end_port: Some(90), ..Default::default() };
        assert_eq!(field(rule(vec![], vec![end_only])).as_deref(), Some("spec.ingress[1].ports[0].endPort"));
        let bad_sel = PeerSpec {
            namespace_selector: Some(LabelSelectorSpec {
                match_labels: Labels::new(),
                match_expressions: vec![expr("k", "Has", &[])],
            }),
            ..Default::default()
        };
        assert_eq!(
            field(rule(vec![bad_sel], vec![])).as_deref(),
            Some("spec.ingress[1].from[0].namespaceSelector.matchExpressions[0].operator")
        );

        let good = rule(
            vec![
                PeerSpec {
                    pod_selector: Some(sel(&[("pod", "a")])),
                    namespace_selector: Some(sel(&[("ns", "y")])),
                    ip_block: None,
                },
                block("10.0.0.5/8", &["10.1.0.0/16"]),
            ],
            vec![
                num(80, Some(81)),
                PortSpec { protocol: Some("UDP".into()), port: Some(PortValue::Name("dns".into())), end_port: None },
                PortSpec { protocol: Some("SCTP".into()), ..Default::default() },
            ],
        );
        let p = Policy::from_spec(&good).expect("valid");
        let r = &p.ingress.as_ref().expect("ingress")[1];
        assert_eq!(r.ports[0], Port { protocol: PolicyProtocol::Tcp, port: PortMatch::Range(80, 81) });
        assert_eq!(r.ports[1], Port { protocol: PolicyProtocol::Udp, port: PortMatch::Named("dns".into()) });
        assert_eq!(r.ports[2], Port { protocol: PolicyProtocol::Sctp, port: PortMatch::Any });
        assert!(matches!(&r.peers[0], Peer::Pods { namespaces: Namespaces::Matching(_), .. }));
        assert!(r.peers[1].block_contains("10.2.0.1".parse().expect("ip")));
        assert!(!r.peers[1].block_contains("10.1.0.1".parse().expect("ip")));
        assert!(!r.peers[1].block_contains("11.0.0.1".parse().expect("ip")));
        assert_eq!(r.peers[1].to_string(), "ipBlock 10.0.0.0/8 except 10.1.0.0/16");
    }
}
