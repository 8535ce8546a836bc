//! A node's part in model sync: the files it offers and fetches (models,
//! adapters), its update store and gossip, and the ledger it runs.

use super::*;

impl Node {
    /// Lets this node's stages apply `adapter` for sessions that name it (by
    /// its hash): pipeline clients generating with that adapter can then use
    /// this node's layers. The adapter's model must be served ([`Node::serve`]
    /// first); returns its id.
    pub fn serve_adapter(&self, adapter: Arc<LoraAdapter>) -> Result<ModelId> {
        let id = adapter.id();
        self.stages.add_adapter(adapter)?;
        Ok(id)
    }

    /// Answers [`ADAPTER_METHOD`] requests for [`Node::offered`] files
    /// (started once).
    pub(super) fn offer_files(&self) -> Result<()> {
        let mut started = self.offering.lock().unwrap_or_else(|p| p.into_inner());
        if !*started {
            let offered = self.offered.clone();
            self.start_handler(ADAPTER_METHOD, move |requests| {
                crate::ledger::transfer::serve(offered, requests)
            })?;
            *started = true;
        }
        Ok(())
    }

    /// The files this node sends to peers that ask for them by hash: the
    /// GGUF files of served models and the adapters of its update store.
    pub fn offered(&self) -> &Offered {
        &self.offered
    }

