//! Choosing helpers on an open mesh so that one party cannot easily hold
//! every share (threat model: `docs/PRIVATE.md`).
//!
//! Privacy holds while the `n` helpers of a session are not one party; in an
//! open mesh one party can run any number of identities. Identities are
//! free, addresses are not: the owner puts at most one helper per network
//! (IPv4 /24, IPv6 /48) into its pool, judged by the address it sees each
//! peer's connection come from, never by what the peer announces. Peers the
//! owner trusts by id (an allow-list now, stake on the ledger later) are
//! exempt: the owner vouches that they are independent parties.

use std::collections::HashSet;
use std::time::Duration;

use crate::network::{Multiaddr, PeerId};

/// A node that answered a helper hello with a valid signed key.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The node.
    pub peer: PeerId,
    /// Remote addresses of its connections as this node sees them.
    pub observed: Vec<Multiaddr>,
    /// Measured round trip, if known.
    pub rtt: Option<Duration>,
}

/// How helpers are chosen.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelectionPolicy {
    /// Peers vouched for by the owner: exempt from the one-per-network rule
    /// and preferred over others.
    pub trusted: Vec<PeerId>,
    /// Allow several untrusted helpers on one network (never on an open
    /// mesh: one party could then hold every share; for closed test meshes).
    pub allow_same_network: bool,
}

/// The network a connection comes from: an IPv4 /24 or IPv6 /48, or
/// `None` for an address without an IP (relay circuits, in-memory links).
pub fn network_of(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => {
            let o = ip.octets();
            Some(format!("{}.{}.{}.0/24", o[0], o[1], o[2]))
        }
        Protocol::Ip6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                let o = v4.octets();
                return Some(format!("{}.{}.{}.0/24", o[0], o[1], o[2]));
            }
            let s = ip.segments();
            Some(format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2]))
        }
        _ => None,
    })
}

/// The networks a candidate is seen on; a candidate seen on none (no IP
/// address) counts as one shared "unknown" network, so such peers cannot
/// fill several positions either.
fn networks(c: &Candidate) -> Vec<String> {
    let mut n: Vec<String> = c.observed.iter().filter_map(network_of).collect();
    n.sort();
    n.dedup();
    if n.is_empty() {
        n.push("unknown".into());
    }
    n
}

/// Why selection found too few helpers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// Helpers needed (active plus spares).
    pub needed: usize,
    /// Helpers that could be used.
    pub found: usize,
    /// Candidates that answered at all.
    pub candidates: usize,
    /// Candidates left out because their network already holds a helper.
    pub same_network: usize,
}

