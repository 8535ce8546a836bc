//! Private mode on a node: serving as a helper, finding helpers in the mesh,
//! and generating with them.

use super::*;

impl Node {
    /// Also answers private-mode requests for `engine`'s model: owners on
    /// other nodes send this node sealed shares of their activations
    /// ([`HELPER_METHOD`]) and get sealed partial products back; it never
    /// sees anything but uniformly random shares. Owners find helpers among
    /// the model's providers, so the whole model is served as a stage too if
    /// it is not served yet. The helper key is signed with the node's
    /// identity ([`Node::open`], or [`Node::with_identity`]).
    pub fn serve_helper(&self, engine: Arc<GgmlEngine>) -> Result<()> {
        let Some(identity) = &self.identity else {
            return Err(Error::InvalidArgument(
                "serving as a helper needs the node's identity (Node::with_identity)".into(),
            ));
        };
        let (server, first) = {
            let mut guard = self.helper.lock().unwrap_or_else(|p| p.into_inner());
            let first = guard.is_none();
            let server = guard
                .get_or_insert_with(|| {
                    Arc::new(HelperServer::new(
                        self.peer_id(),
                        &identity.signing_key(),
                        self.options.helper.clone(),
                    ))
                })
                .clone();
            (server, first)
        };
        server.add_model(engine.clone());
        if first {
            self.start_handler(HELPER_METHOD, |mut requests| async move {
                server.serve_queue(&mut requests).await
            })?;
        }
        if self.local_layers(&engine).is_none() {
            let n_layers = engine.info().n_layers as u32;
            self.serve(engine, 0..n_layers)?;
        }
        Ok(())
    }

