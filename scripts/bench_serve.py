#!/usr/bin/env python3
"""`mesh serve` against `mesh generate`, same run: streaming overhead and
throughput with concurrent clients.

    python3 scripts/bench_serve.py [--threads 2] [--tg 64] [--runs 10] [--clients 1,4,8]
                                   [--fixed-threads]

(--fixed-threads: both the CLI and the servers compute every graph with
--threads threads instead of the adaptive thread policy, for A/B runs.)

    python3 scripts/bench_serve.py --idle-profile [--threads 2]

instead measures what an idle gap before a request costs: streams of TG
tokens to one server back to back, and each after a 0.7 s pause, alternated
6 times each, and prints the mean gap between tokens 1-8, 8-16, 16-32 and
32-TG of each kind.

Builds the release `mesh`, then
1. runs `mesh generate` (greedy, --ignore-eos, TG tokens) and the same prompt
   through `POST /v1/completions` with `stream: true` (and `ignore_eos`),
   alternating, RUNS times each; checks the texts are equal; reports decode
   tokens/s (inter-token time, best run) and time to first token (the CLI's
   prompt time plus one decode step, against request-sent to first chunk);
2. sends C concurrent streaming requests (C in --clients) to that server,
   whose concurrent decode steps are batched into one graph, and to a second
   one started with --no-batch (one step at a time), alternating; reports
   total tokens/s and p50/p99 of the gap between a client's tokens, and
   checks every text equals `mesh generate`'s.
"""
import argparse, http.client, json, os, statistics, subprocess, threading, time

from meshbench import generate, mesh_binary, prompt_files


def stream_completion(host, port, prompt, n):
    """One streamed completion; returns (text, t_sent, [chunk arrival times])."""
    c = http.client.HTTPConnection(host, port, timeout=600)
    body = json.dumps({"model": "default", "prompt": prompt, "max_tokens": n, "temperature": 0,
                       "stream": True, "ignore_eos": True})
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    text, times = "", []
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        piece = json.loads(line[6:])["choices"]
        if piece and piece[0]["text"]:
            times.append(time.perf_counter())
            text += piece[0]["text"]
    c.close()
    return text, t0, times


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def idle_profile(host, port, prompt, tg):
    """Per-token gaps of streams sent back to back vs after a 0.7 s pause."""
    gaps = {0.0: [], 0.7: []}
    for _ in range(6):
        for pause in gaps:
            time.sleep(pause)
            _, _, times = stream_completion(host, port, prompt, tg)
            gaps[pause].append([(b - a) * 1e3 for a, b in zip(times, times[1:])])
    print(f"| pause before the request | gap ms, tokens 1-8 | 8-16 | 16-32 | 32-{tg} |")
    print("|---|---|---|---|---|")
    for pause, rows in gaps.items():
        mean = lambda i, j: statistics.mean(x for r in rows for x in r[i:j])
        print(f"| {pause} s | {mean(0, 8):.2f} | {mean(8, 16):.2f} | {mean(16, 32):.2f} | "
              f"{mean(32, tg):.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--fixed-threads", action="store_true")
    ap.add_argument("--idle-profile", action="store_true")
    args = ap.parse_args()
    fixed = ["--fixed-threads"] if args.fixed_threads else []
    mesh = mesh_binary()
    model = subprocess.check_output([mesh, "fetch"], text=True).strip()
    short, _ = prompt_files("serve", 16)
    prompt = open(short).read()
    clients = [int(c) for c in args.clients.split(",")]
    def start(*extra):
        p = subprocess.Popen([mesh, "serve", "--model", model, "--name", "default", "--listen",
                              "127.0.0.1:0", "--threads", str(args.threads), "--parallel",
                              str(max(clients)), "--queue", str(2 * max(clients)), *fixed, *extra],
                             stdout=subprocess.PIPE, text=True)
        url = json.loads(p.stdout.readline())["listening"]
        host, port = url[len("http://"):].split(":")
        stream_completion(host, int(port), prompt, 4)  # warm up
        return p, host, int(port)

    if args.idle_profile:
        srv, host, port = start()
        try:
            idle_profile(host, port, prompt, args.tg)
        finally:
            srv.terminate()
            srv.wait(timeout=60)
        return
    srv, host, port = start()
    unbatched, _, port_unbatched = start("--no-batch")
    try:
        cli_tps, cli_ttft, srv_tps, srv_ttft = [], [], [], []
        for _ in range(args.runs):
            g = generate(mesh, model, short, args.tg, args.threads, fixed)
            step = g["generate_ms"] / max(1, len(g["token_ids"]) - 1)
            cli_tps.append(1e3 / step)
            cli_ttft.append(g["prompt_ms"] + step)
            text, t0, times = stream_completion(host, port, prompt, args.tg)
            assert text == g["text"], (text, g["text"])
            srv_tps.append((len(times) - 1) / (times[-1] - times[0]))
            srv_ttft.append((times[0] - t0) * 1e3)
        print(f"| threads {args.threads}, {args.tg} tokens | mesh generate | mesh serve (stream) | ratio |")
        print("|---|---|---|---|")
        print(f"| decode tokens/s (best of {args.runs}) | {max(cli_tps):.1f} | {max(srv_tps):.1f} | "
              f"{max(srv_tps) / max(cli_tps):.3f}x |")
        med_cli, med_srv = statistics.median(cli_tps), statistics.median(srv_tps)
        print(f"| decode tokens/s (median of {args.runs}) | {med_cli:.1f} | {med_srv:.1f} | "
              f"{med_srv / med_cli:.3f}x |")
        print(f"| time to first token, ms (best) | {min(cli_ttft):.1f} | {min(srv_ttft):.1f} | "
              f"+{min(srv_ttft) - min(cli_ttft):.1f} ms |")
        print()
        print("| concurrent clients | decode steps | total tokens/s | p50 token gap ms "
              "| p99 token gap ms | texts equal to mesh generate |")
        print("|---|---|---|---|---|---|")
        for c in clients:
            for name, p in (("batched", port), ("one by one", port_unbatched)):
                results = [None] * c

                def one(i):
                    results[i] = stream_completion(host, p, prompt, args.tg)

                t0 = time.perf_counter()
                ts = [threading.Thread(target=one, args=(i,)) for i in range(c)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wall = time.perf_counter() - t0
                gaps = [(b - a) * 1e3 for _, _, times in results for a, b in zip(times, times[1:])]
                tokens = sum(len(times) for _, _, times in results)
                equal = all(r[0] == g["text"] for r in results)
                print(f"| {c} | {name} | {tokens / wall:.1f} | {pct(gaps, 50):.1f} | "
                      f"{pct(gaps, 99):.1f} | {equal} |")
                assert equal, [r[0] for r in results]
    finally:
        for p in (srv, unbatched):
            p.terminate()
            p.wait(timeout=60)


if __name__ == "__main__":
    main()
