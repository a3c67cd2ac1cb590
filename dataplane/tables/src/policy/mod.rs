//! NetworkPolicy (`networking.k8s.io/v1`): the objects as sources describe them and their checked
//! form ([`spec`], shared by control and the data plane).

pub mod compile;
pub mod flat;
pub mod spec;

pub use compile::{
    DirRules, Explanation, Identity, PodRules, PolicyCompiler, PolicyRef, PolicyTables, PolicyVerdict, PortSet,
    RuleOrigin, SideExplanation,
};

pub use spec::{
    Direction, IpBlockSpec, LabelSelectorSpec, Labels, NAMESPACE_NAME_LABEL, NamedPort, NamespaceSpec, Namespaces,
    NetworkPolicySpec, Operator, Peer, PeerSpec, PodSpec, Policy, PolicyProtocol, Port, PortMatch, PortSpec, PortValue,
    Requirement, RequirementSpec, Rule, RuleSpec, Selector, SpecError,
};
