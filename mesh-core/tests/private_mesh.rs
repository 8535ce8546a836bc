//! Private inference across peers over the in-memory network: helper nodes
//! answer `mesh/helper/1`, an owner node generates with `Mode::Private`,
//! liars and dead helpers are replaced by spares without changing a token,
//! and a mesh without helpers is a typed error. (Real processes over
//! loopback: `examples/cli/tests/mesh_private.rs`.)

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::delegate::helper::{Cheat, HelperConfig};
use mesh_core::delegate::private::HelperFailureKind;
use mesh_core::delegate::select::SelectionPolicy;
use mesh_core::engine::{Engine, EngineOptions, GgmlEngine};
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::network::memory::MemoryNet;
use mesh_core::network::{Identity, Limits, PeerId};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeOptions, PrivateConfig};
use mesh_core::sampling::SamplerParams;
use mesh_core::Error;

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):",
    "Photosynthesis is the process by which plants",
];

/// The default model with exact accumulation: the owner's own products
/// (attention) are then exact like the helpers', and private greedy tokens
/// equal local exact ones.
fn exact_engine() -> Arc<GgmlEngine> {
    let opts = EngineOptions::new().threads(common::THREADS).exact(true);
    Arc::new(GgmlEngine::load_with(common::model_path(), &opts).expect("exact accumulation"))
}

struct Mesh {
    net: MemoryNet,
    helpers: Vec<Node>,
    owner: Node,
}

/// One helper node per entry of `faults` (serving the whole model and
/// helping with it) and an owner node that trusts the helpers at `trusted`
/// (in-memory peers have no IP address, so at most one untrusted helper fits).
fn mesh(
    rt: &tokio::runtime::Runtime,
    engine: &Arc<GgmlEngine>,
    faults: &[Option<Cheat>],
    trusted: &[usize],
    helper_timeout: Duration,
) -> Mesh {
    let net = MemoryNet::new(11);
    let helpers: Vec<Node> = faults
        .iter()
        .map(|fault| {
            let identity = Identity::ephemeral();
            let options = NodeOptions {
                helper: HelperConfig {
                    fault: *fault,
                    ..HelperConfig::default()
                },
                ..NodeOptions::default()
            };
            let n = net.add_node(identity.clone(), Limits::default());
            Node::with_network(Arc::new(n), rt.handle().clone(), options)
                .with_identity(identity)
                .unwrap()
        })
        .collect();
    let trusted: Vec<PeerId> = trusted.iter().map(|&i| helpers[i].peer_id()).collect();
    let owner_options = NodeOptions {
        private: PrivateConfig {
            find_timeout: Duration::from_secs(3),
            helper_timeout,
            selection: SelectionPolicy {
                trusted,
                ..SelectionPolicy::default()
            },
            cache_dir: None,
        },
        ..NodeOptions::default()
    };
    let owner = Node::with_network(
        Arc::new(net.add_node(Identity::ephemeral(), Limits::default())),
        rt.handle().clone(),
        owner_options,
    );
    let hub = owner.listen_addrs().unwrap()[0].clone();
    for h in &helpers {
        h.dial(hub.clone()).unwrap();
        h.serve_helper(engine.clone()).unwrap();
    }
    Mesh {
        net,
        helpers,
        owner,
    }
}

fn request(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(
        Prompt::Text(prompt.into()),
        GenerateParams {
            max_tokens,
            sampler: SamplerParams::greedy(),
            ignore_eos: true,
            ..GenerateParams::default()
        },
    )
}

