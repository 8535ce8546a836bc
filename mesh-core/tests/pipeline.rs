//! Pipeline inference across peers over the in-memory network: a model's
//! layers on three stage nodes, generation from a fourth, failover when a
//! stage dies, typed errors when nothing is left, hostile stage requests.
//! (Time per token against the latency model: `pipeline_timing.rs`.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::engine::lora::{self, ActiveLora, LoraAdapter};
use mesh_core::engine::{Engine, GgmlEngine, Projection};
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::network::memory::{LinkConfig, MemoryNet};
use mesh_core::network::{Identity, Limits, PeerId};
use mesh_core::node::{
    GenerateRequest, Mode, Node, NodeEvent, NodeOptions, NodeOutput, PipelineReport,
};
use mesh_core::pipeline::client::{PipelineConfig, PipelineEvent, PipelineStats};
use mesh_core::pipeline::planner::Target;
use mesh_core::pipeline::protocol::{
    encode_request, encode_rows, AdapterRef, CloseMsg, DType, ErrorCode, ForwardMsg, OpenMsg,
    StageOp, StageReply, TruncateMsg,
};
use mesh_core::pipeline::server::{StageConfig, StageServer};
use mesh_core::pipeline::PipelineError;
use mesh_core::sampling::SamplerParams;
use mesh_core::Error;

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
];

fn engine() -> Arc<GgmlEngine> {
    Arc::new(GgmlEngine::load(common::model_path(), common::THREADS).unwrap())
}

fn options() -> NodeOptions {
    NodeOptions {
        stage: StageConfig::default(),
        pipeline: PipelineConfig {
            stage_timeout: Duration::from_secs(5),
            find_timeout: Duration::from_secs(3),
            ..PipelineConfig::default()
        },
        ..NodeOptions::default()
    }
}

/// A mesh of stage nodes serving `ranges` plus a client node, all connected.
struct Mesh {
    net: MemoryNet,
    stages: Vec<Node>,
    client: Node,
}

fn mesh(rt: &tokio::runtime::Runtime, engine: &Arc<GgmlEngine>, ranges: &[(u32, u32)]) -> Mesh {
    mesh_with(rt, engine, ranges, options())
}

/// [`mesh`] with the client node's options.
fn mesh_with(
    rt: &tokio::runtime::Runtime,
    engine: &Arc<GgmlEngine>,
    ranges: &[(u32, u32)],
    client_options: NodeOptions,
) -> Mesh {
    let net = MemoryNet::new(7);
    let add = |options: NodeOptions| {
        let n = net.add_node(Identity::ephemeral(), Limits::default());
        Node::with_network(Arc::new(n), rt.handle().clone(), options)
    };
    let node = || add(options());
    let client = add(client_options);
    let stages: Vec<Node> = ranges.iter().map(|_| node()).collect();
    let hub = client.listen_addrs().unwrap()[0].clone();
    for s in &stages {
        s.dial(hub.clone()).unwrap();
    }
    for (s, &(a, b)) in stages.iter().zip(ranges) {
        s.serve(engine.clone(), a..b).unwrap();
    }
    Mesh {
        net,
        stages,
        client,
    }
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampler: SamplerParams::greedy(),
        ignore_eos: true,
        ..GenerateParams::default()
    }
}

fn request(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest::new(Prompt::Text(prompt.into()), greedy(max_tokens))
}

/// Generates `req` locally and through the pipeline of `m`: the tokens must
/// be the same and the plan three hops over 0-10, 10-20, 20-30. Returns the
/// local output and the pipeline's report.
fn same_tokens_through_three_hops(
    m: &Mesh,
    engine: &Arc<GgmlEngine>,
    req: &GenerateRequest,
) -> (NodeOutput, PipelineReport) {
    let local = m
        .client
        .generate(engine, req, Mode::Local, None, &mut |_| true)
        .unwrap();
    let piped = m
        .client
        .generate(engine, req, Mode::Pipeline, None, &mut |_| true)
        .unwrap();
    assert_eq!(
        piped.output.token_ids, local.output.token_ids,
        "{:?}",
        req.prompt
    );
    let report = piped.pipeline.unwrap();
    let plan: Vec<_> = report.plan.iter().map(|h| h.layers.clone()).collect();
    assert_eq!(plan, vec![0..10, 10..20, 20..30]);
    (local, report)
}

