//! Model sync over the in-memory network: an update record published by one
//! node reaches another by gossip, which fetches the adapter in chunks
//! (verified by hash) and generates with it exactly as the author does; a
//! lying peer, a forged record and a record for another model are refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::engine::{lora, ActiveLora, Engine, GgmlEngine, LoraAdapter, Projection};
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::ledger::record::{UpdateBody, UpdateEnvelope, UPDATE_TOPIC};
use mesh_core::ledger::transfer::{self, ChunkReply, ChunkRequest, ADAPTER_METHOD};
use mesh_core::ledger::{AdapterStore, FetchConfig, LedgerError, UpdateRecord};
use mesh_core::network::memory::MemoryNet;
use mesh_core::network::{Identity, Limits, Network, Response};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeEvent, NodeOptions};
use mesh_core::sampling::SamplerParams;
use mesh_core::Error;
use prost::Message;

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-updates-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A node of `net` with its identity.
fn node(net: &MemoryNet, rt: &tokio::runtime::Runtime) -> (Node, Arc<dyn Network>) {
    let identity = Identity::ephemeral();
    let n: Arc<dyn Network> = Arc::new(net.add_node(identity.clone(), Limits::default()));
    let node = Node::with_network(n.clone(), rt.handle().clone(), NodeOptions::default())
        .with_identity(identity)
        .unwrap();
    (node, n)
}

/// Makes `net` answer every chunk request with bytes of the right size for a
/// `total`-byte file that are not the file's.
fn spawn_liar(rt: &tokio::runtime::Runtime, net: &Arc<dyn Network>, total: u64) {
    let mut asked = rt.block_on(net.handle(ADAPTER_METHOD)).unwrap();
    rt.spawn(async move {
        while let Some(inbound) = asked.recv().await {
            let req = ChunkRequest::decode(inbound.request.meta.as_ref()).unwrap();
            let n = (total.saturating_sub(req.offset)).min(u64::from(req.len));
            let reply = ChunkReply {
                version: 1,
                error: 0,
                message: String::new(),
                total,
            };
            inbound.respond(Response {
                meta: Bytes::from(reply.encode_to_vec()),
                tensor: Bytes::from(vec![0x5a; n as usize]),
            });
        }
    });
}

fn greedy(prompt: &str, adapter: Option<&Arc<LoraAdapter>>) -> GenerateRequest {
    let mut r = GenerateRequest::new(
        Prompt::Text(prompt.into()),
        GenerateParams {
            max_tokens: 24,
            sampler: SamplerParams::greedy(),
            ignore_eos: true,
            ..GenerateParams::default()
        },
    );
    r.adapters = adapter
        .map(|a| vec![ActiveLora::new(a.clone(), 1.0)])
        .unwrap_or_default();
    r
}

