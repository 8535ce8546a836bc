//! Mesh simulations on the in-memory network ([`super::memory`]).
//!
//! [`simulate`] starts `nodes` nodes that join one after another through a
//! random earlier node and each announce one layer range of one model, then
//! applies churn (random joins and leaves, half of the leaves abrupt kills and
//! half graceful shutdowns; the last live provider of a range never leaves),
//! then checks in rounds until every live node finds, with
//! [`Network::find_providers`], a live provider of every layer range.
//!
//! Run it on a current-thread runtime with paused time (as the tests do:
//! `#[tokio::test(start_paused = true)]`): it then runs in virtual time, takes
//! a few seconds of wall-clock time for hundreds of nodes, and the same
//! config gives the same [`SimReport`] (except `wall_time`).

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::memory::{LinkConfig, MemoryConfig, MemoryNet, MemoryNetwork, NetStats};
use super::{Announcement, Identity, Limits, Network};
use crate::model_id::ModelId;
use crate::Result;

/// What to simulate.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Nodes started at the beginning.
    pub nodes: usize,
    /// Seed of every random choice (identities, ranges, latencies, churn, loss).
    pub seed: u64,
    /// Models served.
    pub models: usize,
    /// Layers of each model.
    pub layers_per_model: u32,
    /// Each model is split into this many contiguous layer ranges.
    pub ranges_per_model: u32,
    /// The initial nodes join at random times within this window.
    pub join_window: Duration,
    /// Nodes joining during the churn window.
    pub churn_joins: usize,
    /// Nodes leaving during the churn window.
    pub churn_leaves: usize,
    /// Churn happens at random times within this window, after the join window.
    pub churn_window: Duration,
    /// Each node gets a random access latency in this range; a link's latency
    /// is the sum of its two ends'.
    pub access_latency: Range<Duration>,
    /// Loss rate of every link.
    pub loss: f64,
    /// Kademlia parameters (record TTL, republish interval, request deadline).
    pub memory: MemoryConfig,
    /// Deadline of each `find_providers` in a check round.
    pub find_timeout: Duration,
    /// Pause between check rounds.
    pub check_interval: Duration,
    /// Most check rounds before giving up.
    pub max_rounds: usize,
}

impl Default for SimConfig {
    /// 200 nodes, 2 models of 32 layers in 4 ranges each, 40 joins and 40
    /// leaves, 5–50 ms access latency, records republished every 30 s.
    fn default() -> Self {
        SimConfig {
            nodes: 200,
            seed: 1,
            models: 2,
            layers_per_model: 32,
            ranges_per_model: 4,
            join_window: Duration::from_secs(60),
            churn_joins: 40,
            churn_leaves: 40,
            churn_window: Duration::from_secs(60),
            access_latency: Duration::from_millis(5)..Duration::from_millis(50),
            loss: 0.0,
            memory: MemoryConfig {
                provider_ttl: Duration::from_secs(120),
                republish_interval: Duration::from_secs(30),
                rpc_timeout: Duration::from_secs(5),
                ..MemoryConfig::default()
            },
            find_timeout: Duration::from_secs(30),
            check_interval: Duration::from_secs(5),
            max_rounds: 40,
        }
    }
}

/// What a simulation measured. Times are virtual.
#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    /// Nodes ever started (initial and churn joins).
    pub nodes_started: usize,
    /// Nodes killed abruptly during churn.
    pub killed: usize,
    /// Nodes shut down gracefully during churn.
    pub shut_down: usize,
    /// Live nodes at the end.
    pub live_nodes: usize,
    /// Layer ranges served (over all models).
    pub ranges: usize,
    /// Whether a check round found a live provider of every range from every live node.
    pub converged: bool,
    /// Check rounds run.
    pub rounds: usize,
    /// From the start to the end of the first fully successful round.
    pub time_to_converge: Duration,
    /// From the last churn event (all joins done) to the end of that round.
    pub time_after_churn: Duration,
    /// Failed (node, range) finds in the first round.
    pub first_round_failures: usize,
    /// `find_providers` calls made by the check rounds.
    pub finds: u64,
    /// Mean virtual duration of one `find_providers` (lookup and describes)
    /// in the last round.
    pub find_time_mean: Duration,
    /// Longest one in the last round.
    pub find_time_max: Duration,
    /// Messages sent during the last round, per `find_providers`.
    pub messages_per_find: f64,
    /// Network counters when the churn ended (all joins and leaves done).
    pub stats_after_churn: NetStats,
    /// Network counters at convergence (or at the end).
    pub stats: NetStats,
    /// Wall-clock time the simulation took.
    pub wall_time: Duration,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nodes started {}, killed {}, shut down {}, live at the end {}, layer ranges {}",
            self.nodes_started, self.killed, self.shut_down, self.live_nodes, self.ranges
        )?;
        writeln!(
            f,
            "converged {} after {} round(s): {:.1} s virtual from the start, {:.1} s after churn \
             ({} failed finds in the first round, {} finds in all)",
            self.converged,
            self.rounds,
            self.time_to_converge.as_secs_f64(),
            self.time_after_churn.as_secs_f64(),
            self.first_round_failures,
            self.finds
        )?;
        writeln!(
            f,
            "last round: find_providers took {:.0} ms on average, {:.0} ms at most, \
             {:.1} messages each",
            self.find_time_mean.as_secs_f64() * 1e3,
            self.find_time_max.as_secs_f64() * 1e3,
            self.messages_per_find
        )?;
        let c = &self.stats_after_churn;
        writeln!(
            f,
            "joins and churn: messages sent {}, delivered {} ({:.1} MB), kademlia messages {}, \
             lookups {}, gossip messages {}, connections {}",
            c.messages_sent,
            c.messages_delivered,
            c.bytes_delivered as f64 / 1e6,
            c.kad_messages,
            c.lookups,
            c.gossip_messages,
            c.connections
        )?;
        let s = &self.stats;
        writeln!(
            f,
            "in all: messages sent {}, delivered {} ({:.1} MB), lost {}, dropped {}; kademlia messages {}, \
             lookups {}, requests {}, gossip messages {}, connections {}",
            s.messages_sent,
            s.messages_delivered,
            s.bytes_delivered as f64 / 1e6,
            s.messages_lost,
            s.messages_dropped,
            s.kad_messages,
            s.lookups,
            s.requests,
            s.gossip_messages,
            s.connections
        )?;
        write!(f, "wall-clock time {:.2} s", self.wall_time.as_secs_f64())
    }
}

