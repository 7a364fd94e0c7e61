//! Stable numeric ids for identity and resource names, as the kernel maps and records carry
//! them. An id is never reused for another name, so a record made under one policy version (or
//! by a previous agent) is never read as someone else under the next. Pure.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::{Identity, Policy, Resource};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ids {
    identities: BTreeMap<String, u32>,
    resources: BTreeMap<String, u32>,
}

fn assign(map: &mut BTreeMap<String, u32>, name: &str) -> bool {
    if map.contains_key(name) {
        return false;
    }
    let next = map.values().max().map_or(0, |m| m + 1);
    map.insert(name.to_string(), next);
    true
}

impl Ids {
    /// Gives every name in the policy an id; true if any was new.
    pub fn assign(&mut self, policy: &Policy) -> bool {
        let mut changed = false;
        for i in &policy.identities {
            changed |= assign(&mut self.identities, &i.name);
        }
        for r in &policy.resources {
            changed |= assign(&mut self.resources, &r.name);
        }
        changed
    }

    /// Id of a name in the policy (panics if `assign` has not seen the policy: a logic error).
    pub fn identity(&self, name: &str) -> u32 {
        self.identities[name]
    }

    pub fn resource(&self, name: &str) -> u32 {
        self.resources[name]
    }

    pub fn identity_name(&self, id: u32) -> Option<&str> {
        self.identities.iter().find(|(_, v)| **v == id).map(|(k, _)| k.as_str())
    }

    pub fn resource_name(&self, id: u32) -> Option<&str> {
        self.resources.iter().find(|(_, v)| **v == id).map(|(k, _)| k.as_str())
    }
}

/// A policy with the ids in force for it: how the agent reads kernel records.
#[derive(Debug, Clone)]
pub struct View {
    pub policy: Policy,
    pub ids: Ids,
}

impl View {
    /// Name of the identity an id stands for, even if the policy no longer has it.
    pub fn identity_name(&self, id: u32) -> Option<&str> {
        self.ids.identity_name(id)
    }

    pub fn resource_name(&self, id: u32) -> Option<&str> {
        self.ids.resource_name(id)
    }

    /// The identity in the current policy, with its index.
    pub fn identity(&self, id: u32) -> Option<(usize, &Identity)> {
        let name = self.ids.identity_name(id)?;
        self.policy.identities.iter().enumerate().find(|(_, i)| i.name == name)
    }

    pub fn resource(&self, id: u32) -> Option<(usize, &Resource)> {
        let name = self.ids.resource_name(id)?;
        self.policy.resources.iter().enumerate().find(|(_, r)| r.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;
    use std::path::Path;

    fn pol(identities: &[&str], resources: &[&str]) -> Policy {
        let ids: String = identities.iter().map(|n| format!("    - {{ name: {n}, cgroup: /t/{n} }}\n")).collect();
        let res: String = resources
            .iter()
            .enumerate()
            .map(|(k, n)| format!("    - {{ name: {n}, protocol: tcp, address: \"127.0.0.1:{}\" }}\n", 1000 + k))
            .collect();
        let text = format!(
            "apiVersion: tollgate/v1alpha1\nkind: Policy\nmetadata: {{ name: p }}\nspec:\n  identities:\n{ids}  resources:\n{res}"
        );
        policy::parse(&text, Path::new("p")).unwrap()
    }

    #[test]
    fn ids_survive_reordering_and_removal_and_are_never_reused() {
        let mut ids = Ids::default();
        assert!(ids.assign(&pol(&["a", "b"], &["x", "y"])));
        let (a, b, y) = (ids.identity("a"), ids.identity("b"), ids.resource("y"));
        assert!(!ids.assign(&pol(&["b", "a"], &["y", "x"])));
        assert_eq!((ids.identity("a"), ids.identity("b"), ids.resource("y")), (a, b, y));
        // "a" removed, "c" added: c gets a fresh id, a's id still names a.
        let p = pol(&["b", "c"], &["y"]);
        assert!(ids.assign(&p));
        assert!(ids.identity("c") != a && ids.identity("c") != b);
        let view = View { policy: p, ids: ids.clone() };
        assert_eq!(view.identity_name(a), Some("a"));
        assert!(view.identity(a).is_none(), "a is no longer in the policy");
        assert_eq!(view.identity(b).map(|(i, _)| i), Some(0));
        assert_eq!(view.resource(y).map(|(i, r)| (i, r.name.as_str())), Some((0, "y")));
        let text = serde_json::to_string(&ids).unwrap();
        assert_eq!(serde_json::from_str::<Ids>(&text).unwrap(), ids);
    }
}
