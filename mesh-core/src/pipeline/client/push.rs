//! Pushed decode steps (see the parent module's docs): the client's side of
//! a pushed forward, and [`Deliveries`], where the last stage's delivery
//! finds the session waiting for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::super::planner::Target;
use super::super::protocol::{
    decode_rows, encode_request, encode_rows, DType, DeliverMsg, ErrorCode, ForwardMsg, RouteHop,
    StageOp, StageReply, TruncateMsg, STAGE_METHOD, STAGE_VERSION,
};
use super::{ActiveHop, PipelineSession};
use crate::engine::Hidden;
use crate::network::{InboundRequest, PeerId, Request, Response};

/// Where pushed forwards' deliveries ([`DELIVER_METHOD`](crate::pipeline::DELIVER_METHOD) requests) find the
/// session waiting for them: one per node, shared by its pipeline sessions.
#[derive(Debug, Default)]
pub struct Deliveries {
    waiting: Mutex<HashMap<u64, (PeerId, oneshot::Sender<InboundRequest>)>>,
}

impl Deliveries {
    /// Hands each request arriving on `requests` (the queue of
    /// [`Network::handle`](crate::network::Network::handle) for [`DELIVER_METHOD`](crate::pipeline::DELIVER_METHOD)) to the session that
    /// expects it; refuses the others. Returns when the queue closes.
    pub async fn serve(self: Arc<Self>, requests: &mut mpsc::Receiver<InboundRequest>) {
        while let Some(inbound) = requests.recv().await {
            self.route(inbound);
        }
    }

    fn route(&self, inbound: InboundRequest) {
        let id = DeliverMsg::decode(inbound.request.meta.as_ref()).map(|m| m.deliver);
        let Ok(id) = id else {
            return inbound.reject("undecodable delivery");
        };
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        // Only the route's last peer may deliver; anyone else changes nothing.
        if waiting
            .get(&id)
            .is_some_and(|(from, _)| *from == inbound.peer)
        {
            if let Some((_, tx)) = waiting.remove(&id) {
                if let Err(inbound) = tx.send(inbound) {
                    inbound.reject("the delivery is no longer awaited");
                }
            }
        } else {
            drop(waiting);
            inbound.reject(format!("no delivery {id:#x} is expected from this peer"));
        }
    }

    fn expect(&self, id: u64, from: PeerId) -> oneshot::Receiver<InboundRequest> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (from, tx));
        rx
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (PeerId, oneshot::Sender<InboundRequest>)>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a pushed forward failed.
pub(super) enum PushFailure {
    /// The first stage answered with its rows: it does not push (an older
    /// node). The step went through that one hop.
    Unsupported,
    /// Anything else.
    Failed(String),
}

impl PipelineSession {
    /// One past the last hop of the run from `i` that one pushed forward can
    /// take: remote hops in a row, caught up, none departed or broken.
    pub(super) fn push_run(&mut self, i: usize) -> usize {
        self.drain_events();
        let mut end = i;
        while let Some(h) = self.hops.get(end) {
            match h.hop.target {
                Target::Peer(peer)
                    if h.done == h.inputs.len()
                        && h.broken.is_none()
                        && !self.departed.contains(&peer) =>
                {
                    end += 1
                }
                _ => break,
            }
        }
        end
    }

