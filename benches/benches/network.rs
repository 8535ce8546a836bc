//! Request/response round trips on loopback: 2304 B (one decode row of the
//! default model, the pipeline's per-hop message), 100 KiB and 1 MiB tensors sent
//! and echoed back over libp2p TCP (noise + yamux) and QUIC, next to a plain
//! tokio TCP socket doing the same framing in the same run. Every round trip
//! checks the echoed bytes. `libp2p_tcp` and `libp2p_quic` send requests on
//! long-lived streams (the default); `libp2p_tcp_rr` on request-response (one
//! new negotiated substream per request, as to a peer without streams).
//!
//! Throughput counts both directions (2 x payload per round trip).

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mesh_core::network::p2p::{P2pConfig, P2pNetwork};
use mesh_core::network::{Identity, Network, PeerId, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const SIZES: [usize; 5] = [2304, 100 << 10, 256 << 10, 512 << 10, 1 << 20];

fn payload(n: usize) -> Bytes {
    Bytes::from((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// An echo server node and a client node connected over `transport` ("tcp" or "quic");
/// `streams`: requests over long-lived streams (the default) or request-response.
async fn pair(transport: &str, seed: u8, streams: bool) -> (P2pNetwork, P2pNetwork) {
    let mut config = P2pConfig::loopback(Identity::from_seed([seed; 32]));
    config.request_streams = streams;
    let server = P2pNetwork::start(config).await.unwrap();
    let mut rx = server.handle("bench/echo").await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let tensor = req.request.tensor.clone();
            req.respond(Response {
                meta: Bytes::new(),
                tensor,
            });
        }
    });
    let addr = server
        .listen_addrs()
        .await
        .unwrap()
        .into_iter()
        .find(|a| {
            a.to_string().contains(if transport == "quic" {
                "/quic-v1"
            } else {
                "/tcp/"
            })
        })
        .unwrap();
    let mut config = P2pConfig::new(Identity::from_seed([seed + 1; 32]));
    config.request_streams = streams;
    let client = P2pNetwork::start(config).await.unwrap();
    client.dial(addr).await.unwrap();
    (server, client)
}

async fn p2p_round_trip(client: &P2pNetwork, server: PeerId, data: &Bytes) {
    let r = client
        .request(
            server,
            Request {
                method: "bench/echo".into(),
                meta: Bytes::new(),
                tensor: data.clone(),
            },
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(r.tensor == *data, "echo differs");
}

/// Plain tokio TCP with the same 4-byte length framing (no encryption, no multiplexing).
async fn tcp_pair() -> TcpStream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).await.is_err() {
                break;
            }
            buf.resize(u32::from_be_bytes(len) as usize, 0);
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&len).await.unwrap();
            s.write_all(&buf).await.unwrap();
        }
    });
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

async fn tcp_round_trip(s: &mut TcpStream, data: &Bytes, back: &mut Vec<u8>) {
    s.write_all(&(data.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    back.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(back).await.unwrap();
    assert!(back[..] == data[..], "echo differs");
}

fn bench_network(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let (tcp_server, tcp_client) = rt.block_on(pair("tcp", 1, true));
    let (quic_server, quic_client) = rt.block_on(pair("quic", 3, true));
    let (rr_server, rr_client) = rt.block_on(pair("tcp", 5, false));
    let mut plain = rt.block_on(tcp_pair());
    let mut back = Vec::new();

    let mut g = c.benchmark_group("round_trip");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(4));
    for size in SIZES {
        let data = payload(size);
        g.throughput(Throughput::Bytes(2 * size as u64));
        let label = if size % 1024 != 0 {
            format!("{size}B")
        } else {
            format!("{}KiB", size >> 10)
        };
        g.bench_with_input(BenchmarkId::new("tokio_tcp", &label), &data, |b, d| {
            b.iter(|| rt.block_on(tcp_round_trip(&mut plain, d, &mut back)))
        });
        g.bench_with_input(BenchmarkId::new("libp2p_tcp", &label), &data, |b, d| {
            b.iter(|| rt.block_on(p2p_round_trip(&tcp_client, tcp_server.local_peer_id(), d)))
        });
        g.bench_with_input(BenchmarkId::new("libp2p_tcp_rr", &label), &data, |b, d| {
            b.iter(|| rt.block_on(p2p_round_trip(&rr_client, rr_server.local_peer_id(), d)))
        });
        g.bench_with_input(BenchmarkId::new("libp2p_quic", &label), &data, |b, d| {
            b.iter(|| rt.block_on(p2p_round_trip(&quic_client, quic_server.local_peer_id(), d)))
        });
    }
    g.finish();
    rt.block_on(async {
        for n in [
            &tcp_server,
            &tcp_client,
            &quic_server,
            &quic_client,
            &rr_server,
            &rr_client,
        ] {
            n.shutdown().await.unwrap();
        }
    });
}

criterion_group!(benches, bench_network);
criterion_main!(benches);
