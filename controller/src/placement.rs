//! Replica placement: distinct nodes, spread over zones, within each node's capacity and the
//! overcommit ratio, honouring CSI accessibility requirements.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{ControllerError, Result};

pub use csi_proto::{TOPOLOGY_NODE, TOPOLOGY_ZONE};

/// CPU and memory: what a pod requests, or what a node has left for the pods Barnacle runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compute {
    pub cpu_milli: u64,
    pub memory: u64,
}

impl Compute {
    pub fn fits(&self, need: &Compute) -> bool {
        self.cpu_milli >= need.cpu_milli && self.memory >= need.memory
    }

    pub fn saturating_sub(&self, o: &Compute) -> Compute {
        Compute {
            cpu_milli: self.cpu_milli.saturating_sub(o.cpu_milli),
            memory: self.memory.saturating_sub(o.memory),
        }
    }

    pub fn add(&mut self, o: &Compute) {
        self.cpu_milli += o.cpu_milli;
        self.memory += o.memory;
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}m CPU and {} MiB of memory", self.cpu_milli, self.memory >> 20)
    }
}

/// A node that can hold replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// Bytes of disk for replicas.
    pub capacity: u64,
    /// CPU and memory the node has for Barnacle's replica and engine pods: its allocatable less
    /// the requests of every other pod on it. `None` where processes are not pods (the local
    /// orchestrator): not counted.
    #[serde(default)]
    pub compute: Option<Compute>,
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

/// CPU and memory the replica and engine pods of the records request, per node.
pub type UsedCompute = BTreeMap<String, Compute>;

/// What is left on `node` for one more of Barnacle's pods, given the records' pods; `None` when
/// the node's compute is not counted.
pub fn compute_room(node: &NodeInfo, used: &UsedCompute) -> Option<Compute> {
    Some(node.compute?.saturating_sub(&used.get(&node.name).copied().unwrap_or_default()))
}

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
    /// Place fewer than `replicas` when fewer nodes may hold one, rather than refuse.
    pub allow_fewer: bool,
    pub thin: bool,
    pub overcommit: f64,
    /// Topologies the volume must be accessible from (any of them); empty: anywhere.
    pub requisite: &'a [HashMap<String, String>],
    /// Topologies in order of preference: the first matching node gets the first replica.
    pub preferred: &'a [HashMap<String, String>],
    /// Nodes that must not be used (for example: already holding a replica of the volume).
    pub exclude: &'a [String],
    /// What a replica pod requests, where nodes' compute is counted, and what the records' pods
    /// take already.
    pub pod: Option<Compute>,
    pub compute_used: &'a UsedCompute,
}

