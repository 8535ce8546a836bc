//! `mesh serve`: the command over [`mesh_serve`].

use std::sync::Arc;

pub use mesh_serve::ServeConfig;
use mesh_serve::{mode_name, run, served_model, shutdown_signal, AppState};
use serde_json::json;

use crate::BoxError;

/// What `mesh serve` was asked to do.
pub struct ServeArgs {
    pub model: String,
    pub name: Option<String>,
    pub threads: usize,
    pub fixed_threads: bool,
    pub exact: bool,
    pub client: crate::net::ClientArgs,
    pub config: ServeConfig,
}

/// `mesh serve`: loads the model, opens the node, listens, prints one JSON
/// line (`{"listening": "http://..."}`) and serves until SIGINT/SIGTERM.
pub fn serve(args: ServeArgs) -> Result<(), BoxError> {
    let path = crate::model_path_via(&args.model, &args.client.bootstrap)?;
    eprintln!("mesh serve: loading {}", path.display());
    let engine = crate::load_engine(&path, args.threads, args.exact, args.fixed_threads)?;
    let node = crate::net::client_node(args.client)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(args.config.listen))?;
    let state = AppState::new(
        served_model(&path, args.name, &args.model, engine, node)?,
        args.config,
    );
    let url = format!("http://{}", listener.local_addr()?);
    println!(
        "{}",
        json!({"listening": url, "model": state.model.name, "mode": mode_name(state.config.mode),
               "peer_id": state.model.node.peer_id().to_string()})
    );
    eprintln!("mesh serve: chat at {url}/  (OpenAI: {url}/v1, Ollama: {url})");
    let result = rt.block_on(run(listener, state.clone(), shutdown_signal()));
    drop(rt);
    match Arc::try_unwrap(state) {
        Ok(state) => match Arc::try_unwrap(state.model.node) {
            Ok(node) => node.shutdown()?,
            Err(_) => eprintln!("mesh serve: a generation still holds the node; exiting"),
        },
        Err(_) => eprintln!("mesh serve: requests still hold the server; exiting"),
    }
    result
}