    /// Runs `input` through hops `i..end` as one pushed forward; records
    /// every hop's input as a star would.
    pub(super) fn push(
        &mut self,
        i: usize,
        end: usize,
        input: &Hidden,
    ) -> std::result::Result<Hidden, PushFailure> {
        let peer = |h: &ActiveHop| match h.hop.target {
            Target::Peer(p) => p,
            Target::Local => unreachable!("push_run takes remote hops only"),
        };
        let (first, last) = (peer(&self.hops[i]), peer(&self.hops[end - 1]));
        let deliveries = self.deliveries.clone().ok_or(PushFailure::Unsupported)?;
        let id = rand::random::<u64>().max(1);
        let dtype = self.config.dtype;
        let timeout = self.config.stage_timeout;
        let op = StageOp::Forward(ForwardMsg {
            session: self.hops[i].session,
            pos: input.pos as u64,
            n_tokens: input.n_tokens() as u32,
            dtype: dtype as i32,
            route: self.hops[i + 1..end]
                .iter()
                .map(|h| RouteHop {
                    peer: peer(h).to_bytes(),
                    session: h.session,
                })
                .collect(),
            deliver: id,
            timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
            ..ForwardMsg::default()
        });
        let (meta, tensor) = encode_request(op, encode_rows(&input.data, dtype));
        let sent = tensor.len() as u64;
        let delivery = deliveries.expect(id, last);
        let net = self.net.clone();
        let started = Instant::now();
        let outcome = self.rt.block_on(async move {
            let request = Request {
                method: STAGE_METHOD.into(),
                meta,
                tensor,
            };
            // The first stage answers once the next accepted (after the
            // delivery when all goes well): not awaited then.
            let mut answer =
                tokio::spawn(async move { net.request(first, request, timeout).await });
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline, delivery);
            let mut answered = false;
            loop {
                tokio::select! {
                    d = &mut delivery => {
                        return d.map_err(|_| PushFailure::Failed("delivery dropped".into()));
                    }
                    a = &mut answer, if !answered => {
                        answered = true;
                        let fail = |m: String| PushFailure::Failed(format!("stage {first}: {m}"));
                        match a {
                            Err(e) => return Err(fail(e.to_string())),
                            Ok(Err(e)) => return Err(fail(e.to_string())),
                            Ok(Ok(response)) => match StageReply::decode(response.meta.as_ref()) {
                                Err(e) => return Err(fail(format!("undecodable reply: {e}"))),
                                Ok(r) if r.code() != ErrorCode::None => {
                                    return Err(fail(format!("{}: {}", r.code(), r.message)));
                                }
                                Ok(_) if !response.tensor.is_empty() => {
                                    return Err(PushFailure::Unsupported);
                                }
                                Ok(_) => {}
                            },
                        }
                    }
                    _ = &mut deadline => {
                        return Err(PushFailure::Failed(format!(
                            "no delivery within {} ms",
                            timeout.as_millis()
                        )));
                    }
                }
            }
        });
        deliveries.forget(id);
        let inbound = outcome?;
        let received = inbound.request.tensor.len() as u64;
        let k = end - i;
        let parsed = parse_delivery(
            &inbound.request.meta,
            &inbound.request.tensor,
            input,
            k,
            dtype,
        );
        let (outputs, compute_us) = match parsed {
            Ok(p) => {
                let accepted = StageReply {
                    version: STAGE_VERSION,
                    ..StageReply::default()
                };
                inbound.respond(Response {
                    meta: Bytes::from(accepted.encode_to_vec()),
                    tensor: Bytes::new(),
                });
                p
            }
            Err(message) => {
                inbound.reject(message.clone());
                return Err(PushFailure::Failed(format!(
                    "delivery from {last}: {message}"
                )));
            }
        };
        let nanos = started.elapsed().as_nanos() as u64;
        let bytes = sent + received;
        self.stats.requests += 1;
        self.stats.pushed_steps += 1;
        self.stats.bytes += bytes;
        let compute = compute_us.iter().sum();
        self.stats
            .count_forward(k as u64, input.n_tokens(), nanos, compute, bytes);
        let mut h = input.clone();
        for (j, data) in (i..end).zip(outputs) {
            self.hops[j].inputs.push(h);
            self.hops[j].done += 1;
            h = Hidden {
                n_embd: input.n_embd,
                pos: input.pos,
                data,
            };
        }
        Ok(h)
    }

    /// After a failed push: truncates hops `i..end` back to `pos` positions,
    /// so the step can run hop by hop; a hop that cannot be truncated is
    /// marked broken (failed over at its next turn).
    pub(super) fn reset_hops(&mut self, i: usize, end: usize, pos: usize) {
        for j in i..end {
            let Target::Peer(peer) = self.hops[j].hop.target else {
                continue;
            };
            let op = StageOp::Truncate(TruncateMsg {
                session: self.hops[j].session,
                len: pos as u64,
            });
            if let Err(e) = self.request(peer, op, Bytes::new()) {
                self.hops[j].broken = Some(e);
            }
        }
    }
}