#[test]
fn private_generation_across_peers_gives_local_exact_tokens() {
    let rt = common::runtime();
    let engine = exact_engine();
    let all = [0, 1, 2];
    let m = mesh(
        &rt,
        &engine,
        &[None, None, None],
        &all,
        Duration::from_secs(20),
    );
    let helper_ids: Vec<PeerId> = m.helpers.iter().map(|h| h.peer_id()).collect();
    for prompt in PROMPTS {
        let req = request(prompt, 16);
        let local = m
            .owner
            .generate(&engine, &req, Mode::Local, None, &mut |_| true)
            .unwrap();
        let private = m
            .owner
            .generate(
                &engine,
                &req,
                Mode::Private {
                    helpers: 2,
                    spares: 1,
                },
                None,
                &mut |_| true,
            )
            .unwrap();
        assert_eq!(private.output.token_ids, local.output.token_ids, "{prompt}");
        let report = private.private.expect("a private report");
        assert_eq!(report.stats.checks_failed, 0);
        assert!(report.dropped.is_empty());
        assert_eq!(report.helpers.len(), 3);
        assert!(report.helpers.iter().all(|p| helper_ids.contains(p)));
        assert!(!report.helpers.contains(&m.owner.peer_id()));
        // Four round trips per layer plus the head, per decode token.
        let n_layers = engine.info().n_layers as u64;
        assert_eq!(
            report.decode.round_trips,
            report.decode_steps * (4 * n_layers + 1)
        );
        assert!(report.decode.helper_nanos >= report.decode.helper_compute_nanos);
    }
    // The helpers opened one session per generation and were told to close them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while m
        .helpers
        .iter()
        .any(|h| h.helper_server().unwrap().sessions() > 0)
    {
        assert!(Instant::now() < deadline, "helper sessions left open");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_lying_stale_stalled_or_failing_helper_is_replaced_without_changing_tokens() {
    let rt = common::runtime();
    let engine = exact_engine();
    let req = request(PROMPTS[0], 8);
    let reference = {
        let mut s = engine.new_session(64).unwrap();
        let ids = mesh_core::generate::tokenize_prompt(&*engine, &req.prompt).unwrap();
        mesh_core::generate::generate(&*engine, &mut s, &ids, &req.params, None, &mut |_| true)
            .unwrap()
            .token_ids
    };
    for fault in [
        Cheat::FlipBit,
        Cheat::StaleEnvelope,
        Cheat::Stall,
        Cheat::Fail,
    ] {
        // Helper 0 misbehaves; 0 and 1 are trusted (so they hold the shares),
        // 2 is the one untrusted helper that fits: the spare.
        let m = mesh(
            &rt,
            &engine,
            &[Some(fault), None, None],
            &[0, 1],
            Duration::from_secs(2),
        );
        let out = m
            .owner
            .generate(
                &engine,
                &req,
                Mode::Private {
                    helpers: 2,
                    spares: 1,
                },
                None,
                &mut |_| true,
            )
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(out.output.token_ids, reference, "{fault:?}");
        let report = out.private.unwrap();
        assert_eq!(report.dropped.len(), 1, "{fault:?}: {:?}", report.dropped);
        let dropped = &report.dropped[0];
        assert_eq!(
            report.helpers[dropped.helper],
            m.helpers[0].peer_id(),
            "{fault:?}: the wrong helper was dropped"
        );
        assert!(!report
            .active
            .iter()
            .any(|&i| report.helpers[i] == m.helpers[0].peer_id()));
        if fault == Cheat::FlipBit {
            assert_eq!(report.stats.checks_failed, 1);
        }
    }
}

#[test]
fn helpers_gone_is_a_typed_error_without_a_hang() {
    let rt = common::runtime();
    let engine = exact_engine();
    // Not enough helpers: the one untrusted rule leaves one usable.
    let m = mesh(&rt, &engine, &[None, None], &[], Duration::from_secs(2));
    let mode = Mode::Private {
        helpers: 2,
        spares: 0,
    };
    match m
        .owner
        .generate(&engine, &request(PROMPTS[0], 4), mode, None, &mut |_| true)
    {
        Err(Error::NotEnoughHelpers {
            needed,
            found,
            candidates,
            same_network,
            ..
        }) => {
            assert_eq!((needed, found, candidates, same_network), (2, 1, 2, 1));
        }
        other => panic!("expected NotEnoughHelpers, got {other:?}"),
    }
    // Trusted helpers that die mid-generation: an error naming them, in time.
    let m = mesh(&rt, &engine, &[None, None], &[0, 1], Duration::from_secs(2));
    let pieces = AtomicUsize::new(0);
    let ids: Vec<PeerId> = m.helpers.iter().map(|h| h.peer_id()).collect();
    let start = Instant::now();
    let result = m
        .owner
        .generate(&engine, &request(PROMPTS[1], 32), mode, None, &mut |_| {
            if pieces.fetch_add(1, Ordering::SeqCst) == 2 {
                for id in &ids {
                    m.net.kill(*id);
                }
            }
            true
        });
    let e = result.expect_err("helpers were killed");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    // Typed: which helpers, where, and why.
    match &e {
        Error::Helper(f) => {
            assert_eq!(f.kind, HelperFailureKind::NoAnswer, "{e}");
            assert!(!f.helpers.is_empty(), "{e}");
            let named: Vec<&str> = f.helpers.iter().map(|(_, p)| p.as_str()).collect();
            assert!(
                named
                    .iter()
                    .all(|p| ids.iter().any(|id| id.to_string() == *p)),
                "{named:?}"
            );
        }
        other => panic!("expected Error::Helper, got {other:?}"),
    }
}

/// A LoRA adapter on a few projections of `engine`'s model (deterministic values).
fn small_adapter(engine: &GgmlEngine) -> Arc<mesh_core::engine::LoraAdapter> {
    let info = engine.info();
    let (d, ff) = (info.n_embd as u64, info.n_ff as u64);
    let rank = 4u64;
    let values = |n: u64, seed: u64| -> Vec<f32> {
        (0..n)
            .map(|i| {
                let z = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / 8.0
            })
            .collect()
    };
    let mut tensors = Vec::new();
    for (layer, kind, cols, rows) in [
        (0, "attn_q", d, d),
        (5, "ffn_down", ff, d),
        (15, "ffn_up", d, ff),
        (29, "attn_output", d, d),
    ] {
        let base = format!("blk.{layer}.{kind}.weight");
        tensors.push((
            format!("{base}.lora_a"),
            [cols, rank],
            values(cols * rank, layer),
        ));
        tensors.push((
            format!("{base}.lora_b"),
            [rank, rows],
            values(rank * rows, layer + 100),
        ));
    }
    let bytes = mesh_core::engine::lora::adapter_bytes("llama", 8.0, &tensors);
    Arc::new(mesh_core::engine::LoraAdapter::from_bytes(&bytes, info).unwrap())
}

#[test]
fn adapters_apply_at_the_owner_in_private_mode_and_stages_without_them_refuse() {
    let rt = common::runtime();
    let engine = exact_engine();
    let m = mesh(
        &rt,
        &engine,
        &[None, None],
        &[0, 1],
        Duration::from_secs(20),
    );
    let adapter = small_adapter(&engine);
    let mut changed = 0;
    for prompt in PROMPTS {
        let base = request(prompt, 12);
        let mut req = base.clone();
        req.adapters = vec![mesh_core::engine::ActiveLora::new(adapter.clone(), 1.0)];
        let local = m
            .owner
            .generate(&engine, &req, Mode::Local, None, &mut |_| true)
            .unwrap();
        let private = m
            .owner
            .generate(
                &engine,
                &req,
                Mode::Private {
                    helpers: 2,
                    spares: 0,
                },
                None,
                &mut |_| true,
            )
            .unwrap();
        // Helpers compute W x only; the owner adds the rank-r path: the
        // tokens are those of local generation with the adapter.
        assert_eq!(private.output.token_ids, local.output.token_ids, "{prompt}");
        let plain = m
            .owner
            .generate(&engine, &base, Mode::Local, None, &mut |_| true)
            .unwrap();
        if plain.output.token_ids != local.output.token_ids {
            changed += 1;
        }
        // No stage of this mesh holds the adapter: a pipeline must not run
        // without it (tests/pipeline.rs runs one whose stages hold it).
        match m
            .owner
            .generate(&engine, &req, Mode::Pipeline, None, &mut |_| true)
        {
            Err(Error::Pipeline(p)) => assert!(
                matches!(
                    *p,
                    mesh_core::pipeline::PipelineError::Stage {
                        code: mesh_core::pipeline::protocol::ErrorCode::AdapterMissing,
                        ..
                    }
                ),
                "{p}"
            ),
            other => panic!("pipeline with an adapter: {:?}", other.map(|o| o.output)),
        }
    }
    assert!(changed > 0, "the adapter changed no prompt's tokens");
}