/// Decode steps pushed from stage to stage (the default) and hop by hop
/// (`PipelineConfig::push` off) both give local generation's tokens.
#[test]
fn three_stages_give_the_tokens_of_local_generation() {
    let rt = common::runtime();
    let engine = engine();
    for push in [true, false] {
        let mut client = options();
        client.pipeline.push = push;
        let m = mesh_with(&rt, &engine, &[(0, 10), (10, 20), (20, 30)], client);
        for prompt in PROMPTS {
            let (_, report) = same_tokens_through_three_hops(&m, &engine, &request(prompt, 32));
            let stage_ids: Vec<PeerId> = m.stages.iter().map(|s| s.peer_id()).collect();
            for (hop, id) in report.plan.iter().zip(&stage_ids) {
                assert_eq!(hop.target, Target::Peer(*id));
            }
            let stats = &report.stats;
            assert_eq!(stats.failovers, 0);
            assert_eq!(stats.push_fallbacks, 0);
            if push {
                // Every decode step went out once and came back from the
                // last stage with every hop's 576 f32 values.
                assert_eq!(stats.pushed_steps, stats.decode_steps);
                assert_eq!(stats.bytes_per_token(), 4.0 * 576.0 * 4.0);
            } else {
                // 576 f32 values out and back per hop per token.
                assert_eq!(stats.pushed_steps, 0);
                assert_eq!(stats.bytes_per_token(), 3.0 * 2.0 * 576.0 * 4.0);
            }
        }
        // Sessions close when a generation ends.
        std::thread::sleep(Duration::from_millis(300));
        for s in &m.stages {
            assert_eq!(s.stages().session_count(), 0);
        }
    }
}

/// f16 rows between stages (`PipelineConfig::dtype`, off by default) halve
/// the bytes but round every hidden value (relative error <= 2^-11) at each
/// of the two hand-offs. This measures where that changes greedy tokens, on
/// the 15 golden prompts x 32 tokens, and holds it to what rounding can do:
/// a prompt may only diverge from local generation where local generation
/// itself was close (top-2 logit gap < 1.0 at the first differing step; the
/// default model measured 0.000..0.42). A conversion bug (a wrong byte order,
/// a truncation instead of rounding) would diverge at once and far from any
/// tie. The counts printed here are in the README.
#[test]
fn f16_rows_halve_the_bytes_and_change_tokens_only_at_near_ties() {
    const STEPS: usize = 32;
    const NEAR_TIE: f32 = 1.0;
    let rt = common::runtime();
    let engine = engine();
    let mut f16 = options();
    f16.pipeline.dtype = DType::F16;
    let m = mesh_with(&rt, &engine, &[(0, 10), (10, 20), (20, 30)], f16);
    let golden: serde_json::Value = serde_json::from_str(include_str!("data/golden.json")).unwrap();
    let prompts = golden["generate"]["prompts"].as_array().unwrap();
    let (mut same, mut tokens_same, mut gaps) = (0, 0, Vec::new());
    for p in prompts {
        let ids = common::ids(&p["prompt_ids"]);
        let req = GenerateRequest::new(Prompt::Tokens(ids.clone()), greedy(STEPS));
        let local = m
            .client
            .generate(&engine, &req, Mode::Local, None, &mut |_| true)
            .unwrap();
        let piped = m
            .client
            .generate(&engine, &req, Mode::Pipeline, None, &mut |_| true)
            .unwrap();
        let report = piped.pipeline.unwrap();
        // 576 f16 values out, and every hop's back, per token (pushed):
        // half of f32's.
        assert_eq!(report.stats.bytes_per_token(), 4.0 * 576.0 * 2.0);
        let (want, got) = (&local.output.token_ids, &piped.output.token_ids);
        assert_eq!(got.len(), STEPS);
        let Some(step) = want.iter().zip(got).position(|(a, b)| a != b) else {
            same += 1;
            tokens_same += STEPS;
            continue;
        };
        tokens_same += step;
        // Local generation's logits at the first differing step.
        let mut s = engine.new_session(ids.len() + STEPS).unwrap();
        let context = [ids.as_slice(), &want[..step]].concat();
        let logits = engine
            .forward(&context, mesh_core::engine::Logits::Last, &mut s)
            .unwrap();
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let gap = sorted[0] - sorted[1];
        eprintln!(
            "{}: f16 diverges at step {step} (local top-2 gap {gap:.3})",
            p["name"].as_str().unwrap()
        );
        assert!(
            gap < NEAR_TIE,
            "{}: f16 changed a token at step {step}, where local generation's top-2 gap \
             was {gap} (not a near-tie)",
            p["name"]
        );
        gaps.push(gap);
    }
    eprintln!(
        "f16 rows: {same} of {} prompts identical, {tokens_same} of {} tokens before the first \
         difference; divergences at top-2 gaps {gaps:.3?}",
        prompts.len(),
        prompts.len() * STEPS
    );
}