    /// Fetches the GGUF file of model `id` into `store` (a no-op if it is
    /// there) from peers serving the model: providers are looked up in the
    /// DHT (again and again until one is found or the pipeline's find
    /// timeout passes) and asked in turn; the
    /// file is kept only if its BLAKE3 hash is `id` (see
    /// [`crate::ledger::transfer`]), so a lying provider costs time, never a
    /// wrong model. `progress` gets (bytes, size) as chunks arrive.
    pub fn fetch_model(
        &self,
        id: ModelId,
        store: &AdapterStore,
        config: &FetchConfig,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Fetched> {
        if let Some(path) = store.get(id) {
            return Ok(Fetched {
                path,
                from: None,
                failures: Vec::new(),
            });
        }
        let me = self.peer_id();
        let timeout = self.options.pipeline.find_timeout;
        let fetched = self.handle.block_on(async {
            // Right after joining, a lookup can end before the records
            // reach this node: look again until the find timeout passes.
            let deadline = tokio::time::Instant::now() + timeout;
            let mut peers: Vec<PeerId> = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let providers = self
                    .net
                    .find_providers(id, None, left.max(std::time::Duration::from_millis(1)))
                    .await?;
                for p in providers {
                    if p.peer_id != me && !peers.contains(&p.peer_id) {
                        peers.push(p.peer_id);
                    }
                }
                if !peers.is_empty() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(FIND_RETRY.min(left)).await;
            }
            if peers.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "no peer serves model {id} (looked for {timeout:?}); \
                     pass the model's GGUF file instead, or bootstrap from a node serving it"
                )));
            }
            crate::ledger::transfer::fetch_any_size(
                &self.net,
                store,
                id,
                MAX_MODEL_BYTES,
                &peers,
                config,
                progress,
            )
            .await
            .map_err(Error::from)
        })?;
        Ok(fetched)
    }

    /// Takes part in model sync: keeps adapters in an [`AdapterStore`] in
    /// `dir` and sends them to peers that ask ([`ADAPTER_METHOD`]), and
    /// listens to update records on [`UPDATE_TOPIC`] (gossip): records whose
    /// signature is not their author's are rejected (and not forwarded);
    /// verified ones are remembered ([`Node::updates`]) and reported as
    /// [`NodeEvent::Update`]. This node's own records (its latest 16) are
    /// sent again every 5 s for peers that join later. Calling it again is a
    /// no-op.
    pub fn enable_updates(&self, dir: impl Into<std::path::PathBuf>) -> Result<()> {
        let mut state = self.lock_updates();
        if state.is_some() {
            return Ok(());
        }
        let store = AdapterStore::open(dir)?;
        self.offered.set_store(store.clone());
        self.offer_files()?;
        let net = self.net.clone();
        let validator: network::Validator = Arc::new(|_, data| match UpdateRecord::decode(data) {
            Ok(_) => network::Validation::Accept,
            Err(_) => network::Validation::Reject,
        });
        let mut rx = self.handle.block_on(async {
            net.set_validator(UPDATE_TOPIC, validator).await?;
            net.subscribe(UPDATE_TOPIC).await
        })?;
        let (updates, events) = (self.updates.clone(), self.events.clone());
        let task = self.handle.spawn(async move {
            while let Some(msg) = rx.recv().await {
                // Validated on arrival; decoded again for the record itself.
                let Ok(record) = UpdateRecord::decode(&msg.data) else {
                    continue;
                };
                let fresh = updates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .is_some_and(|u| u.remember(&record));
                if fresh {
                    let _ = events.send(NodeEvent::Update(Box::new(record)));
                }
            }
        });
        self.lock_tasks().push(task);
        // Gossip reaches only peers there at the time: this node's own
        // records are sent again now and then, for peers that join later.
        let (updates, net, me) = (self.updates.clone(), self.net.clone(), self.peer_id());
        let task = self.handle.spawn(async move {
            let mut tick = tokio::time::interval(UPDATE_REPUBLISH);
            tick.tick().await;
            loop {
                tick.tick().await;
                let own: Vec<Vec<u8>> = updates
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|u| {
                        let mine = u.seen.iter().filter(|r| r.author == me);
                        let mine: Vec<&UpdateRecord> = mine.collect();
                        let skip = mine.len().saturating_sub(MAX_REPUBLISHED);
                        mine[skip..].iter().map(|r| r.encode()).collect()
                    })
                    .unwrap_or_default();
                for data in own {
                    if let Err(e) = net.publish(UPDATE_TOPIC, bytes::Bytes::from(data)).await {
                        tracing::debug!("republishing an update: {e}");
                    }
                }
            }
        });
        self.lock_tasks().push(task);
        *state = Some(Updates {
            store,
            seen: Vec::new(),
        });
        Ok(())
    }

    pub(super) fn lock_updates(&self) -> std::sync::MutexGuard<'_, Option<Updates>> {
        self.updates.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn update_store(&self) -> Result<AdapterStore> {
        self.lock_updates()
            .as_ref()
            .map(|u| u.store.clone())
            .ok_or_else(|| {
                Error::InvalidArgument("model sync is not enabled (Node::enable_updates)".into())
            })
    }

    /// Runs the ledger of `genesis` on this node's network with its identity:
    /// a validator if the identity has stake in `genesis`, a follower
    /// otherwise (see [`crate::ledger::consensus`]). Decided blocks go to
    /// `store` (e.g. a [`crate::ledger::db::LedgerDb`]). With model sync
    /// enabled ([`Node::enable_updates`]) the blocks carry update records
    /// ([`crate::ledger::pool::UpdatePool`]): proposed when heard and held,
    /// accepted only when this node holds (or has fetched) every adapter a
    /// block names and each loads for a model served here. Without it,
    /// blocks are empty. The ledger runs until the handle is dropped.
    pub fn start_ledger(
        &self,
        genesis: crate::ledger::chain::Genesis,
        store: Box<dyn crate::ledger::consensus::ChainStore>,
        config: crate::ledger::consensus::LedgerConfig,
    ) -> Result<crate::ledger::consensus::LedgerHandle> {
        let Some(identity) = &self.identity else {
            return Err(Error::InvalidArgument(
                "running a ledger needs the node's identity (Node::with_identity)".into(),
            ));
        };
        let builder: Box<dyn crate::ledger::consensus::BlockBuilder> = match self.update_store() {
            Ok(store) => {
                let updates = self.updates.clone();
                let seen: crate::ledger::pool::SeenUpdates = Arc::new(move || {
                    updates
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map(|u| u.seen.clone())
                        .unwrap_or_default()
                });
                Box::new(crate::ledger::pool::UpdatePool::new(
                    store,
                    seen,
                    self.net.clone(),
                    self.handle.clone(),
                    self.served_engines(),
                ))
            }
            Err(_) => Box::new(crate::ledger::consensus::EmptyBlocks),
        };
        self.handle.block_on(crate::ledger::consensus::start(
            self.net.clone(),
            genesis,
            identity,
            store,
            builder,
            config,
        ))
    }

    /// Gives `amount` of this node's stake in `ledger` (started with
    /// [`Node::start_ledger`]) to `to`: a transfer signed with this node's
    /// identity, numbered after its last decided one, sent to the
    /// validators. It takes effect at the height after the block that
    /// carries it (see [`crate::ledger::stake`]); an error now if this
    /// node does not hold `amount` at the ledger's current height.
    pub fn transfer_stake(
        &self,
        ledger: &crate::ledger::consensus::LedgerHandle,
        to: PeerId,
        amount: u64,
    ) -> Result<crate::ledger::StakeTransfer> {
        let Some(identity) = &self.identity else {
            return Err(Error::InvalidArgument(
                "giving stake needs the node's identity (Node::with_identity)".into(),
            ));
        };
        Ok(ledger.transfer_stake(identity, to, amount)?)
    }

    /// Verified update records seen so far, oldest first.
    pub fn updates(&self) -> Vec<UpdateRecord> {
        self.lock_updates()
            .as_ref()
            .map(|u| u.seen.clone())
            .unwrap_or_default()
    }

    /// Publishes the adapter at `path` as an update of `engine`'s model: checks
    /// it against the model (a bad adapter is [`Error::Adapter`]), copies it
    /// into the store (peers fetch it from here), signs a record with this
    /// node's identity and announces it by gossip. Returns the record.
    pub fn publish_update(
        &self,
        engine: &GgmlEngine,
        path: &std::path::Path,
        parent: Option<UpdateId>,
        metrics: Vec<(String, f64)>,
    ) -> Result<UpdateRecord> {
        let Some(identity) = &self.identity else {
            return Err(Error::InvalidArgument(
                "publishing an update needs the node's identity (Node::with_identity)".into(),
            ));
        };
        let store = self.update_store()?;
        // One read: the bytes checked against the model are the bytes stored.
        let bytes = LoraAdapter::read_file(path)?;
        let adapter = LoraAdapter::from_bytes(&bytes, engine.info())?;
        let id = store.put(&bytes)?;
        let record = UpdateRecord::sign(
            identity,
            UpdateDraft {
                base: engine.info().id,
                adapter: id,
                adapter_size: adapter.file_size(),
                parent,
                metrics,
            },
        )?;
        if let Some(u) = self.lock_updates().as_mut() {
            u.remember(&record);
        }
        let data = bytes::Bytes::from(record.encode());
        // Nobody subscribed yet is not a failure (publish succeeds).
        self.handle.block_on(self.net.publish(UPDATE_TOPIC, data))?;
        let _ = self
            .events
            .send(NodeEvent::Update(Box::new(record.clone())));
        Ok(record)
    }

    /// Fetches the adapter `record` names (from its author first, then every
    /// connected peer; verified by hash, see [`crate::ledger::transfer`]) and
    /// loads it for `engine`, which must run the record's base model.
    /// Returns the adapter, ready for [`GenerateRequest::adapters`], and how
    /// it was fetched.
    pub fn fetch_update(
        &self,
        engine: &GgmlEngine,
        record: &UpdateRecord,
        config: &FetchConfig,
    ) -> Result<(Arc<LoraAdapter>, Fetched)> {
        if record.base != engine.info().id {
            return Err(Error::InvalidArgument(format!(
                "update {} is for model {}, the engine runs {}",
                record.id(),
                record.base,
                engine.info().id
            )));
        }
        self.fetch_adapter(
            engine,
            record.adapter,
            record.adapter_size,
            record.author,
            config,
        )
    }

    /// Fetches the adapter `id` of `size` bytes (from `holder` first, then
    /// every connected peer; verified by hash) into the update store and
    /// loads it for `engine`. For adapters named by the ledger
    /// ([`crate::ledger::consensus::LedgerHandle::active_source`]), e.g. an
    /// aggregate no update record names.
    pub fn fetch_adapter(
        &self,
        engine: &GgmlEngine,
        id: ModelId,
        size: u64,
        holder: PeerId,
        config: &FetchConfig,
    ) -> Result<(Arc<LoraAdapter>, Fetched)> {
        let store = self.update_store()?;
        let fetched = self.handle.block_on(crate::ledger::transfer::fetch_via(
            &self.net, &store, id, size, holder, config,
        ))?;
        let adapter = engine.load_adapter(&fetched.path)?;
        Ok((adapter, fetched))
    }
}
