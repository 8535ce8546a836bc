//! Adapter transfer on loopback: `ledger::transfer::fetch` (libp2p TCP with
//! noise and yamux, 1 MiB chunks, 4 in flight, written through the store and
//! checked by BLAKE3) against a plain tokio TCP copy of the same bytes in the same
//! run (read into a file and hashed too, so both do the same local work).
//! Runs alternate; prints the median MB/s of each and their ratio, and checks
//! every received file is the source byte for byte.
//!
//! `cargo bench -p mesh-benches --bench sync` ($MESH_SYNC_MB, default 32;
//! $MESH_SYNC_RUNS, default 5; $MESH_SYNC_CHUNK_KIB and $MESH_SYNC_WINDOW
//! override the fetch defaults).

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::engine::ModelId;
use mesh_core::ledger::transfer::{self, ADAPTER_METHOD};
use mesh_core::ledger::{AdapterStore, FetchConfig};
use mesh_core::network::p2p::{P2pConfig, P2pNetwork};
use mesh_core::network::{Identity, Network};
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` (CI's compile check) runs nothing.
    }
    let size = env("MESH_SYNC_MB", 32) << 20;
    let runs = env("MESH_SYNC_RUNS", 5).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let root = std::env::temp_dir().join(format!("mesh-bench-sync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut bytes = vec![0u8; size];
    rand_chacha::ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut bytes);
    let source = AdapterStore::open(root.join("source")).unwrap();
    let id = source.put(&bytes).unwrap();

    // libp2p: a serving node and a fetching node.
    let (server, client) = rt.block_on(async {
        let server = P2pNetwork::start(P2pConfig::loopback(Identity::from_seed([1; 32])))
            .await
            .unwrap();
        let requests = server.handle(ADAPTER_METHOD).await.unwrap();
        tokio::spawn(transfer::serve(source.clone(), requests));
        let addr = server
            .listen_addrs()
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.to_string().contains("/tcp/"))
            .unwrap();
        let client = P2pNetwork::start(P2pConfig::new(Identity::from_seed([2; 32])))
            .await
            .unwrap();
        client.dial(addr).await.unwrap();
        (server, client)
    });
    let client: Arc<dyn Network> = Arc::new(client);
    let server_id = server.local_peer_id();

    // Plain TCP: a server that writes the file to each connection.
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let tcp_addr = listener.local_addr().unwrap();
    let served = Arc::new(bytes.clone());
    rt.spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let data = served.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let _ = s.write_all(&data).await;
            });
        }
    });

    let defaults = FetchConfig::default();
    let config = FetchConfig {
        chunk: (env("MESH_SYNC_CHUNK_KIB", defaults.chunk as usize >> 10) << 10) as u32,
        window: env("MESH_SYNC_WINDOW", defaults.window),
        ..defaults
    };
    let (mut p2p, mut tcp) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let store = AdapterStore::open(root.join(format!("fetch-{run}"))).unwrap();
        let started = Instant::now();
        let fetched = rt
            .block_on(transfer::fetch(
                &client,
                &store,
                id,
                size as u64,
                &[server_id],
                &config,
                &mut |_, _| {},
            ))
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(fetched.from, Some(server_id));
        assert!(
            std::fs::read(&fetched.path).unwrap() == bytes,
            "fetched bytes differ"
        );
        p2p.push(size as f64 / secs / 1e6);

        let path = root.join(format!("tcp-{run}"));
        let started = Instant::now();
        let hash = rt.block_on(async {
            let mut s = TcpStream::connect(tcp_addr).await.unwrap();
            let mut file = std::fs::File::create(&path).unwrap();
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < size {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed early");
                file.write_all(&buf[..n]).unwrap();
                hasher.update(&buf[..n]);
                got += n;
            }
            file.sync_all().unwrap();
            ModelId(*hasher.finalize().as_bytes())
        });
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(hash, id, "TCP copy differs");
        tcp.push(size as f64 / secs / 1e6);
        let _ = std::fs::remove_dir_all(store.dir());
        let _ = std::fs::remove_file(&path);
    }
    let (p, t) = (median(p2p), median(tcp));
    println!(
        "adapter transfer, {} MiB on loopback, median of {runs}: mesh/adapter/1 fetch \
         ({} KiB chunks, {} in flight) {p:.0} MB/s, raw TCP copy {t:.0} MB/s, ratio {:.2}",
        size >> 20,
        config.chunk >> 10,
        config.window,
        p / t
    );
    let _ = rt.block_on(client.shutdown());
    let _ = rt.block_on(server.shutdown());
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&root);
}
