//! The policy store (control side): the namespaces, pods and NetworkPolicies every source
//! reported, with the same rules for bad data as nodes (see [`crate::engine`]).
//!
//! - Each source owns its objects; a resync of one kind from one source replaces that source's
//!   objects of that kind only. When two sources report the same key, the first source in
//!   [`SourceKind`] order (Kubernetes, etcd, static file) wins.
//! - A policy is checked here ([`Policy::from_spec`]) whatever the source did: a rejection (from
//!   the source, or from the check) keeps the object's last good state, logs one warning naming
//!   the object and the field, and counts in `rejected_objects_total` (once per distinct
//!   rejection, not once per resync). A bad policy therefore never opens what its last good
//!   version closed; a policy bad from the start is not installed at all, so it closes nothing
//!   either (as Kubernetes' API server would not have stored it).
//! - [`PolicyStore::take_changes`] lists the keys whose effective object changed since the last
//!   call, for the compiler to recompute what depends on them only.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ferry_tables::policy::{NamespaceSpec, PodSpec, Policy};

use crate::metrics::Metrics;
use crate::model::{ObjectKind, PolicyObject, Rejection, SourceKind, Update};

/// A stored object, checked.
#[derive(Debug, Clone, PartialEq)]
enum Stored {
    Namespace(NamespaceSpec),
    Pod(PodSpec),
    Policy(Policy),
}

/// The objects of every source. See the module doc.
#[derive(Debug)]
pub struct PolicyStore {
    objects: BTreeMap<(ObjectKind, String, SourceKind), Stored>,
    warned: HashMap<(ObjectKind, String, SourceKind), (String, String)>,
    changed: BTreeSet<(ObjectKind, String)>,
    metrics: Metrics,
}

impl PolicyStore {
    /// An empty store.
    pub fn new(metrics: Metrics) -> Self {
        PolicyStore { objects: BTreeMap::new(), warned: HashMap::new(), changed: BTreeSet::new(), metrics }
    }

    /// Applies an update; returns whether it was one of the store's (`ObjectUpsert`,
    /// `ObjectDelete`, `ObjectResync`).
    pub fn apply(&mut self, update: &Update) -> bool {
        match update {
            Update::ObjectUpsert(source, kind, obj) => self.upsert(*source, *kind, obj),
            Update::ObjectDelete(source, kind, key) => self.delete(*source, *kind, key),
            Update::ObjectResync(source, kind, objs) => {
                let listed: BTreeSet<String> = objs
                    .iter()
                    .map(|o| match o {
                        Ok(o) => o.key(),
                        Err(r) => r.node.clone(),
                    })
                    .collect();
                let stale: Vec<String> = self
                    .objects
                    .keys()
                    .chain(self.warned.keys())
                    .filter(|(k, key, s)| k == kind && s == source && !listed.contains(key))
                    .map(|(_, key, _)| key.clone())
                    .collect();
                for key in stale {
                    self.delete(*source, *kind, &key);
                }
                for o in objs {
                    self.upsert(*source, *kind, o);
                }
            }
            _ => return false,
        }
        true
    }

    fn upsert(&mut self, source: SourceKind, kind: ObjectKind, obj: &Result<PolicyObject, Rejection>) {
        let checked = match obj {
            Err(r) => Err(r.clone()),
            Ok(o) if o.kind() != kind => {
                Err(Rejection::new(o.key(), "kind", format!("a {} reported as a {kind}", o.kind())))
            }
            Ok(PolicyObject::Namespace(n)) => Ok(Stored::Namespace(n.clone())),
            Ok(PolicyObject::Pod(p)) => Ok(Stored::Pod(p.clone())),
            Ok(PolicyObject::NetworkPolicy(p)) => {
                Policy::from_spec(p).map(Stored::Policy).map_err(|e| Rejection::new(p.key(), e.field, e.reason))
            }
        };
        match checked {
            Ok(stored) => {
                let key = match &stored {
                    Stored::Namespace(n) => n.name.clone(),
                    Stored::Pod(p) => p.key(),
                    Stored::Policy(p) => p.key(),
                };
                let id = (kind, key.clone(), source);
                self.warned.remove(&id);
                if self.objects.get(&id) != Some(&stored) {
                    self.objects.insert(id, stored);
                    self.changed.insert((kind, key));
                }
            }
            Err(r) => {
                let id = (kind, r.node.clone(), source);
                let entry = (r.field.clone(), r.reason.clone());
                if self.warned.get(&id) != Some(&entry) {
                    let kept =
                        if self.objects.contains_key(&id) { "keeping its last good state" } else { "not installed" };
                    tracing::warn!(source = %source, kind = %kind, object = %r.node, field = %r.field, reason = %r.reason, "rejected {kind}; {kept}");
                    self.metrics.rejected(source, &r.field);
                    self.warned.insert(id, entry);
                }
            }
        }
    }

    fn delete(&mut self, source: SourceKind, kind: ObjectKind, key: &str) {
        let id = (kind, key.to_owned(), source);
        self.warned.remove(&id);
        if self.objects.remove(&id).is_some() {
            self.changed.insert((kind, key.to_owned()));
        }
    }