/// Checks a delivery of `k` hops' outputs for `input`; returns the outputs
/// and the hops' compute times, or why it is refused.
fn parse_delivery(
    meta: &[u8],
    tensor: &[u8],
    input: &Hidden,
    k: usize,
    dtype: DType,
) -> std::result::Result<(Vec<Vec<f32>>, Vec<u64>), String> {
    let msg = DeliverMsg::decode(meta).map_err(|e| format!("undecodable: {e}"))?;
    if msg.version != STAGE_VERSION
        || msg.pos != input.pos as u64
        || msg.n_tokens as usize != input.n_tokens()
        || msg.dtype != dtype as i32
        || msg.compute_us.len() != k
    {
        return Err(format!(
            "expected {k} hops of {} rows of {dtype:?} at {}, got {:?}",
            input.n_tokens(),
            input.pos,
            msg
        ));
    }
    let chunk = input.data.len() * dtype.size();
    if tensor.len() != chunk * k {
        return Err(format!(
            "{} tensor bytes for {k} hops of {chunk} bytes",
            tensor.len()
        ));
    }
    let outputs: Vec<Vec<f32>> = tensor
        .chunks_exact(chunk)
        .map(|c| decode_rows(c, dtype))
        .collect();
    if outputs.iter().flatten().any(|v| !v.is_finite()) {
        return Err("non-finite values".into());
    }
    Ok((outputs, msg.compute_us))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::{Identity, Reply};
    use crate::pipeline::DELIVER_METHOD;

    fn delivery(from: PeerId, meta: Vec<u8>) -> (InboundRequest, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            method: DELIVER_METHOD.into(),
            meta: Bytes::from(meta),
            tensor: Bytes::from_static(b"rows"),
        };
        (InboundRequest::new(from, request, tx), rx)
    }

    fn id(deliver: u64) -> Vec<u8> {
        DeliverMsg {
            version: STAGE_VERSION,
            deliver,
            ..DeliverMsg::default()
        }
        .encode_to_vec()
    }

    fn rejected(mut rx: oneshot::Receiver<Reply>) -> bool {
        matches!(rx.try_recv(), Ok(Reply::Err(..)))
    }

    /// A delivery reaches the session waiting for that id only from the
    /// peer it expects; anything else is refused and leaves it waiting.
    #[test]
    fn deliveries_reach_only_the_session_expecting_them_from_that_peer() {
        let d = Deliveries::default();
        let last = Identity::from_seed([1; 32]).peer_id();
        let other = Identity::from_seed([2; 32]).peer_id();
        let mut waiting = d.expect(7, last);
        for (from, meta) in [(other, id(7)), (last, id(8)), (last, b"\xff\xff".to_vec())] {
            let (inbound, reply) = delivery(from, meta);
            d.route(inbound);
            assert!(rejected(reply));
            assert!(waiting.try_recv().is_err());
        }
        let (inbound, _reply) = delivery(last, id(7));
        d.route(inbound);
        let got = waiting.try_recv().expect("delivered");
        assert_eq!((got.peer, &got.request.tensor[..]), (last, &b"rows"[..]));
        // Once delivered (or forgotten), the id is no longer expected.
        let (inbound, reply) = delivery(last, id(7));
        d.route(inbound);
        assert!(rejected(reply));
        let _w = d.expect(9, last);
        d.forget(9);
        let (inbound, reply) = delivery(last, id(9));
        d.route(inbound);
        assert!(rejected(reply));
    }

    proptest::proptest! {
        /// A delivery's meta and rows come from the network: any bytes are
        /// refused or accepted, never a panic; accepted ones hold k finite
        /// outputs of the input's size.
        #[test]
        fn any_delivery_is_parsed_or_refused_never_a_panic(
            meta in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            tensor in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            k in 0usize..4,
        ) {
            let input = Hidden { n_embd: 2, pos: 3, data: vec![0.5, -1.0] };
            if let Ok((outputs, compute_us)) = parse_delivery(&meta, &tensor, &input, k, DType::F32) {
                proptest::prop_assert_eq!(outputs.len(), k);
                proptest::prop_assert_eq!(compute_us.len(), k);
                proptest::prop_assert!(outputs.iter().all(|o| o.len() == 2));
            }
        }
    }

    /// A well-formed delivery parses; each field that does not match the
    /// step is refused.
    #[test]
    fn deliveries_must_match_the_step() {
        let input = Hidden {
            n_embd: 2,
            pos: 3,
            data: vec![0.5, -1.0],
        };
        let msg = DeliverMsg {
            version: STAGE_VERSION,
            deliver: 9,
            pos: 3,
            n_tokens: 1,
            dtype: DType::F32 as i32,
            compute_us: vec![4, 5],
        };
        let rows = encode_rows(&[1.0, 2.0, 3.0, 4.0], DType::F32);
        let (outputs, compute_us) =
            parse_delivery(&msg.encode_to_vec(), &rows, &input, 2, DType::F32).unwrap();
        assert_eq!(outputs, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(compute_us, vec![4, 5]);
        let bad_pos = DeliverMsg {
            pos: 4,
            ..msg.clone()
        };
        assert!(parse_delivery(&bad_pos.encode_to_vec(), &rows, &input, 2, DType::F32).is_err());
        assert!(parse_delivery(&msg.encode_to_vec(), &rows[..12], &input, 2, DType::F32).is_err());
        assert!(parse_delivery(&msg.encode_to_vec(), &rows, &input, 3, DType::F32).is_err());
        let nan = encode_rows(&[1.0, f32::NAN, 3.0, 4.0], DType::F32);
        assert!(parse_delivery(&msg.encode_to_vec(), &nan, &input, 2, DType::F32).is_err());
    }
}
