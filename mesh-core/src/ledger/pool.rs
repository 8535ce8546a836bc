//! What a node's ledger proposes and accepts: update records heard by
//! gossip whose adapters it holds.
//!
//! [`UpdatePool`] is the [`BlockBuilder`] of [`crate::node::Node::start_ledger`]:
//! a proposer includes, per base model, the oldest record heard that is not
//! decided yet and whose adapter is in its store (verified by hash; loaded
//! against the model when the node serves it), and makes it the active
//! adapter. A validator accepts a block only if it holds every adapter the
//! block names (fetching a missing one in the background, so a later round
//! can pass) and each loads for the model it names when served here: nobody
//! votes for an update it could not run.
//!
//! Competing updates for one model (up to [`MAX_AGGREGATED`] per block) are
//! combined by [`crate::ledger::aggregate()`] (norm clipping, then Multi-Krum
//! with [`byzantine_for`] updates tolerated); the proposer stores the
//! result and names it in the block, and every validator recomputes it
//! from the same files in the same order and votes only for an identical
//! adapter (the aggregate is bit-reproducible). Aggregating needs the model:
//! a node that does not serve it includes one update per model, and does
//! not vote for aggregates of it.
//!
//! A fetch that fails (no peer sends the adapter, or every one that did sent
//! other bytes than its hash names) is tried again only after a pause that
//! doubles with each failure ([`retry_delay`]: 1 s, 2 s, 4 s, ... up to 5
//! minutes): an author that lies about its adapter costs each validator a
//! handful of transfers, not one per block, and its update is never decided.
//! A failed adapter is remembered only while a record naming it is heard of.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use super::aggregate::{aggregate, AggregateConfig};
use super::chain::{byzantine_for, AggregateEntry, Block, BlockDraft};
use super::consensus::BlockBuilder;
use super::{AdapterStore, FetchConfig, UpdateId, UpdateRecord};
use crate::engine::{Engine, GgmlEngine, ModelId};
use crate::network::Network;

/// Most updates of one model aggregated in one block.
pub const MAX_AGGREGATED: usize = 8;

/// Longest pause between two fetches of an adapter that could not be fetched.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// The pause before fetching an adapter again after `failures` failed
/// fetches of it: 1 s after the first, doubling, at most [`MAX_RETRY_DELAY`].
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << doublings).min(MAX_RETRY_DELAY)
}

/// One adapter's fetches: whether one runs, and when to try after failures.
#[derive(Clone, Copy, Debug, Default)]
struct Fetching {
    running: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The records a node has heard, oldest first.
pub type SeenUpdates = Arc<dyn Fn() -> Vec<UpdateRecord> + Send + Sync>;

/// Update records for blocks (see the module documentation).
pub struct UpdatePool {
    store: AdapterStore,
    seen: SeenUpdates,
    net: Arc<dyn Network>,
    handle: Handle,
    engines: Vec<Arc<GgmlEngine>>,
    decided: HashSet<UpdateId>,
    /// Adapters being fetched or that failed to fetch (see [`retry_delay`]).
    fetching: Arc<Mutex<HashMap<ModelId, Fetching>>>,
    /// Adapters (content-addressed, so for good) that loaded for their model.
    loadable: HashSet<ModelId>,
    /// Aggregates computed: (inputs, byzantine) -> the result.
    aggregated: std::collections::HashMap<(Vec<UpdateId>, u32), AggregateEntry>,
}

impl UpdatePool {
    /// A pool over `store` and the records `seen` returns; missing adapters
    /// are fetched over `net` on `handle`; adapters for `engines`' models
    /// must load for them.
    pub fn new(
        store: AdapterStore,
        seen: SeenUpdates,
        net: Arc<dyn Network>,
        handle: Handle,
        engines: Vec<Arc<GgmlEngine>>,
    ) -> UpdatePool {
        UpdatePool {
            store,
            seen,
            net,
            handle,
            engines,
            decided: HashSet::new(),
            fetching: Arc::new(Mutex::new(HashMap::new())),
            loadable: HashSet::new(),
            aggregated: std::collections::HashMap::new(),
        }
    }

    /// The aggregate of `records` (one base model, held, in this order),
    /// written to the store; cached.
    fn aggregate_of(
        &mut self,
        records: &[UpdateRecord],
        byzantine: u32,
    ) -> Result<AggregateEntry, String> {
        let key = (
            records.iter().map(|r| r.id()).collect::<Vec<_>>(),
            byzantine,
        );
        if let Some(done) = self.aggregated.get(&key) {
            if self.store.get(done.adapter).is_some() {
                return Ok(*done);
            }
        }
        let base = records.first().ok_or("nothing to aggregate")?.base;
        let engine = self
            .engines
            .iter()
            .find(|e| e.info().id == base)
            .ok_or_else(|| {
                format!("model {base} is not served here: cannot aggregate its updates")
            })?;
        let mut adapters = Vec::with_capacity(records.len());
        for r in records {
            let path = self
                .store
                .get(r.adapter)
                .ok_or_else(|| format!("adapter {} is not held here", r.adapter))?;
            adapters.push(engine.load_adapter(&path).map_err(|e| e.to_string())?);
        }
        let refs: Vec<&crate::engine::LoraAdapter> = adapters.iter().map(|a| a.as_ref()).collect();
        let config = AggregateConfig {
            byzantine: byzantine as usize,
            clip_bound: None,
        };
        let result = aggregate(engine.info(), &refs, &config).map_err(|e| e.to_string())?;
        let adapter = self.store.put(&result.adapter).map_err(|e| e.to_string())?;
        let entry = AggregateEntry {
            adapter,
            adapter_size: result.adapter.len() as u64,
            byzantine,
        };
        self.aggregated.insert(key, entry);
        Ok(entry)
    }