/// Generates through a mesh where two nodes serve 10..20 and whichever the
/// plan picks is failed by `fail` after the 10th token; the tokens must equal
/// local generation's and the failover must replace exactly that peer.
/// Returns the failed peer, the failover events' errors and the stats.
fn fail_the_middle_stage(
    client_options: NodeOptions,
    fail: impl Fn(&Mesh, PeerId),
) -> (PeerId, Vec<String>, PipelineStats) {
    let rt = common::runtime();
    let engine = engine();
    let m = mesh_with(
        &rt,
        &engine,
        &[(0, 10), (10, 20), (10, 20), (20, 30)],
        client_options,
    );
    let req = request(PROMPTS[1], 32);
    let local = m
        .client
        .generate(&engine, &req, Mode::Local, None, &mut |_| true)
        .unwrap();
    let mut events = m.client.events();
    let mut pieces = 0;
    let mut failed = None;
    let out = m
        .client
        .generate(&engine, &req, Mode::Pipeline, None, &mut |_| {
            pieces += 1;
            if pieces == 10 {
                while let Ok(e) = events.try_recv() {
                    if let NodeEvent::Pipeline(PipelineEvent::Plan { hops, .. }) = e {
                        let Target::Peer(p) = hops[1].target else {
                            panic!("middle hop is local")
                        };
                        failed = Some(p);
                    }
                }
                fail(&m, failed.expect("a plan event"));
            }
            true
        })
        .unwrap();
    let failed = failed.unwrap();
    assert_eq!(out.output.token_ids, local.output.token_ids);
    let report = out.pipeline.unwrap();
    assert_eq!(report.stats.failovers, 1);
    assert_eq!(report.stats.failed, vec![failed]);
    assert_eq!(report.plan.len(), 3);
    assert_eq!(report.plan[1].layers, 10..20);
    assert_ne!(report.plan[1].target, Target::Peer(failed));
    let mut errors = Vec::new();
    while let Ok(e) = events.try_recv() {
        if let NodeEvent::Pipeline(PipelineEvent::Failover { peer, error, .. }) = e {
            assert_eq!(peer, failed);
            errors.push(error);
        }
    }
    (failed, errors, report.stats)
}

/// A stage that dies between tokens is seen leaving (its connection
/// closes), and its layers are planned again before any request to it.
#[test]
fn a_stage_killed_mid_generation_fails_over_with_identical_tokens() {
    let (_, errors, stats) = fail_the_middle_stage(options(), |m, peer| assert!(m.net.kill(peer)));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("left the mesh"), "{errors:?}");
    // Seen leaving before the step: it went hop by hop, nothing failed.
    assert_eq!(stats.push_fallbacks, 0);
}

/// A stage that dies while a request is in flight to it (its links made
/// slow, then the node killed halfway): the request fails, and the same
/// failover follows from the failure. Pushed (the default), the step that
/// fails is a pushed one: it is truncated away and run hop by hop.
#[test]
fn a_stage_killed_during_a_request_fails_over_with_identical_tokens() {
    for push in [true, false] {
        let mut client = options();
        client.pipeline.push = push;
        let (_, errors, stats) = fail_the_middle_stage(client, |m, peer| {
            let slow = LinkConfig {
                latency: Duration::from_millis(300),
                ..LinkConfig::default()
            };
            m.net.set_link(m.client.peer_id(), peer, slow.clone());
            for s in m.stages.iter().filter(|s| s.peer_id() != peer) {
                m.net.set_link(s.peer_id(), peer, slow.clone());
            }
            let net = m.net.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                assert!(net.kill(peer));
            });
        });
        assert_eq!(errors.len(), 1);
        assert!(!errors[0].contains("left the mesh"), "{errors:?}");
        assert_eq!(stats.push_fallbacks, u64::from(push), "push {push}");
    }
}

