//! Choosing which peers compute which layers.
//!
//! The cost model: a token's time through a chain of hops is the sum, over
//! hops, of
//!
//! * the round trip to the hop's peer (measured RTT; [`CostModel::unknown_rtt`]
//!   where none was measured yet; zero for layers this node runs itself),
//! * a fixed per-hop overhead (serialize, send, receive, deserialize and
//!   queueing: [`CostModel::hop_overhead`]; zero locally),
//! * the hop's compute: `span / served * 1 / tokens_per_sec`, where the peer
//!   announced `tokens_per_sec` for the `served` layers it holds (its decode
//!   speed over that range), so a peer computing part of its range takes that
//!   part of the time.
//!
//! [`plan`] finds the chain of minimum expected time per token that covers the
//! requested layers exactly once, as a shortest path over layer boundaries
//! (Petals' routing, over (peer, layer) edges); ties go to fewer hops. Peers
//! in the avoid set (failed earlier in the session) are never chosen. If no
//! chain exists, the error names the layers no candidate serves.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use crate::network::PeerId;

use super::PipelineError;

/// Who computes a hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// This node, with its own engine.
    Local,
    /// A peer, over the stage protocol.
    Peer(PeerId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Local => f.write_str("local"),
            Target::Peer(p) => write!(f, "{p}"),
        }
    }
}

/// One hop of a plan: `target` runs `layers`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    /// Who.
    pub target: Target,
    /// Which layers (a sub-range of what it serves).
    pub layers: Range<u32>,
}

/// A chain of hops covering a layer range in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The hops, first layer first.
    pub hops: Vec<Hop>,
    /// Expected milliseconds per token under the cost model.
    pub expected_ms: f64,
}

/// Something that can run layers: this node or a provider found in the DHT.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Who.
    pub target: Target,
    /// The layers it serves.
    pub layers: Range<u32>,
    /// Its decode speed over `layers`, tokens per second (0 or less: unknown).
    pub tokens_per_sec: f32,
    /// Measured round-trip time (`None`: not measured; ignored for [`Target::Local`]).
    pub rtt: Option<Duration>,
}

/// Parameters of the cost model (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    /// RTT assumed for a peer with none measured.
    pub unknown_rtt: Duration,
    /// Fixed cost of a remote hop besides its RTT.
    pub hop_overhead: Duration,
    /// Speed assumed for a candidate that announced none, tokens/s over its range.
    pub unknown_tokens_per_sec: f32,
}

impl Default for CostModel {
    /// 50 ms unknown RTT, 0.2 ms per hop, 10 tokens/s unknown speed.
    fn default() -> Self {
        CostModel {
            unknown_rtt: Duration::from_millis(50),
            hop_overhead: Duration::from_micros(200),
            unknown_tokens_per_sec: 10.0,
        }
    }
}

impl CostModel {
    /// Expected milliseconds for `candidate` to run `span` of its layers.
    pub fn hop_ms(&self, candidate: &Candidate, span: u32) -> f64 {
        let served = candidate
            .layers
            .end
            .saturating_sub(candidate.layers.start)
            .max(1);
        let tps = if candidate.tokens_per_sec.is_finite() && candidate.tokens_per_sec > 0.0 {
            candidate.tokens_per_sec
        } else {
            self.unknown_tokens_per_sec.max(1e-3)
        };
        let compute = f64::from(span) / f64::from(served) / f64::from(tps) * 1e3;
        let network = match candidate.target {
            Target::Local => 0.0,
            Target::Peer(_) => {
                (candidate.rtt.unwrap_or(self.unknown_rtt) + self.hop_overhead).as_secs_f64() * 1e3
            }
        };
        compute + network
    }
}

/// Layers of `range` that no candidate outside `avoid` serves, as ranges.
pub fn uncovered(
    range: &Range<u32>,
    candidates: &[Candidate],
    avoid: &HashSet<PeerId>,
) -> Vec<Range<u32>> {
    let mut missing: Vec<Range<u32>> = Vec::new();
    for layer in range.clone() {
        let served = candidates
            .iter()
            .filter(|c| usable(c, avoid))
            .any(|c| c.layers.contains(&layer));
        if !served {
            match missing.last_mut() {
                Some(last) if last.end == layer => last.end = layer + 1,
                _ => missing.push(layer..layer + 1),
            }
        }
    }
    missing
}

