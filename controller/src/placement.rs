//! Replica placement: distinct nodes, spread over zones, within each node's capacity and the
//! overcommit ratio, honouring CSI accessibility requirements.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{ControllerError, Result};

pub use csi_proto::{TOPOLOGY_NODE, TOPOLOGY_ZONE};

/// A node that can hold replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// Bytes of disk for replicas.
    pub capacity: u64,
}

impl NodeInfo {
    /// The node's topology segments.
    pub fn segments(&self) -> HashMap<String, String> {
        let mut s = HashMap::from([(TOPOLOGY_NODE.to_owned(), self.name.clone())]);
        if let Some(z) = &self.zone {
            s.insert(TOPOLOGY_ZONE.to_owned(), z.clone());
        }
        s
    }

    /// Whether every key of `segments` names this node's value.
    pub fn matches(&self, segments: &HashMap<String, String>) -> bool {
        let mine = self.segments();
        segments.iter().all(|(k, v)| mine.get(k) == Some(v))
    }
}

/// Bytes provisioned on one node: (thin, thick).
pub type Used = BTreeMap<String, (u64, u64)>;

/// Room for a new replica of `size` bytes on `node`.
pub fn room(node: &NodeInfo, used: &Used, overcommit: f64, thin: bool) -> u64 {
    let (t, k) = used.get(&node.name).copied().unwrap_or((0, 0));
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let thin_limit = (node.capacity as f64 * overcommit.max(1.0)) as u64;
    let thin_room = thin_limit.saturating_sub(t + k);
    if thin { thin_room } else { thin_room.min(node.capacity.saturating_sub(k)) }
}

/// What a new volume needs.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub size: u64,
    pub replicas: usize,
    pub thin: bool,
    pub overcommit: f64,
    /// Topologies the volume must be accessible from (any of them); empty: anywhere.
    pub requisite: &'a [HashMap<String, String>],
    /// Topologies in order of preference: the first matching node gets the first replica.
    pub preferred: &'a [HashMap<String, String>],
    /// Nodes that must not be used (for example: already holding a replica of the volume).
    pub exclude: &'a [String],
}

/// Chooses nodes for the replicas, one replica per node. The count is capped by the nodes that
/// may be used; too little room on them is ResourceExhausted.
pub fn place(nodes: &[NodeInfo], used: &Used, req: &Request<'_>) -> Result<Vec<String>> {
    let allowed: Vec<&NodeInfo> = nodes
        .iter()
        .filter(|n| !req.exclude.contains(&n.name))
        .filter(|n| req.requisite.is_empty() || req.requisite.iter().any(|t| n.matches(t)))
        .collect();
    if allowed.is_empty() {
        return Err(ControllerError::ResourceExhausted(
            "no node matches the volume's accessibility requirements".into(),
        ));
    }
    let want = req.replicas.min(allowed.len());
    let mut fits: Vec<&NodeInfo> =
        allowed.iter().copied().filter(|n| room(n, used, req.overcommit, req.thin) >= req.size).collect();
    if fits.len() < want {
        return Err(ControllerError::ResourceExhausted(format!(
            "{want} replicas of {} bytes need {want} nodes with room; {} of {} have it (overcommit {})",
            req.size,
            fits.len(),
            allowed.len(),
            req.overcommit
        )));
    }
    let preference = |n: &NodeInfo| req.preferred.iter().position(|t| n.matches(t)).unwrap_or(usize::MAX);
    let mut chosen: Vec<&NodeInfo> = Vec::new();
    while chosen.len() < want {
        let zone_count =
            |n: &NodeInfo| chosen.iter().filter(|c| c.zone.is_some() && c.zone == n.zone).count();
        let best = fits
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                let key = |n: &NodeInfo| {
                    let (t, k) = used.get(&n.name).copied().unwrap_or((0, 0));
                    #[allow(clippy::cast_precision_loss)]
                    let fill = (t + k) as f64 / n.capacity.max(1) as f64;
                    (zone_count(n), preference(n), fill)
                };
                let (ka, kb) = (key(a), key(b));
                (ka.0, ka.1).cmp(&(kb.0, kb.1)).then(ka.2.total_cmp(&kb.2)).then(a.name.cmp(&b.name))
            })
            .map(|(i, _)| i);
        match best {
            Some(i) => chosen.push(fits.remove(i)),
            None => break,
        }
    }
    Ok(chosen.into_iter().map(|n| n.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn node(name: &str, zone: Option<&str>, gib: u64) -> NodeInfo {
        NodeInfo { name: name.into(), zone: zone.map(Into::into), capacity: gib * G }
    }

    fn req(size: u64, replicas: usize) -> Request<'static> {
        Request { size, replicas, thin: true, overcommit: 1.0, requisite: &[], preferred: &[], exclude: &[] }
    }

    #[test]
    fn distinct_nodes_and_capped_by_node_count() {
        let nodes = [node("a", None, 10), node("b", None, 10)];
        let got = place(&nodes, &Used::new(), &req(G, 3)).unwrap_or_default();
        assert_eq!(got.len(), 2);
        assert_ne!(got[0], got[1]);
    }

    #[test]
    fn spreads_over_zones_first() {
        let nodes = [node("a1", Some("a"), 10), node("a2", Some("a"), 10), node("b1", Some("b"), 10)];
        let got = place(&nodes, &Used::new(), &req(G, 2)).unwrap_or_default();
        assert!(got.contains(&"b1".to_owned()), "{got:?}");
    }

    #[test]
    fn respects_capacity_overcommit_and_thickness() {
        let nodes = [node("a", None, 10), node("b", None, 10)];
        let used = Used::from([("a".to_owned(), (9 * G, 0))]);
        assert!(matches!(place(&nodes, &used, &req(2 * G, 2)), Err(ControllerError::ResourceExhausted(_))));
        let mut r = req(2 * G, 2);
        r.overcommit = 2.0;
        assert_eq!(place(&nodes, &used, &r).map(|v| v.len()).ok(), Some(2));
        r.thin = false;
        r.size = 11 * G;
        assert!(place(&nodes, &used, &r).is_err(), "thick volumes do not overcommit");
        // The emptier node is chosen for a single replica.
        assert_eq!(place(&nodes, &used, &req(G, 1)).ok(), Some(vec!["b".to_owned()]));
    }

    #[test]
    fn preferred_topology_gets_the_first_replica_and_requisite_limits() {
        let nodes = [node("a", None, 10), node("b", None, 10), node("c", None, 10)];
        let pref = [HashMap::from([(TOPOLOGY_NODE.to_owned(), "c".to_owned())])];
        let mut r = req(G, 1);
        r.preferred = &pref;
        assert_eq!(place(&nodes, &Used::new(), &r).ok(), Some(vec!["c".to_owned()]));
        let requisite = [
            HashMap::from([(TOPOLOGY_NODE.to_owned(), "a".to_owned())]),
            HashMap::from([(TOPOLOGY_NODE.to_owned(), "b".to_owned())]),
        ];
        let mut r = req(G, 3);
        r.requisite = &requisite;
        let mut got = place(&nodes, &Used::new(), &r).unwrap_or_default();
        got.sort();
        assert_eq!(got, ["a", "b"]);
        let nowhere = [HashMap::from([(TOPOLOGY_ZONE.to_owned(), "z".to_owned())])];
        r.requisite = &nowhere;
        assert!(matches!(place(&nodes, &Used::new(), &r), Err(ControllerError::ResourceExhausted(_))));
    }
}