    /// Whether `record`'s adapter is held (and loads for its model when
    /// served here); starts fetching it when it is not held.
    fn usable(&mut self, record: &UpdateRecord) -> Result<(), String> {
        let Some(path) = self.store.get(record.adapter) else {
            self.fetch(record);
            return Err(format!(
                "adapter {} of update {} is not held here yet",
                record.adapter,
                record.id()
            ));
        };
        if self.loadable.contains(&record.adapter) {
            return Ok(());
        }
        if let Some(engine) = self.engines.iter().find(|e| e.info().id == record.base) {
            engine
                .load_adapter(&path)
                .map_err(|e| format!("update {}: {e}", record.id()))?;
            // Only a load proves the file fits the model; without the model
            // every check loads again once it is served (it never is here).
            self.loadable.insert(record.adapter);
        }
        Ok(())
    }

    fn fetch(&self, record: &UpdateRecord) {
        let now = Instant::now();
        let start = self.fetching.lock().is_ok_and(|mut f| {
            let state = f.entry(record.adapter).or_default();
            if state.running || state.retry_at.is_some_and(|t| now < t) {
                return false;
            }
            state.running = true;
            true
        });
        if !start {
            return;
        }
        let (net, store, fetching) = (self.net.clone(), self.store.clone(), self.fetching.clone());
        let record = record.clone();
        self.handle.spawn(async move {
            let result = super::transfer::fetch_via(
                &net,
                &store,
                record.adapter,
                record.adapter_size,
                record.author,
                &FetchConfig::default(),
            )
            .await;
            let Ok(mut f) = fetching.lock() else {
                return;
            };
            match result {
                Ok(_) => {
                    f.remove(&record.adapter);
                }
                Err(e) => {
                    let state = f.entry(record.adapter).or_default();
                    state.running = false;
                    state.failures += 1;
                    let pause = retry_delay(state.failures);
                    state.retry_at = Some(Instant::now() + pause);
                    tracing::info!(
                        "ledger: fetching adapter {} (failure {}; next try in {pause:?}): {e}",
                        record.adapter,
                        state.failures
                    );
                }
            }
        });
    }
}

impl BlockBuilder for UpdatePool {
    fn draft(&mut self, _height: u64) -> BlockDraft {
        // Per base model, the oldest usable records not decided yet.
        let mut by_base: std::collections::BTreeMap<ModelId, Vec<UpdateRecord>> =
            std::collections::BTreeMap::new();
        let seen = (self.seen)();
        // Failed fetches are remembered only while their records are heard
        // of (at most the node's bounded record list), so bogus records
        // cannot grow the map without bound.
        let heard: HashSet<ModelId> = seen.iter().map(|r| r.adapter).collect();
        if let Ok(mut f) = self.fetching.lock() {
            f.retain(|id, state| state.running || heard.contains(id));
        }
        for record in seen {
            let group = by_base.entry(record.base).or_default();
            if self.decided.contains(&record.id()) || group.len() >= MAX_AGGREGATED {
                continue;
            }
            if self.usable(&record).is_ok() {
                group.push(record);
            }
        }
        let mut draft = BlockDraft::default();
        for (base, mut group) in by_base {
            if group.len() > 1 {
                let f = byzantine_for(group.len());
                match self.aggregate_of(&group, f) {
                    Ok(entry) => {
                        draft.active.insert(base, entry.adapter);
                        draft.aggregates.insert(base, entry);
                        draft.updates.extend(group);
                        continue;
                    }
                    Err(e) => {
                        tracing::info!("ledger: proposing one update of {base}: {e}");
                        group.truncate(1);
                    }
                }
            }
            if let Some(record) = group.pop() {
                draft.active.insert(base, record.adapter);
                draft.updates.push(record);
            }
        }
        draft
    }

    fn check(&mut self, block: &Block) -> Result<(), String> {
        for record in &block.updates {
            if self.decided.contains(&record.id()) {
                return Err(format!("update {} was decided before", record.id()));
            }
            self.usable(record)?;
        }
        for (base, claimed) in &block.aggregates {
            let inputs: Vec<UpdateRecord> = block
                .updates
                .iter()
                .filter(|u| u.base == *base)
                .cloned()
                .collect();
            let mine = self.aggregate_of(&inputs, claimed.byzantine)?;
            if mine != *claimed {
                return Err(format!(
                    "the aggregate of {base} is {} ({} bytes) here, not {} ({} bytes)",
                    mine.adapter, mine.adapter_size, claimed.adapter, claimed.adapter_size
                ));
            }
        }
        Ok(())
    }

    fn decided(&mut self, block: &Block) {
        self.decided.extend(block.updates.iter().map(|r| r.id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_retries_back_off_to_a_cap() {
        let delays: Vec<u64> = (1..=12).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(0), Duration::from_secs(1));
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }
}