    /// The helper server, once [`Node::serve_helper`] was called.
    pub fn helper_server(&self) -> Option<Arc<HelperServer>> {
        self.helper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Providers of `model` that answer a helper hello with a key signed by
    /// their identity, with the addresses their connections come from; and
    /// why the others are not helpers. Looks again (records may still be
    /// spreading) until `needed` answered or the find timeout passes.
    pub(super) async fn find_helpers(
        &self,
        model: crate::engine::ModelId,
        needed: usize,
    ) -> (Vec<(Candidate, RemoteHelper)>, Vec<String>) {
        let cfg = &self.options.private;
        let deadline = tokio::time::Instant::now() + cfg.find_timeout;
        let me = self.peer_id();
        let mut asked: Vec<PeerId> = vec![me];
        let (mut found, mut refused) = (Vec::new(), Vec::new());
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let providers = self
                .net
                .find_providers(model, None, left.max(std::time::Duration::from_millis(1)))
                .await
                .unwrap_or_else(|e| {
                    tracing::debug!("find providers: {e}");
                    Vec::new()
                });
            let mut peers: Vec<PeerId> = providers.iter().map(|p| p.peer_id).collect();
            peers.sort_by_key(|p| p.to_bytes());
            peers.dedup();
            peers.retain(|p| !asked.contains(p));
            asked.extend(&peers);
            let hellos = peers.iter().map(|&peer| {
                let net = self.net.clone();
                let timeout = cfg.helper_timeout.min(cfg.find_timeout);
                async move { (peer, link::hello(&*net, peer, model, timeout).await) }
            });
            for (peer, helper) in futures::future::join_all(hellos).await {
                match helper {
                    Ok(helper) => {
                        let candidate = Candidate {
                            peer,
                            observed: self.net.peer_addrs(peer).await.unwrap_or_default(),
                            rtt: self.net.rtt(peer).await.ok().flatten(),
                        };
                        found.push((candidate, helper));
                    }
                    Err(e) => {
                        tracing::debug!(%peer, "not a helper: {e}");
                        refused.push(format!("{peer}: {e}"));
                    }
                }
            }
            if found.len() >= needed || tokio::time::Instant::now() >= deadline {
                return (found, refused);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100).min(left)).await;
        }
    }

    /// [`Node::generate`] in [`Mode::Private`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn generate_private(
        &self,
        engine: &Arc<GgmlEngine>,
        request: &GenerateRequest,
        (helpers, spares): (usize, usize),
        prompt_ids: &[u32],
        n_ctx: usize,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<NodeOutput> {
        use rand::SeedableRng;
        if helpers < 2 {
            return Err(Error::InvalidArgument(format!(
                "private mode with {helpers} helpers: expected at least 2"
            )));
        }
        let needed = helpers.saturating_add(spares);
        let cfg = &self.options.private;
        let (found, refused) = self
            .handle
            .block_on(self.find_helpers(engine.info().id, needed));
        let candidates: Vec<Candidate> = found.iter().map(|(c, _)| c.clone()).collect();
        let chosen =
            select_helpers(&candidates, needed, &self.peer_id(), &cfg.selection).map_err(|s| {
                Error::NotEnoughHelpers {
                    needed: s.needed,
                    found: s.found,
                    candidates: s.candidates,
                    same_network: s.same_network,
                    refused: refused.clone(),
                }
            })?;
        let pool: Vec<RemoteHelper> = chosen
            .iter()
            .filter_map(|c| {
                found
                    .iter()
                    .find(|(f, _)| f.peer == c.peer)
                    .map(|(_, h)| h.clone())
            })
            .collect();
        let rtt_ms = chosen
            .iter()
            .map(|c| c.rtt.map(|d| d.as_secs_f64() * 1e3))
            .collect();
        let peers: Vec<PeerId> = pool.iter().map(|h| h.peer).collect();
        let links = NetworkLinks::new(
            self.net.clone(),
            self.handle.clone(),
            pool,
            cfg.helper_timeout,
        );
        let mut pp = PrivateProjector::with_links(
            &**engine,
            helpers,
            Box::new(links),
            rand_chacha::ChaCha20Rng::from_entropy(),
        )?;
        if let Some(dir) = &cfg.cache_dir {
            pp = pp.with_cache_dir(dir.clone());
        }
        let mut decode = PrivateStats::default();
        let mut decode_steps = 0u64;
        let n_layers = engine.info().n_layers;
        let mut session = engine.new_session(n_ctx)?;
        // The owner computes the adapters' rank-r paths itself (run_layers_with).
        engine.set_adapters(&mut session, &request.adapters)?;
        let mut forward = |tokens: &[u32], s: &mut GgmlSession| {
            let before = pp.stats();
            let mut project = |l: usize, p: crate::engine::Projection, x: &[f32], n: usize| {
                pp.project(l, p, x, n)
            };
            let mut h = engine.embed(tokens, engine.session_len(s, 0))?;
            engine.run_layers_with(0..n_layers, &mut h, s, &mut project)?;
            let logits = engine.head_with(&h, Logits::Last, s, &mut project)?;
            if tokens.len() == 1 {
                add_stats(&mut decode, &before, &pp.stats());
                decode_steps += 1;
            }
            Ok(logits)
        };
        let output = generate::generate_with(
            &**engine,
            &mut session,
            prompt_ids,
            &request.params,
            cancel,
            on_text,
            &mut forward,
        )?;
        Ok(NodeOutput {
            output,
            mode: Mode::Private { helpers, spares },
            pipeline: None,
            private: Some(PrivateReport {
                helpers: peers,
                active: pp.active_helpers().to_vec(),
                stats: pp.stats(),
                decode,
                decode_steps,
                dropped: pp.dropped_helpers().to_vec(),
                rtt_ms,
            }),
        })
    }
}

/// Adds the counters that grew from `before` to `after` to `into`.
pub(super) fn add_stats(into: &mut PrivateStats, before: &PrivateStats, after: &PrivateStats) {
    into.projections += after.projections - before.projections;
    into.round_trips += after.round_trips - before.round_trips;
    into.bytes_sent += after.bytes_sent - before.bytes_sent;
    into.bytes_received += after.bytes_received - before.bytes_received;
    into.checks_failed += after.checks_failed - before.checks_failed;
    into.owner_nanos += after.owner_nanos - before.owner_nanos;
    into.helper_nanos += after.helper_nanos - before.helper_nanos;
    into.helper_compute_nanos += after.helper_compute_nanos - before.helper_compute_nanos;
    into.helpers_dropped += after.helpers_dropped - before.helpers_dropped;
    into.retries += after.retries - before.retries;
}