fn usable(c: &Candidate, avoid: &HashSet<PeerId>) -> bool {
    match c.target {
        Target::Local => true,
        Target::Peer(p) => !avoid.contains(&p),
    }
}

/// The cheapest chain covering `range` (see the module docs).
pub fn plan(
    range: Range<u32>,
    candidates: &[Candidate],
    avoid: &HashSet<PeerId>,
    cost: &CostModel,
) -> crate::Result<Plan> {
    if range.start >= range.end {
        return Ok(Plan {
            hops: Vec::new(),
            expected_ms: 0.0,
        });
    }
    let missing = uncovered(&range, candidates, avoid);
    if !missing.is_empty() {
        return Err(PipelineError::Uncovered { missing }.into());
    }
    let n = (range.end - range.start) as usize;
    // best[i]: (cost, hops, previous boundary, candidate) to reach boundary start + i.
    let mut best: Vec<Option<(f64, usize, usize, usize)>> = vec![None; n + 1];
    best[0] = Some((0.0, 0, 0, usize::MAX));
    // Deterministic order: local first, then by peer id, then by range.
    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| usable(&candidates[i], avoid))
        .collect();
    order.sort_by(|&a, &b| {
        let (ca, cb) = (&candidates[a], &candidates[b]);
        (ca.target, ca.layers.start, ca.layers.end).cmp(&(
            cb.target,
            cb.layers.start,
            cb.layers.end,
        ))
    });
    for i in 0..n {
        let Some((here, hops, _, _)) = best[i] else {
            continue;
        };
        let a = range.start + i as u32;
        for &ci in &order {
            let c = &candidates[ci];
            if !c.layers.contains(&a) {
                continue;
            }
            let stop = c.layers.end.min(range.end);
            for b in a + 1..=stop {
                let j = (b - range.start) as usize;
                let total = here + cost.hop_ms(c, b - a);
                let better = match best[j] {
                    None => true,
                    // Fewer hops win near-ties (costs equal to 1 ns).
                    Some((old, old_hops, _, _)) => {
                        total < old - 1e-6 || ((total - old).abs() <= 1e-6 && hops + 1 < old_hops)
                    }
                };
                if better {
                    best[j] = Some((total, hops + 1, i, ci));
                }
            }
        }
    }
    let Some((expected_ms, _, _, _)) = best[n] else {
        // Unreachable when every layer is covered; report it as uncovered anyway.
        return Err(PipelineError::Uncovered {
            missing: Vec::from([range]),
        }
        .into());
    };
    let mut hops = Vec::new();
    let mut j = n;
    while j > 0 {
        let Some((_, _, i, ci)) = best[j] else { break };
        hops.push(Hop {
            target: candidates[ci].target,
            layers: range.start + i as u32..range.start + j as u32,
        });
        j = i;
    }
    hops.reverse();
    Ok(Plan { hops, expected_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: u8) -> PeerId {
        let id = crate::network::Identity::from_seed([i; 32]);
        id.peer_id()
    }

    fn cand(p: u8, layers: Range<u32>, tps: f32, rtt_ms: u64) -> Candidate {
        Candidate {
            target: Target::Peer(peer(p)),
            layers,
            tokens_per_sec: tps,
            rtt: Some(Duration::from_millis(rtt_ms)),
        }
    }

    fn missing(e: crate::Error) -> Vec<Range<u32>> {
        match e {
            crate::Error::Pipeline(p) => match *p {
                PipelineError::Uncovered { missing } => missing,
                other => panic!("{other}"),
            },
            other => panic!("{other}"),
        }
    }

    fn hops(plan: &Plan) -> Vec<(Target, Range<u32>)> {
        plan.hops
            .iter()
            .map(|h| (h.target, h.layers.clone()))
            .collect()
    }

    #[test]
    fn three_stages_chain_in_order() {
        let c = [
            cand(3, 20..30, 300.0, 1),
            cand(1, 0..10, 300.0, 1),
            cand(2, 10..20, 300.0, 1),
        ];
        let p = plan(0..30, &c, &HashSet::new(), &CostModel::default()).unwrap();
        assert_eq!(
            hops(&p),
            vec![
                (Target::Peer(peer(1)), 0..10),
                (Target::Peer(peer(2)), 10..20),
                (Target::Peer(peer(3)), 20..30)
            ]
        );
        // 3 x (1 ms RTT + 0.2 ms overhead + 1000/300 ms compute).
        assert!((p.expected_ms - 3.0 * (1.2 + 1000.0 / 300.0)).abs() < 1e-9);
    }

    #[test]
    fn a_slow_peer_is_skipped_for_a_fast_one() {
        // Peer 1 serves everything but slowly; peers 2 and 3 split it fast.
        let c = [
            cand(1, 0..30, 2.0, 1),
            cand(2, 0..15, 100.0, 5),
            cand(3, 15..30, 100.0, 5),
        ];
        let p = plan(0..30, &c, &HashSet::new(), &CostModel::default()).unwrap();
        assert_eq!(
            hops(&p),
            vec![
                (Target::Peer(peer(2)), 0..15),
                (Target::Peer(peer(3)), 15..30)
            ]
        );
    }

    #[test]
    fn one_whole_model_peer_beats_a_chain_when_rtt_dominates() {
        let c = [
            cand(1, 0..30, 50.0, 2),
            cand(2, 0..15, 60.0, 200),
            cand(3, 15..30, 60.0, 200),
        ];
        let p = plan(0..30, &c, &HashSet::new(), &CostModel::default()).unwrap();
        assert_eq!(hops(&p), vec![(Target::Peer(peer(1)), 0..30)]);
    }

    #[test]
    fn heterogeneous_speeds_split_where_the_fast_peer_helps() {
        // Local serves 0..20 at 40 t/s (0.5 ms per layer... 25 ms/token over
        // 20 layers); a fast peer serves 10..30 at 200 t/s (0.25 ms per layer).
        let local = Candidate {
            target: Target::Local,
            layers: 0..20,
            tokens_per_sec: 40.0,
            rtt: None,
        };
        let c = [local, cand(1, 10..30, 200.0, 1)];
        let p = plan(0..30, &c, &HashSet::new(), &CostModel::default()).unwrap();
        // Layers 10..20 are cheaper on the fast peer (2.5 ms) than locally (12.5 ms).
        assert_eq!(
            hops(&p),
            vec![(Target::Local, 0..10), (Target::Peer(peer(1)), 10..30)]
        );
    }

    #[test]
    fn failed_peers_are_avoided() {
        let c = [
            cand(1, 0..10, 300.0, 1),
            cand(2, 10..20, 300.0, 1),
            cand(4, 10..20, 100.0, 9),
            cand(3, 20..30, 300.0, 1),
        ];
        let avoid: HashSet<PeerId> = [peer(2)].into();
        let p = plan(0..30, &c, &avoid, &CostModel::default()).unwrap();
        assert_eq!(p.hops[1].target, Target::Peer(peer(4)));
        // A sub-range (re-planning a failed hop) uses part of a peer's range.
        let p = plan(12..18, &c, &avoid, &CostModel::default()).unwrap();
        assert_eq!(hops(&p), vec![(Target::Peer(peer(4)), 12..18)]);
    }

    #[test]
    fn no_cover_names_the_missing_layers() {
        let c = [cand(1, 0..10, 300.0, 1), cand(3, 20..28, 300.0, 1)];
        let err = plan(0..30, &c, &HashSet::new(), &CostModel::default()).unwrap_err();
        assert!(err.to_string().contains("10-19, 28-29"), "{err}");
        assert_eq!(missing(err), vec![10..20, 28..30]);
        // Avoiding the only provider of a range uncovers it.
        let avoid: HashSet<PeerId> = [peer(1)].into();
        let err = plan(0..10, &c, &avoid, &CostModel::default()).unwrap_err();
        assert_eq!(missing(err), std::iter::once(0..10).collect::<Vec<_>>());
    }

    #[test]
    fn unknown_rtt_and_speed_use_the_model_defaults() {
        let cost = CostModel::default();
        let c = Candidate {
            target: Target::Peer(peer(1)),
            layers: 0..10,
            tokens_per_sec: 0.0,
            rtt: None,
        };
        let want = 50.0 + 0.2 + 5.0 / 10.0 / 10.0 * 1e3;
        assert!((cost.hop_ms(&c, 5) - want).abs() < 1e-9);
    }
}