struct SimNode {
    net: MemoryNetwork,
    range: usize,
    alive: bool,
    ms: u64,
}

fn limits() -> Limits {
    Limits {
        max_connections: 4096,
        ..Limits::default()
    }
}

/// Starts node number `i` serving range `range` (index into `ranges`).
fn start_node(
    net: &MemoryNet,
    rng: &mut ChaCha8Rng,
    cfg: &SimConfig,
    nodes: &mut Vec<SimNode>,
    range: usize,
) -> usize {
    let identity = Identity::from_seed(rng.gen());
    let handle = net.add_node(identity, limits());
    let lo = cfg.access_latency.start.as_millis() as u64;
    let hi = (cfg.access_latency.end.as_millis() as u64).max(lo + 1);
    let ms = rng.gen_range(lo..hi);
    for other in nodes.iter().filter(|n| n.alive) {
        net.set_link(
            handle.local_peer_id(),
            other.net.local_peer_id(),
            LinkConfig {
                latency: Duration::from_millis(ms + other.ms),
                bandwidth_bytes_per_sec: None,
                loss: cfg.loss,
            },
        );
    }
    nodes.push(SimNode {
        net: handle,
        range,
        alive: true,
        ms,
    });
    nodes.len() - 1
}

/// Joins node `i` through a random live earlier node and announces its range.
fn join(
    set: &mut JoinSet<()>,
    rng: &mut ChaCha8Rng,
    nodes: &[SimNode],
    i: usize,
    announcement: Announcement,
) {
    let live: Vec<usize> = (0..nodes.len())
        .filter(|&j| j != i && nodes[j].alive)
        .collect();
    let bootstrap =
        (!live.is_empty()).then(|| nodes[live[rng.gen_range(0..live.len())]].net.addr());
    let node = nodes[i].net.clone();
    set.spawn(async move {
        if let Some(addr) = bootstrap {
            let _ = node.dial(addr).await;
        }
        let _ = node.announce(announcement).await;
    });
}