/// A stage that stops answering without disconnecting (a partition drops
/// its messages) fails its request at the stage timeout; the providers are
/// found again without it, and the same failover follows.
#[test]
fn a_stage_that_stops_answering_fails_over_at_the_stage_timeout() {
    let mut client = options();
    client.pipeline.stage_timeout = Duration::from_secs(2);
    let (_, errors, stats) =
        fail_the_middle_stage(client, |m, peer| m.net.partition(&[vec![peer]]));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("timed out"), "{errors:?}");
    assert_eq!(stats.push_fallbacks, 1);
}

#[test]
fn all_stages_gone_is_a_typed_error_within_the_deadline() {
    let rt = common::runtime();
    let engine = engine();
    let m = mesh(&rt, &engine, &[(0, 15), (15, 30)]);
    let req = request(PROMPTS[0], 32);
    let started = Instant::now();
    let mut pieces = 0;
    let ids: Vec<PeerId> = m.stages.iter().map(|s| s.peer_id()).collect();
    let err = m
        .client
        .generate(&engine, &req, Mode::Pipeline, None, &mut |_| {
            pieces += 1;
            if pieces == 5 {
                for id in &ids {
                    m.net.kill(*id);
                }
            }
            true
        })
        .unwrap_err();
    // stage timeout (5 s) + find timeout (3 s), with slack for a busy machine.
    assert!(started.elapsed() < Duration::from_secs(30), "{err}");
    match err {
        Error::Pipeline(p) => match *p {
            PipelineError::FailoverImpossible { missing, .. } => assert!(!missing.is_empty()),
            other => panic!("expected FailoverImpossible, found {other}"),
        },
        other => panic!("expected FailoverImpossible, found {other}"),
    }
    // No provider at all: the missing layers are named up front.
    let lonely = mesh(&rt, &engine, &[(0, 10)]);
    let err = lonely
        .client
        .generate(&engine, &req, Mode::Pipeline, None, &mut |_| true)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Pipeline(p) if matches!(&**p, PipelineError::Uncovered { missing } if missing.len() == 1 && missing[0] == (10..30))),
        "{err}"
    );
    assert!(err.to_string().contains("10-29"), "{err}");
}

#[test]
fn cancel_stops_a_pipeline_generation() {
    let rt = common::runtime();
    let engine = engine();
    let m = mesh(&rt, &engine, &[(0, 30)]);
    let cancel = AtomicBool::new(false);
    let mut n = 0;
    let out = m
        .client
        .generate(
            &engine,
            &request(PROMPTS[2], 64),
            Mode::Pipeline,
            Some(&cancel),
            &mut |_| {
                n += 1;
                if n == 3 {
                    cancel.store(true, Ordering::Relaxed);
                }
                true
            },
        )
        .unwrap();
    assert_eq!(out.output.stop, mesh_core::generate::StopReason::Cancelled);
    assert!(out.output.token_ids.len() < 64);
}

/// A rank-4 LoRA adapter on layers 2, 14 and 25 (one in each stage of a
/// 0-10/10-20/20-30 mesh), strong enough to change greedy tokens.
fn adapter(engine: &GgmlEngine) -> Arc<LoraAdapter> {
    let targets: Vec<(usize, Projection)> = [2, 14, 25]
        .into_iter()
        .flat_map(|l| [(l, Projection::Q), (l, Projection::Down)])
        .collect();
    let bytes = lora::testing::random_adapter(engine.info(), &targets, 4, 0.0, 0.3, 11);
    Arc::new(LoraAdapter::from_bytes(&bytes, engine.info()).unwrap())
}