/// Picks `needed` helpers from `candidates` (never `me`): trusted peers
/// first, then the others by measured round trip (unknown last), at most
/// one untrusted helper per network (see the module docs). Deterministic for
/// the same input.
pub fn select_helpers(
    candidates: &[Candidate],
    needed: usize,
    me: &PeerId,
    policy: &SelectionPolicy,
) -> Result<Vec<Candidate>, Shortfall> {
    let trusted: HashSet<&PeerId> = policy.trusted.iter().collect();
    let mut order: Vec<&Candidate> = candidates.iter().filter(|c| c.peer != *me).collect();
    order.sort_by(|a, b| {
        let key = |c: &Candidate| (!trusted.contains(&c.peer), c.rtt.is_none(), c.rtt);
        key(a)
            .cmp(&key(b))
            .then_with(|| a.peer.to_bytes().cmp(&b.peer.to_bytes()))
    });
    order.dedup_by(|a, b| a.peer == b.peer);
    let mut taken: HashSet<String> = HashSet::new();
    let mut chosen = Vec::new();
    let mut same_network = 0;
    for c in &order {
        if chosen.len() == needed {
            break;
        }
        if !trusted.contains(&c.peer) && !policy.allow_same_network {
            let nets = networks(c);
            if nets.iter().any(|n| taken.contains(n)) {
                same_network += 1;
                continue;
            }
            taken.extend(nets);
        }
        chosen.push((*c).clone());
    }
    if chosen.len() < needed {
        return Err(Shortfall {
            needed,
            found: chosen.len(),
            candidates: order.len(),
            same_network,
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::Identity;

    fn peer(i: u8) -> PeerId {
        Identity::from_seed([i; 32]).peer_id()
    }

    fn cand(i: u8, addr: &str, rtt_ms: Option<u64>) -> Candidate {
        Candidate {
            peer: peer(i),
            observed: vec![addr.parse().unwrap()],
            rtt: rtt_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn a_swarm_on_one_address_fills_one_position() {
        // 50 identities behind one address, all fast; 3 honest nodes elsewhere, slower.
        let mut c: Vec<Candidate> = (1..=50)
            .map(|i| cand(i, "/ip4/203.0.113.7/tcp/4001", Some(1)))
            .collect();
        c.push(cand(60, "/ip4/198.51.100.1/tcp/4001", Some(40)));
        c.push(cand(61, "/ip6/2001:db8:1::1/tcp/4001", Some(50)));
        c.push(cand(62, "/ip4/192.0.2.9/udp/4001/quic-v1", Some(60)));
        let me = peer(200);
        let chosen = select_helpers(&c, 4, &me, &SelectionPolicy::default()).unwrap();
        let swarm = chosen
            .iter()
            .filter(|x| x.observed == c[0].observed)
            .count();
        assert_eq!(swarm, 1, "{chosen:?}");
        assert_eq!(chosen.len(), 4);
        // Asking for more than there are networks fails, saying why.
        let short = select_helpers(&c, 5, &me, &SelectionPolicy::default()).unwrap_err();
        assert_eq!(short.found, 4);
        assert_eq!(short.same_network, 49);
        // The swarm's other addresses in the same /24 do not help it.
        let mut c2 = c.clone();
        c2[1].observed = vec!["/ip4/203.0.113.99/tcp/1".parse().unwrap()];
        let chosen = select_helpers(&c2, 4, &me, &SelectionPolicy::default()).unwrap();
        assert_eq!(
            chosen
                .iter()
                .filter(|x| network_of(&x.observed[0]).unwrap() == "203.0.113.0/24")
                .count(),
            1
        );
    }

    #[test]
    fn peers_without_an_ip_share_one_position() {
        let c: Vec<Candidate> = (1..=5)
            .map(|i| Candidate {
                peer: peer(i),
                observed: vec![],
                rtt: None,
            })
            .collect();
        let short = select_helpers(&c, 2, &peer(100), &SelectionPolicy::default()).unwrap_err();
        assert_eq!(short.found, 1);
    }

    #[test]
    fn trusted_peers_are_exempt_and_first() {
        let c: Vec<Candidate> = (1..=4)
            .map(|i| cand(i, "/ip4/127.0.0.1/tcp/1", Some(u64::from(10 - i))))
            .collect();
        let policy = SelectionPolicy {
            trusted: vec![peer(1), peer(2), peer(3)],
            ..SelectionPolicy::default()
        };
        let chosen = select_helpers(&c, 3, &peer(100), &policy).unwrap();
        // Trusted, by rtt: 3 (7 ms), 2 (8 ms), 1 (9 ms).
        let ids: Vec<PeerId> = chosen.iter().map(|c| c.peer).collect();
        assert_eq!(ids, vec![peer(3), peer(2), peer(1)]);
        // A fourth untrusted on the same network still fits (trusted take no network).
        assert_eq!(select_helpers(&c, 4, &peer(100), &policy).unwrap().len(), 4);
        // Never the owner itself.
        let chosen = select_helpers(&c, 3, &peer(3), &policy).unwrap();
        assert!(chosen.iter().all(|x| x.peer != peer(3)));
    }

    #[test]
    fn networks_are_v4_24_and_v6_48() {
        let n = |s: &str| network_of(&s.parse().unwrap());
        assert_eq!(n("/ip4/10.1.2.3/tcp/1").unwrap(), "10.1.2.0/24");
        assert_eq!(
            n("/ip6/2001:db8:aa:bb::1/tcp/1").unwrap(),
            "2001:db8:aa::/48"
        );
        assert_eq!(n("/ip6/::ffff:10.1.2.3/tcp/1").unwrap(), "10.1.2.0/24");
        assert_eq!(n("/dns4/example.com/tcp/1"), None);
    }
}