    /// The keys whose objects changed (added, changed, removed) since the last call.
    pub fn take_changes(&mut self) -> Vec<(ObjectKind, String)> {
        std::mem::take(&mut self.changed).into_iter().collect()
    }

    fn effective(&self, kind: ObjectKind, key: &str) -> Option<&Stored> {
        // Sources in SourceKind order: the first one wins.
        let lo = (kind, key.to_owned(), SourceKind::Kube);
        self.objects.range(lo..).take_while(|((k, n, _), _)| *k == kind && n == key).map(|(_, v)| v).next()
    }

    /// The namespace of that name, as the winning source reports it.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceSpec> {
        match self.effective(ObjectKind::Namespace, name) {
            Some(Stored::Namespace(n)) => Some(n),
            _ => None,
        }
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&PodSpec> {
        match self.effective(ObjectKind::Pod, key) {
            Some(Stored::Pod(p)) => Some(p),
            _ => None,
        }
    }

    /// The checked policy `namespace/name`.
    pub fn policy(&self, key: &str) -> Option<&Policy> {
        match self.effective(ObjectKind::NetworkPolicy, key) {
            Some(Stored::Policy(p)) => Some(p),
            _ => None,
        }
    }

    /// Every key of a kind (each once, whichever sources report it).
    pub fn keys(&self, kind: ObjectKind) -> Vec<String> {
        let mut keys: Vec<String> =
            self.objects.keys().filter(|(k, _, _)| *k == kind).map(|(_, key, _)| key.clone()).collect();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use ferry_tables::policy::{LabelSelectorSpec, Labels, NetworkPolicySpec, PortSpec, PortValue, RuleSpec};

    use super::*;

    fn ns(name: &str, team: &str) -> Result<PolicyObject, Rejection> {
        let labels: Labels = [("team".to_owned(), team.to_owned())].into();
        Ok(PolicyObject::Namespace(NamespaceSpec { name: name.into(), labels }))
    }

    fn policy(name: &str, port: i64) -> Result<PolicyObject, Rejection> {
        Ok(PolicyObject::NetworkPolicy(NetworkPolicySpec {
            namespace: "x".into(),
            name: name.into(),
            pod_selector: LabelSelectorSpec::default(),
            policy_types: None,
            ingress: vec![RuleSpec {
                ports: vec![PortSpec { protocol: None, port: Some(PortValue::Number(port)), end_port: None }],
                peers: vec![],
            }],
            egress: vec![],
        }))
    }

    #[test]
    fn resync_replaces_one_source_and_kind_and_bad_data_keeps_the_last_good_state() {
        let metrics = Metrics::new();
        let mut s = PolicyStore::new(metrics.clone());
        let resync = |objs| Update::ObjectResync(SourceKind::Static, ObjectKind::Namespace, objs);
        assert!(s.apply(&resync(vec![ns("x", "a"), ns("y", "b")])));
        assert_eq!(s.take_changes().len(), 2);
        assert!(s.apply(&Update::ObjectUpsert(SourceKind::Kube, ObjectKind::Namespace, ns("x", "kube"))));
        assert_eq!(s.namespace("x").map(|n| n.labels["team"].as_str()), Some("kube"), "kube wins");
        s.apply(&resync(vec![ns("x", "a")]));
        assert_eq!(s.keys(ObjectKind::Namespace), ["x"]);
        assert!(s.namespace("y").is_none());
        assert!(s.namespace("x").is_some(), "the kube copy stays");
        s.take_changes();

        let upsert = |p| Update::ObjectUpsert(SourceKind::Static, ObjectKind::NetworkPolicy, p);
        s.apply(&upsert(policy("p", 80)));
        assert_eq!(s.take_changes(), [(ObjectKind::NetworkPolicy, "x/p".to_owned())]);
        // Port 0: refused; the last good state stays; one warning, counted once.
        s.apply(&upsert(policy("p", 0)));
        s.apply(&upsert(policy("p", 0)));
        assert!(s.take_changes().is_empty());
        assert_eq!(metrics.rejected_total(SourceKind::Static, "spec.ingress[0].ports[0].port"), 1);
        let kept = s.policy("x/p").and_then(|p| p.ingress.as_ref()).map(|r| r[0].ports[0].to_string());
        assert_eq!(kept.as_deref(), Some("TCP/80"));
        // A rejection listed in a resync keeps the object; an unlisted one goes.
        let r = Rejection::new("x/p", "spec", "bad");
        s.apply(&Update::ObjectResync(SourceKind::Static, ObjectKind::NetworkPolicy, vec![Err(r)]));
        assert!(s.policy("x/p").is_some());
        s.apply(&Update::ObjectResync(SourceKind::Static, ObjectKind::NetworkPolicy, vec![]));
        assert!(s.policy("x/p").is_none());
        assert_eq!(s.take_changes(), [(ObjectKind::NetworkPolicy, "x/p".to_owned())]);
        // A policy bad from the start is not installed.
        s.apply(&upsert(policy("q", 70_000)));
        assert!(s.policy("x/q").is_none() && s.take_changes().is_empty());
        assert!(!s.apply(&Update::Delete(SourceKind::Static, "n".into())), "not the store's");
    }
}