#[test]
fn stages_apply_the_sessions_adapter_and_one_without_it_is_planned_around() {
    let rt = common::runtime();
    let engine = engine();
    let adapter = adapter(&engine);
    // The second 10-20 stage lacks the adapter: whichever of the two the
    // planner tries first, the chain that runs must hold it everywhere.
    let m = mesh(&rt, &engine, &[(0, 10), (10, 20), (10, 20), (20, 30)]);
    for i in [0, 2, 3] {
        assert_eq!(
            m.stages[i].serve_adapter(adapter.clone()).unwrap(),
            adapter.id()
        );
    }
    let lacking = m.stages[1].peer_id();
    let mut changed = 0;
    for prompt in &PROMPTS[..3] {
        let base = request(prompt, 24);
        let mut req = base.clone();
        req.adapters = vec![ActiveLora::new(adapter.clone(), 0.8)];
        let (local, report) = same_tokens_through_three_hops(&m, &engine, &req);
        assert!(report
            .plan
            .iter()
            .all(|h| h.target != Target::Peer(lacking)));
        let plain = m
            .client
            .generate(&engine, &base, Mode::Local, None, &mut |_| true)
            .unwrap();
        changed += usize::from(plain.output.token_ids != local.output.token_ids);
    }
    // The adapter must matter, or the comparison above proves nothing.
    assert!(changed >= 2, "the adapter changed {changed} of 3 answers");

    // With only the stage that lacks it serving 10-20, the answer says why.
    assert!(m.net.kill(m.stages[2].peer_id()));
    let mut req = request(PROMPTS[0], 4);
    req.adapters = vec![ActiveLora::new(adapter.clone(), 0.8)];
    let err = m
        .client
        .generate(&engine, &req, Mode::Pipeline, None, &mut |_| true)
        .unwrap_err();
    match &err {
        Error::Pipeline(p) => match &**p {
            PipelineError::Stage { peer, code, .. } => {
                assert_eq!(
                    (*peer, *code),
                    (lacking, ErrorCode::AdapterMissing),
                    "{err}"
                )
            }
            other => panic!("expected the stage's refusal, got {other:?}"),
        },
        other => panic!("expected a pipeline error, got {other:?}"),
    }
    assert!(err.to_string().contains(&adapter.id().to_string()), "{err}");
}

#[test]
fn a_stage_holds_only_adapters_of_models_it_serves() {
    let engine = engine();
    let adapter = adapter(&engine);
    let server = StageServer::new(StageConfig::default());
    assert!(matches!(
        server.add_adapter(adapter.clone()),
        Err(Error::InvalidArgument(_))
    ));
    server.add_model(engine.clone(), 0..10);
    server.add_adapter(adapter.clone()).unwrap();
    assert_eq!(server.adapter_ids(), vec![adapter.id()]);
    let me = Identity::from_seed([1; 32]).peer_id();
    let named = |id: [u8; 32]| {
        StageOp::Open(OpenMsg {
            model: engine.info().id.0.to_vec(),
            layer_start: 0,
            layer_end: 10,
            n_ctx: 16,
            exact: false,
            adapters: vec![AdapterRef {
                id: id.to_vec(),
                scale: 1.0,
            }],
        })
    };
    let (reply, _) = call(&server, me, named([7; 32]), Bytes::new());
    assert_eq!(reply.code(), ErrorCode::AdapterMissing);
    assert_eq!(server.session_count(), 0);
    let (reply, _) = call(&server, me, named(adapter.id().0), Bytes::new());
    assert_eq!(reply.code(), ErrorCode::None, "{}", reply.message);
    assert_eq!(server.session_count(), 1);
}

fn call(server: &StageServer, peer: PeerId, op: StageOp, rows: Bytes) -> (StageReply, Bytes) {
    let (meta, tensor) = encode_request(op, rows);
    server.handle(peer, &meta, &tensor)
}

fn open(model: [u8; 32], a: u32, b: u32, n_ctx: u64) -> StageOp {
    StageOp::Open(OpenMsg {
        model: model.to_vec(),
        layer_start: a,
        layer_end: b,
        n_ctx,
        exact: false,
        adapters: Vec::new(),
    })
}

fn fwd(session: u64, pos: u64, n_tokens: u32) -> StageOp {
    StageOp::Forward(ForwardMsg {
        session,
        pos,
        n_tokens,
        dtype: DType::F32 as i32,
        ..ForwardMsg::default()
    })
}