#[test]
fn a_published_update_is_fetched_verified_and_runs_as_at_its_author() {
    let rt = common::runtime();
    let engine = Arc::new(GgmlEngine::load(common::model_path(), common::THREADS).unwrap());
    let net = MemoryNet::new(3);
    let (author, _) = node(&net, &rt);
    let (follower, _) = node(&net, &rt);
    let (liar, liar_net) = node(&net, &rt);
    let hub = author.listen_addrs().unwrap()[0].clone();
    follower.dial(hub.clone()).unwrap();
    liar.dial(hub).unwrap();
    let follower_addr = follower.listen_addrs().unwrap()[0].clone();
    liar.dial(follower_addr).unwrap();
    let dirs = [temp_dir("author"), temp_dir("follower"), temp_dir("other")];
    author.enable_updates(&dirs[0]).unwrap();
    follower.enable_updates(&dirs[1]).unwrap();
    let mut events = follower.events();

    // An adapter strong enough to change greedy answers.
    let targets: Vec<(usize, Projection)> = [1, 12, 27]
        .into_iter()
        .flat_map(|l| [(l, Projection::O), (l, Projection::Gate)])
        .collect();
    let bytes = lora::testing::random_adapter(engine.info(), &targets, 8, 0.0, 0.15, 21);
    let file = dirs[2].join("adapter.gguf");
    std::fs::create_dir_all(&dirs[2]).unwrap();
    std::fs::write(&file, &bytes).unwrap();

    // The liar answers every chunk request with bytes of the right size but
    // not the adapter's.
    spawn_liar(&rt, &liar_net, bytes.len() as u64);

    // A forged record on the topic first: the follower must never take it.
    let mine = UpdateRecord::sign(
        &Identity::ephemeral(),
        mesh_core::ledger::UpdateDraft {
            base: engine.info().id,
            adapter: mesh_core::engine::ModelId([9; 32]),
            adapter_size: 10,
            parent: None,
            metrics: vec![],
        },
    )
    .unwrap();
    let mut env = UpdateEnvelope::decode(mine.encode().as_slice()).unwrap();
    let mut body = UpdateBody::decode(env.body.as_ref()).unwrap();
    body.adapter_size = 11;
    env.body = Bytes::from(body.encode_to_vec());
    rt.block_on(liar_net.subscribe(UPDATE_TOPIC)).unwrap();
    rt.block_on(liar_net.publish(UPDATE_TOPIC, Bytes::from(env.encode_to_vec())))
        .unwrap();

    let record = author
        .publish_update(&engine, &file, None, vec![("perplexity".into(), 9.5)])
        .unwrap();
    assert_eq!(record.author, author.peer_id());
    assert_eq!(record.adapter.0, *blake3::hash(&bytes).as_bytes());
    assert_eq!(record.adapter_size, bytes.len() as u64);

    // The follower hears of it by gossip.
    let deadline = Instant::now() + Duration::from_secs(20);
    let heard = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rt.block_on(async { tokio::time::timeout(left, events.recv()).await }) {
            Ok(Ok(NodeEvent::Update(r))) => break *r,
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            other => panic!("no update event: {other:?}"),
        }
    };
    assert_eq!(heard, record);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(follower.updates(), vec![record.clone()]);

    // Fetched in small chunks, several in flight; the liar (asked first
    // here) is caught by the hash and the author's copy used.
    let config = FetchConfig {
        chunk: 16 << 10,
        window: 3,
        ..FetchConfig::default()
    };
    let store = AdapterStore::open(temp_dir("direct")).unwrap();
    let follower_net = follower.network().clone();
    let fetched = rt
        .block_on(transfer::fetch(
            &follower_net,
            &store,
            record.adapter,
            record.adapter_size,
            &[liar.peer_id(), author.peer_id()],
            &config,
            &mut |_, _| {},
        ))
        .unwrap();
    assert_eq!(fetched.from, Some(author.peer_id()));
    assert_eq!(fetched.failures.len(), 1);
    assert_eq!(fetched.failures[0].0, liar.peer_id());
    assert_eq!(std::fs::read(&fetched.path).unwrap(), bytes);
    // Only the liar: nothing is kept, and the error says who failed.
    let empty = AdapterStore::open(temp_dir("liar-only")).unwrap();
    match rt.block_on(transfer::fetch(
        &follower_net,
        &empty,
        record.adapter,
        record.adapter_size,
        &[liar.peer_id()],
        &config,
        &mut |_, _| {},
    )) {
        Err(LedgerError::Unavailable { failures, .. }) => {
            assert_eq!(failures.len(), 1);
            assert!(failures[0].1.contains("hash"), "{}", failures[0].1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(empty.get(record.adapter), None);

    // Through the node: fetched, loaded, and the same tokens as the author's.
    let (adapter, how) = follower.fetch_update(&engine, &record, &config).unwrap();
    assert_eq!(adapter.id(), record.adapter);
    assert_eq!(how.from, Some(author.peer_id()));
    let own = engine.load_adapter(&file).unwrap();
    let mut changed = 0;
    for prompt in ["The capital of France is", "def fibonacci(n):"] {
        let theirs = author
            .generate(
                &engine,
                &greedy(prompt, Some(&own)),
                Mode::Local,
                None,
                &mut |_| true,
            )
            .unwrap();
        let ours = follower
            .generate(
                &engine,
                &greedy(prompt, Some(&adapter)),
                Mode::Local,
                None,
                &mut |_| true,
            )
            .unwrap();
        assert_eq!(ours.output.token_ids, theirs.output.token_ids, "{prompt}");
        let plain = follower
            .generate(
                &engine,
                &greedy(prompt, None),
                Mode::Local,
                None,
                &mut |_| true,
            )
            .unwrap();
        changed += usize::from(plain.output.token_ids != ours.output.token_ids);
    }
    assert!(changed >= 1, "the adapter changed no answer");

    // A record for another model is refused before anything is fetched.
    let other = UpdateRecord::sign(
        &Identity::ephemeral(),
        mesh_core::ledger::UpdateDraft {
            base: mesh_core::engine::ModelId([1; 32]),
            adapter: record.adapter,
            adapter_size: record.adapter_size,
            parent: Some(record.id()),
            metrics: vec![],
        },
    )
    .unwrap();
    assert!(matches!(
        follower.fetch_update(&engine, &other, &config),
        Err(Error::InvalidArgument(_))
    ));
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn a_model_known_only_by_id_is_fetched_from_a_peer_serving_it() {
    let rt = common::runtime();
    let path = common::model_path();
    let original = std::fs::read(&path).unwrap();
    let engine = Arc::new(GgmlEngine::load(&path, common::THREADS).unwrap());
    let id = engine.info().id;
    let net = MemoryNet::new(4);
    let (server, _) = node(&net, &rt);
    let (client, _) = node(&net, &rt);
    let (liar, liar_net) = node(&net, &rt);
    let hub = server.listen_addrs().unwrap()[0].clone();
    client.dial(hub.clone()).unwrap();
    liar.dial(hub).unwrap();
    let config = FetchConfig {
        chunk: 4 << 20,
        window: 4,
        ..FetchConfig::default()
    };
    let store = AdapterStore::open(temp_dir("models")).unwrap();

    // Nobody serves it yet: a clear error, nothing stored.
    match client.fetch_model(id, &store, &config, &mut |_, _| {}) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("no peer serves"), "{m}"),
        other => panic!("{other:?}"),
    }

    // A liar announces the model and sends bytes of the right size that are
    // not the model's: caught by the hash, nothing kept.
    let total = original.len() as u64;
    rt.block_on(liar_net.announce(mesh_core::network::Announcement {
        model: id,
        layers: 0..30,
        free_memory: 1 << 30,
        tokens_per_sec: 1000.0,
    }))
    .unwrap();
    spawn_liar(&rt, &liar_net, total);
    match client.fetch_model(id, &store, &config, &mut |_, _| {}) {
        Err(Error::Ledger(e)) => match *e {
            LedgerError::Unavailable { failures, .. } => {
                assert_eq!(failures.len(), 1);
                assert_eq!(failures[0].0, liar.peer_id());
                assert!(failures[0].1.contains("hash"), "{}", failures[0].1);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get(id), None);

    // A node serving some layers of it sends the whole file; the fetched
    // file is the model, byte for byte.
    server.serve(engine.clone(), 10..20).unwrap();
    assert!(server.offered().contains(id));
    let mut seen = 0;
    let fetched = client
        .fetch_model(id, &store, &config, &mut |done, size| {
            assert!(done <= size && size == total);
            seen = done;
        })
        .unwrap();
    assert_eq!(fetched.from, Some(server.peer_id()));
    assert_eq!(seen, total);
    for (peer, why) in &fetched.failures {
        assert_eq!(*peer, liar.peer_id(), "{why}");
    }
    assert!(std::fs::read(&fetched.path).unwrap() == original);
    let loaded = GgmlEngine::load(&fetched.path, common::THREADS).unwrap();
    assert_eq!(loaded.info().id, id);
    // Held now: no network needed.
    let again = client
        .fetch_model(id, &store, &config, &mut |_, _| {})
        .unwrap();
    assert_eq!((again.from, again.path), (None, fetched.path));

    // A node told to withhold model files serves layers but not the file.
    let (private, _) = {
        let identity = Identity::ephemeral();
        let n: Arc<dyn Network> = Arc::new(net.add_node(identity, Limits::default()));
        let options = NodeOptions {
            withhold_model_files: true,
            ..NodeOptions::default()
        };
        (
            Node::with_network(n.clone(), rt.handle().clone(), options),
            n,
        )
    };
    private.serve(engine.clone(), 0..10).unwrap();
    assert!(!private.offered().contains(id));
    let _ = std::fs::remove_dir_all(store.dir());
}