/// Chooses nodes for the replicas, one replica per node. Fewer nodes that may be used than
/// replicas is ResourceExhausted unless the request allows fewer (then the count is capped);
/// too little room on them is ResourceExhausted.
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
    if allowed.len() < req.replicas && !req.allow_fewer {
        return Err(ControllerError::ResourceExhausted(format!(
            "{} replicas need {} nodes, one each; {} node{} may hold one{}{} \
             (ask for fewer replicas, or set allowFewerReplicas=true to accept {})",
            req.replicas,
            req.replicas,
            allowed.len(),
            if allowed.len() == 1 { "" } else { "s" },
            if req.requisite.is_empty() { "" } else { " in the volume's accessible topology" },
            if req.exclude.is_empty() {
                String::new()
            } else {
                format!(" besides {}", req.exclude.join(", "))
            },
            allowed.len()
        )));
    }
    let want = req.replicas.min(allowed.len());
    let disk_fits: Vec<&NodeInfo> =
        allowed.iter().copied().filter(|n| room(n, used, req.overcommit, req.thin) >= req.size).collect();
    if disk_fits.len() < want {
        return Err(ControllerError::ResourceExhausted(format!(
            "{want} replicas of {} bytes need {want} nodes with room; {} of {} have it (overcommit {})",
            req.size,
            disk_fits.len(),
            allowed.len(),
            req.overcommit
        )));
    }
    // A pod the kubelet would refuse (OutOfcpu, OutOfmemory) is never created.
    let pod_fits = |n: &NodeInfo| match (req.pod, compute_room(n, req.compute_used)) {
        (Some(need), Some(room)) => room.fits(&need),
        _ => true,
    };
    let mut fits: Vec<&NodeInfo> = disk_fits.iter().copied().filter(|n| pod_fits(n)).collect();
    if fits.len() < want {
        let short: Vec<String> = disk_fits
            .iter()
            .filter(|n| !pod_fits(n))
            .map(|n| format!("{} has {}", n.name, compute_room(n, req.compute_used).unwrap_or_default()))
            .collect();
        return Err(ControllerError::ResourceExhausted(format!(
            "{want} replicas need {want} nodes with room for a replica pod ({}); {} have it: {}",
            req.pod.unwrap_or_default(),
            fits.len(),
            short.join(", ")
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
    static NO_PODS: UsedCompute = UsedCompute::new();

    fn node(name: &str, zone: Option<&str>, gib: u64) -> NodeInfo {
        NodeInfo { name: name.into(), zone: zone.map(Into::into), capacity: gib * G, compute: None }
    }

    fn req(size: u64, replicas: usize) -> Request<'static> {
        Request {
            size,
            replicas,
            allow_fewer: true,
            thin: true,
            overcommit: 1.0,
            requisite: &[],
            preferred: &[],
            exclude: &[],
            pod: None,
            compute_used: &NO_PODS,
        }
    }

    #[test]
    fn distinct_nodes_and_capped_by_node_count() {
        let nodes = [node("a", None, 10), node("b", None, 10)];
        let got = place(&nodes, &Used::new(), &req(G, 3)).unwrap_or_default();
        assert_eq!(got.len(), 2);
        assert_ne!(got[0], got[1]);
    }

    #[test]
    fn more_replicas_than_nodes_is_refused_with_the_reason_unless_fewer_are_allowed() {
        let nodes = [node("a", None, 10), node("b", None, 10), node("c", None, 10)];
        let mut r = req(G, 5);
        r.allow_fewer = false;
        match place(&nodes, &Used::new(), &r) {
            Err(ControllerError::ResourceExhausted(m)) => {
                assert!(m.contains("5 replicas need 5 nodes") && m.contains("3 nodes may hold one"), "{m}");
                assert!(m.contains("allowFewerReplicas"), "{m}");
            }
            other => panic!("expected ResourceExhausted, got {other:?}"),
        }
        r.replicas = 3;
        assert_eq!(place(&nodes, &Used::new(), &r).map(|v| v.len()).ok(), Some(3));
    }

    #[test]
    fn nodes_without_cpu_or_memory_for_a_replica_pod_are_not_used() {
        let c = |cpu_milli, mib: u64| Some(Compute { cpu_milli, memory: mib << 20 });
        let mut nodes = vec![node("a", None, 10), node("b", None, 10), node("c", None, 10)];
        nodes[0].compute = c(2000, 4096);
        nodes[1].compute = c(120, 4096);
        nodes[2].compute = c(2000, 50);
        // b has 120m, of which the records' pods take 100m; c lacks memory.
        let used = UsedCompute::from([("b".to_owned(), Compute { cpu_milli: 100, memory: 0 })]);
        let mut r = req(G, 1);
        r.pod = Some(Compute { cpu_milli: 50, memory: 64 << 20 });
        r.compute_used = &used;
        assert_eq!(place(&nodes, &Used::new(), &r).ok(), Some(vec!["a".to_owned()]));
        r.replicas = 2;
        r.allow_fewer = false;
        match place(&nodes, &Used::new(), &r) {
            Err(ControllerError::ResourceExhausted(m)) => {
                assert!(
                    m.contains("room for a replica pod (50m CPU and 64 MiB of memory); 1 have it"),
                    "{m}"
                );
                assert!(m.contains("b has 20m CPU") && m.contains("c has 2000m CPU and 50 MiB"), "{m}");
            }
            other => panic!("expected ResourceExhausted, got {other:?}"),
        }
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
