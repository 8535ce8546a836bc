//! Provider lookups: the DHT query, then `mesh/describe` to every provider
//! found, answered once all replied or the deadline passed.

use super::*;

impl State {
    pub(super) fn describe_body() -> Bytes {
        let req = Request {
            method: DESCRIBE_METHOD.into(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        };
        wire::encode_request(&req, usize::MAX).expect("no limit")
    }

    pub(super) fn on_providers_found(&mut self, id: kad::QueryId, providers: HashSet<PeerId>) {
        let Some(find) = self.finds.get_mut(&id) else {
            return;
        };
        let new: Vec<PeerId> = providers
            .into_iter()
            .filter(|p| find.asked.len() < MAX_DESCRIBED + 1 && find.asked.insert(*p))
            .collect();
        find.outstanding += new.len();
        for peer in new {
            let rid = self.send_request(peer, Self::describe_body());
            self.outbound
                .insert(rid, Outbound::Describe { find: id, peer });
        }
    }

    pub(super) fn on_describe(
        &mut self,
        find: kad::QueryId,
        peer: PeerId,
        result: Result<Response>,
    ) {
        let Some(f) = self.finds.get_mut(&find) else {
            return;
        };
        f.outstanding = f.outstanding.saturating_sub(1);
        match result.and_then(|r| wire::decode_describe(&r.meta)) {
            Ok((announcements, addrs)) => {
                for a in announcements {
                    if matches_find(&a, f.model, f.layer) {
                        f.found.push(Provider {
                            peer_id: peer,
                            layers: a.layers,
                            addrs: addrs.clone(),
                            free_memory: a.free_memory,
                            tokens_per_sec: a.tokens_per_sec,
                        });
                    }
                }
            }
            Err(e) => tracing::debug!("describe {peer}: {e}"),
        }
        if f.dht_done && f.outstanding == 0 {
            self.finish_find(find);
        }
    }

    pub(super) fn finish_find(&mut self, id: kad::QueryId) {
        if let Some(mut f) = self.finds.remove(&id) {
            f.found.sort_by(|a, b| {
                a.peer_id
                    .cmp(&b.peer_id)
                    .then(a.layers.start.cmp(&b.layers.start))
            });
            if let Some(r) = f.reply.take() {
                let _ = r.send(Ok(f.found));
            }
        }
    }

    pub(super) fn local_describe(&self) -> Response {
        Response {
            meta: wire::encode_describe(&self.announcements, &self.listen),
            tensor: Bytes::new(),
        }
    }

    pub(super) fn on_find_dht_done(&mut self, id: kad::QueryId) {
        if let Some(f) = self.finds.get_mut(&id) {
            f.dht_done = true;
            if f.outstanding == 0 {
                self.finish_find(id);
            }
        }
    }
}

pub(super) fn matches_find(a: &Announcement, model: ModelId, layer: Option<u32>) -> bool {
    a.model == model && layer.is_none_or(|l| a.layers.contains(&l))
}