#[test]
fn hostile_stage_requests_get_typed_errors_and_corrupt_nothing() {
    let engine = engine();
    let info = engine.info().clone();
    let n_embd = info.n_embd;
    let server = StageServer::new(StageConfig {
        kv_budget_bytes: engine.kv_bytes_for(10, 256).unwrap() as u64 * 2,
        ..StageConfig::default()
    });
    server.add_model(engine.clone(), 10..20);
    let me = Identity::from_seed([1; 32]).peer_id();
    let other = Identity::from_seed([2; 32]).peer_id();
    let id = info.id.0;
    let code = |r: &(StageReply, Bytes)| r.0.code();

    assert_eq!(
        code(&call(&server, me, open([9; 32], 10, 20, 64), Bytes::new())),
        ErrorCode::WrongModel
    );
    assert_eq!(
        code(&call(&server, me, open(id, 5, 20, 64), Bytes::new())),
        ErrorCode::LayersNotServed
    );
    let exact = StageOp::Open(OpenMsg {
        model: id.to_vec(),
        layer_start: 10,
        layer_end: 20,
        n_ctx: 64,
        exact: true,
        adapters: Vec::new(),
    });
    assert_eq!(
        code(&call(&server, me, exact, Bytes::new())),
        ErrorCode::ModeMismatch
    );
    assert_eq!(
        code(&call(&server, me, open(id, 10, 20, 1 << 19), Bytes::new())),
        ErrorCode::TooLarge
    );
    let (reply, _) = call(&server, me, open(id, 12, 18, 256), Bytes::new());
    assert_eq!(reply.code(), ErrorCode::None, "{}", reply.message);
    let s = reply.session;
    // Budget: a second 256-position session fits, a third does not.
    let (second, _) = call(&server, me, open(id, 10, 20, 256), Bytes::new());
    assert_eq!(second.code(), ErrorCode::None);
    assert_eq!(
        code(&call(&server, me, open(id, 10, 20, 256), Bytes::new())),
        ErrorCode::Busy
    );
    assert_eq!(
        code(&call(
            &server,
            me,
            StageOp::Close(CloseMsg {
                session: second.session
            }),
            Bytes::new()
        )),
        ErrorCode::None
    );

    let rows = |n: usize, width: usize| encode_rows(&vec![0.01f32; n * width], DType::F32);
    assert_eq!(
        code(&call(&server, me, fwd(s ^ 1, 0, 2), rows(2, n_embd))),
        ErrorCode::UnknownSession
    );
    // Another peer naming this session's id sees no session.
    assert_eq!(
        code(&call(&server, other, fwd(s, 0, 2), rows(2, n_embd))),
        ErrorCode::UnknownSession
    );
    assert_eq!(
        code(&call(&server, me, fwd(s, 0, 2), rows(2, n_embd - 1))),
        ErrorCode::BadShape
    );
    assert_eq!(
        code(&call(&server, me, fwd(s, 5, 2), rows(2, n_embd))),
        ErrorCode::PositionMismatch
    );
    let nan = encode_rows(&vec![f32::NAN; 2 * n_embd], DType::F32);
    assert_eq!(
        code(&call(&server, me, fwd(s, 0, 2), nan)),
        ErrorCode::BadShape
    );
    assert_eq!(
        code(&call(&server, me, fwd(s, 0, 300), rows(300, n_embd))),
        ErrorCode::ContextFull
    );
    assert_eq!(
        code(&call(&server, me, fwd(s, 0, 5000), rows(1, n_embd))),
        ErrorCode::TooLarge
    );

    // After all that, the session still works and computes what the engine
    // computes for those layers.
    let input: Vec<f32> = (0..3 * n_embd)
        .map(|i| ((i % 17) as f32 - 8.0) * 0.01)
        .collect();
    let (reply, out) = call(&server, me, fwd(s, 0, 3), encode_rows(&input, DType::F32));
    assert_eq!(reply.code(), ErrorCode::None, "{}", reply.message);
    assert_eq!(reply.len, 3);
    let mut want = mesh_core::engine::Hidden {
        n_embd,
        pos: 0,
        data: input.clone(),
    };
    let mut session = engine.new_session(256).unwrap();
    engine.run_layers(12..18, &mut want, &mut session).unwrap();
    let got = mesh_core::pipeline::protocol::decode_rows(&out, DType::F32);
    assert_eq!(got, want.data);
    // Truncate past the end is refused; to 1 works and forward resumes at 1.
    assert_eq!(
        code(&call(
            &server,
            me,
            StageOp::Truncate(TruncateMsg { session: s, len: 9 }),
            Bytes::new()
        )),
        ErrorCode::PositionMismatch
    );
    let (t, _) = call(
        &server,
        me,
        StageOp::Truncate(TruncateMsg { session: s, len: 1 }),
        Bytes::new(),
    );
    assert_eq!((t.code(), t.len), (ErrorCode::None, 1));
    let (again, _) = call(
        &server,
        me,
        fwd(s, 1, 2),
        encode_rows(&input[n_embd..], DType::F32),
    );
    assert_eq!(again.code(), ErrorCode::None);
    assert_eq!(server.session_count(), 1);
    // A stage session caches only its layers: 6 of 30 layers' worth of KV,
    // and other layers are refused.
    let mut part = engine.new_session_for(12..18, 256).unwrap();
    assert_eq!(part.kv_bytes() * 5, session.kv_bytes());
    let mut h = engine.embed(&[1, 2], 0).unwrap();
    assert!(engine.run_layers(0..12, &mut h, &mut part).is_err());
    assert!(engine
        .forward(&[1, 2], mesh_core::engine::Logits::Last, &mut part)
        .is_err());
    // Garbage meta is malformed, never a panic.
    let (garbage, _) = server.handle(me, b"\x0a\xff\xff\xff", b"");
    assert_eq!(garbage.code(), ErrorCode::Malformed);
}

