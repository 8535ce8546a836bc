"""Shared helpers of the loopback benchmarks (bench_pipeline.py, bench_private.py)."""
import json, os, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_binary():
    """Builds the release `mesh` CLI and returns its path."""
    subprocess.check_call(["cargo", "build", "--quiet", "--release", "-p", "mesh-cli"], cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR") or json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT))["target_directory"]
    return os.path.join(target, "release", "mesh")


def start_node(mesh, serve, extra, bootstrap, ready):
    """Starts `mesh node --listen 127.0.0.1 --serve SERVE EXTRA...`; returns
    (process, its /p2p/ address, peer id) once it printed the `ready` event."""
    args = [mesh, "node", "--listen", "/ip4/127.0.0.1/tcp/0", "--serve", serve] + list(extra)
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    first = json.loads(p.stdout.readline())
    addr = first["listen"][0]
    if "/p2p/" not in addr:
        addr += "/p2p/" + first["peer_id"]
    while json.loads(p.stdout.readline()).get("event") != ready:
        pass
    return p, addr, first["peer_id"]


def prompt_files(tag, pp):
    """A short prompt file and one of about `pp` tokens of ordinary text."""
    words = open(os.path.join(ROOT, "mesh-core", "tests", "data", "ppl_words.txt")).read().split()
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mesh-bench-{tag}-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    short = os.path.join(tmp, "short.txt")
    open(short, "w").write("The capital of France is")
    long_ = os.path.join(tmp, "long.txt")
    # Words are ~1.3 tokens each.
    open(long_, "w").write(" ".join(words[: int(pp / 1.3)]))
    return short, long_


def generate(mesh, model, prompt_file, max_tokens, threads, extra=()):
    """`mesh generate` (greedy, JSON) with EXTRA arguments; the parsed output."""
    args = [mesh, "generate", "--model", model, "--prompt-file", prompt_file, "--temperature", "0",
            "--ignore-eos", "--max-tokens", str(max_tokens), "--threads", str(threads),
            "--format", "json"] + list(extra)
    return json.loads(subprocess.check_output(args))