/// Runs a simulation (see the module docs).
pub async fn simulate(cfg: SimConfig) -> Result<SimReport> {
    let wall = std::time::Instant::now();
    let start = Instant::now();
    let net = MemoryNet::with_config(cfg.seed, cfg.memory.clone());
    net.set_default_link(LinkConfig {
        latency: cfg.access_latency.end.saturating_mul(2),
        bandwidth_bytes_per_sec: None,
        loss: cfg.loss,
    });
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed_5eed_5eed_5eed);
    let per_range = (cfg.layers_per_model / cfg.ranges_per_model.max(1)).max(1);
    let mut ranges: Vec<Announcement> = Vec::new();
    for m in 0..cfg.models {
        let model = ModelId(*blake3::hash(format!("sim-model-{m}").as_bytes()).as_bytes());
        let n = cfg.ranges_per_model.max(1);
        for r in 0..n {
            let a = r * per_range;
            let b = if r + 1 == n {
                cfg.layers_per_model
            } else {
                ((r + 1) * per_range).min(cfg.layers_per_model)
            };
            if a < b {
                ranges.push(Announcement {
                    model,
                    layers: a..b,
                    free_memory: 8 << 30,
                    tokens_per_sec: 20.0,
                });
            }
        }
    }
    if ranges.is_empty() {
        return Err(crate::Error::InvalidArgument(
            "simulate: expected at least one model with layers".into(),
        ));
    }
    let announcement_for = |range: usize, rng: &mut ChaCha8Rng| {
        let mut a = ranges[range].clone();
        a.free_memory = rng.gen_range(1u64..64) << 30;
        a.tokens_per_sec = rng.gen_range(1.0..100.0);
        a
    };

    // Initial joins, at sorted random times within the join window.
    let mut nodes: Vec<SimNode> = Vec::new();
    let mut set = JoinSet::new();
    let window_ms = cfg.join_window.as_millis().max(1) as u64;
    let mut times: Vec<u64> = (0..cfg.nodes)
        .map(|_| rng.gen_range(0..window_ms))
        .collect();
    times.sort_unstable();
    for (i, t) in times.into_iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(t)).await;
        let range = if i < ranges.len() {
            i
        } else {
            rng.gen_range(0..ranges.len())
        };
        let idx = start_node(&net, &mut rng, &cfg, &mut nodes, range);
        let a = announcement_for(range, &mut rng);
        join(&mut set, &mut rng, &nodes, idx, a);
    }

    // Churn.
    let churn_start = start + cfg.join_window;
    let churn_ms = cfg.churn_window.as_millis().max(1) as u64;
    let mut events: Vec<(u64, bool)> = Vec::new();
    for i in 0..cfg.churn_joins + cfg.churn_leaves {
        events.push((rng.gen_range(0..churn_ms), i < cfg.churn_joins));
    }
    events.sort_unstable();
    let (mut killed, mut shut_down) = (0, 0);
    for (t, is_join) in events {
        tokio::time::sleep_until(churn_start + Duration::from_millis(t)).await;
        if is_join {
            let range = rng.gen_range(0..ranges.len());
            let idx = start_node(&net, &mut rng, &cfg, &mut nodes, range);
            let a = announcement_for(range, &mut rng);
            join(&mut set, &mut rng, &nodes, idx, a);
            continue;
        }
        // A leave: never the last live provider of its range.
        let leavable: Vec<usize> = (0..nodes.len())
            .filter(|&i| {
                nodes[i].alive
                    && nodes
                        .iter()
                        .filter(|n| n.alive && n.range == nodes[i].range)
                        .count()
                        > 1
            })
            .collect();
        if leavable.is_empty() {
            continue;
        }
        let i = leavable[rng.gen_range(0..leavable.len())];
        nodes[i].alive = false;
        if rng.gen_bool(0.5) {
            net.kill(nodes[i].net.local_peer_id());
            killed += 1;
        } else {
            let node = nodes[i].net.clone();
            set.spawn(async move {
                let _ = node.shutdown().await;
            });
            shut_down += 1;
        }
    }
    while set.join_next().await.is_some() {}
    let churn_end = Instant::now();
    let stats_after_churn = net.stats();

    // Check rounds: every live node looks for every range.
    let mut rounds = 0;
    let mut finds = 0u64;
    let mut converged = false;
    let mut first_round_failures = 0;
    let (mut find_time_mean, mut find_time_max) = (Duration::ZERO, Duration::ZERO);
    let mut messages_per_find = 0.0;
    let live: Vec<MemoryNetwork> = nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| n.net.clone())
        .collect();
    let targets: Vec<(ModelId, u32)> = ranges.iter().map(|a| (a.model, a.layers.start)).collect();
    while rounds < cfg.max_rounds {
        rounds += 1;
        let mut checks = JoinSet::new();
        for node in &live {
            for &(model, layer) in &targets {
                let node = node.clone();
                let net = net.clone();
                let timeout = cfg.find_timeout;
                checks.spawn(async move {
                    let t = Instant::now();
                    let ok = match node.find_providers(model, Some(layer), timeout).await {
                        Ok(found) => found
                            .iter()
                            .any(|p| p.layers.contains(&layer) && net.is_alive(&p.peer_id)),
                        Err(_) => false,
                    };
                    (ok, t.elapsed())
                });
                finds += 1;
            }
        }
        let before = net.stats().messages_sent;
        let (mut failures, mut total, mut n) = (0, Duration::ZERO, 0u32);
        find_time_max = Duration::ZERO;
        while let Some(done) = checks.join_next().await {
            match done {
                Ok((ok, took)) => {
                    failures += usize::from(!ok);
                    total += took;
                    n += 1;
                    find_time_max = find_time_max.max(took);
                }
                Err(_) => failures += 1,
            }
        }
        find_time_mean = total / n.max(1);
        messages_per_find = (net.stats().messages_sent - before) as f64 / f64::from(n.max(1));
        if rounds == 1 {
            first_round_failures = failures;
        }
        if failures == 0 {
            converged = true;
            break;
        }
        tokio::time::sleep(cfg.check_interval).await;
    }
    let end = Instant::now();
    let stats = net.stats();
    let report = SimReport {
        nodes_started: nodes.len(),
        killed,
        shut_down,
        live_nodes: live.len(),
        ranges: ranges.len(),
        converged,
        rounds,
        time_to_converge: end - start,
        time_after_churn: end - churn_end,
        first_round_failures,
        finds,
        find_time_mean,
        find_time_max,
        messages_per_find,
        stats_after_churn,
        stats,
        wall_time: wall.elapsed(),
    };
    net.kill_all();
    Ok(report)
}