/// A pushed forward computes like an ordinary one and hands its output on:
/// to the next hop with the route's rest and everything carried so far, or
/// to the session's owner at the route's end; relayed by another stage, it
/// must name the owner. Bad pushes get typed refusals and change nothing.
#[test]
fn pushed_forwards_hand_their_output_on_and_bad_ones_are_refused() {
    use mesh_core::pipeline::protocol::{decode_rows, DeliverMsg, RouteHop, StageRequest};
    use mesh_core::pipeline::server::Answer;
    use mesh_core::pipeline::{DELIVER_METHOD, STAGE_METHOD};
    use prost::Message;

    let engine = engine();
    let n_embd = engine.info().n_embd;
    let server = StageServer::new(StageConfig::default());
    server.add_model(engine.clone(), 10..20);
    let client = Identity::from_seed([1; 32]).peer_id();
    let relay = Identity::from_seed([2; 32]).peer_id();
    let next = Identity::from_seed([3; 32]).peer_id();
    let (reply, _) = call(
        &server,
        client,
        open(engine.info().id.0, 10, 20, 64),
        Bytes::new(),
    );
    let s = reply.session;
    let input: Vec<f32> = (0..n_embd)
        .map(|i| ((i % 13) as f32 - 6.0) * 0.01)
        .collect();
    let earlier: Vec<f32> = (0..n_embd).map(|i| (i % 5) as f32 * 0.02).collect();
    let pushed = |pos: u64, route: &[PeerId], origin: Option<PeerId>, compute: Vec<u64>| {
        StageOp::Forward(ForwardMsg {
            session: s,
            pos,
            n_tokens: 1,
            dtype: DType::F32 as i32,
            route: route
                .iter()
                .map(|p| RouteHop {
                    peer: p.to_bytes(),
                    session: 77,
                })
                .collect(),
            deliver: 0xfeed,
            origin: origin.map(|o| o.to_bytes()).unwrap_or_default(),
            carried: compute.len().saturating_sub(1) as u32,
            compute_us: compute,
            timeout_ms: 5000,
        })
    };
    let answer = |peer: PeerId, op: StageOp, rows: Bytes| {
        let (meta, tensor) = encode_request(op, rows);
        server.answer(peer, &meta, &tensor)
    };
    let refused = |a: Answer| match a {
        Answer::Reply(r, _) => r.code(),
        Answer::Onward(o) => panic!("expected a refusal, got {o:?}"),
    };
    let one = encode_rows(&input, DType::F32);
    // Relayed without naming the owner: the relay owns no such session.
    assert_eq!(
        refused(answer(relay, pushed(0, &[next], None, vec![]), one.clone())),
        ErrorCode::UnknownSession
    );
    // Naming the owner, but with compute times that do not match the rows.
    assert_eq!(
        refused(answer(
            relay,
            pushed(0, &[next], Some(client), vec![]),
            one.clone()
        )),
        ErrorCode::Malformed
    );
    // Too many rows or hops for a push.
    let mut big = pushed(0, &[next], None, vec![]);
    if let StageOp::Forward(f) = &mut big {
        f.n_tokens = 17;
    }
    let rows17 = encode_rows(&vec![0.0; 17 * n_embd], DType::F32);
    assert_eq!(refused(answer(client, big, rows17)), ErrorCode::TooLarge);
    assert_eq!(
        refused(answer(
            client,
            pushed(0, &[next; 33], None, vec![]),
            one.clone()
        )),
        ErrorCode::TooLarge
    );
    let mut bad_peer = pushed(0, &[next], None, vec![]);
    if let StageOp::Forward(f) = &mut bad_peer {
        f.route[0].peer = vec![1, 2, 3];
    }
    assert_eq!(
        refused(answer(client, bad_peer, one.clone())),
        ErrorCode::Malformed
    );
    // Nothing was computed by any of that.
    let mut want = mesh_core::engine::Hidden {
        n_embd,
        pos: 0,
        data: input.clone(),
    };
    let mut session = engine.new_session(64).unwrap();
    engine.run_layers(10..20, &mut want, &mut session).unwrap();

    // From the client, with one hop after: a forward to it carrying this
    // stage's output, in the client's name.
    let Answer::Onward(o) = answer(client, pushed(0, &[next], None, vec![]), one) else {
        panic!("a push hands its output on")
    };
    assert_eq!(
        (o.to, o.reply.code(), o.reply.len),
        (next, ErrorCode::None, 1)
    );
    assert_eq!(o.request.method, STAGE_METHOD);
    let Some(StageOp::Forward(f)) = StageRequest::decode(o.request.meta.as_ref()).unwrap().op
    else {
        panic!("not a forward")
    };
    assert_eq!((f.session, f.pos, f.deliver, f.carried), (77, 0, 0xfeed, 0));
    assert!(f.route.is_empty());
    assert_eq!(f.origin, client.to_bytes());
    assert_eq!(f.compute_us, vec![o.reply.compute_us]);
    assert_eq!(decode_rows(&o.request.tensor, DType::F32), want.data);

    // Relayed, at the end of the route: delivered to the owner with what
    // came before and this stage's output.
    let mut want2 = mesh_core::engine::Hidden {
        n_embd,
        pos: 1,
        data: input.clone(),
    };
    engine.run_layers(10..20, &mut want2, &mut session).unwrap();
    let carried = [
        encode_rows(&earlier, DType::F32),
        encode_rows(&input, DType::F32),
    ]
    .concat();
    let op = pushed(1, &[], Some(client), vec![5, 6]);
    let Answer::Onward(o) = answer(relay, op, Bytes::from(carried)) else {
        panic!("a push hands its output on")
    };
    assert_eq!((o.to, o.request.method.as_str()), (client, DELIVER_METHOD));
    let d = DeliverMsg::decode(o.request.meta.as_ref()).unwrap();
    assert_eq!((d.deliver, d.pos, d.n_tokens), (0xfeed, 1, 1));
    assert_eq!(d.compute_us, vec![5, 6, o.reply.compute_us]);
    let rows = decode_rows(&o.request.tensor, DType::F32);
    assert_eq!(rows.len(), 3 * n_embd);
    assert_eq!(&rows[..n_embd], &earlier[..]);
    assert_eq!(&rows[n_embd..2 * n_embd], &input[..]);
    assert_eq!(&rows[2 * n_embd..], &want2.data[..]);
}

#[test]
fn idle_sessions_expire() {
    let engine = engine();
    let server = StageServer::new(StageConfig {
        idle_ttl: Duration::from_millis(100),
        ..StageConfig::default()
    });
    server.add_model(engine.clone(), 0..30);
    let me = Identity::from_seed([1; 32]).peer_id();
    let mut events = server.events();
    let (reply, _) = call(
        &server,
        me,
        open(engine.info().id.0, 0, 30, 64),
        Bytes::new(),
    );
    assert_eq!(reply.code(), ErrorCode::None);
    assert_eq!(server.session_count(), 1);
    std::thread::sleep(Duration::from_millis(250));
    server.expire_idle();
    assert_eq!(server.session_count(), 0);
    assert_eq!(server.kv_bytes_in_use(), 0);
    let _opened = events.try_recv().unwrap();
    match events.try_recv().unwrap() {
        mesh_core::pipeline::server::StageEvent::Closed { reason, .. } => {
            assert_eq!(reason, mesh_core::pipeline::server::CloseReason::Expired)
        }
        other => panic!("{other:?}"),
    }
    // A request to a session idle past the TTL finds it gone even before a
    // sweep runs.
    let (reply, _) = call(
        &server,
        me,
        open(engine.info().id.0, 0, 30, 64),
        Bytes::new(),
    );
    assert_eq!(reply.code(), ErrorCode::None);
    std::thread::sleep(Duration::from_millis(250));
    let rows = encode_rows(&vec![0.01f32; engine.info().n_embd], DType::F32);
    let (late, _) = call(&server, me, fwd(reply.session, 0, 1), rows);
    assert_eq!(late.code(), ErrorCode::UnknownSession);
    assert_eq!(server.session_count(), 0);
}
