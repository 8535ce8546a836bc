//! One delegated projection: shares out, sealed requests to the helpers,
//! replies checked, and a failed helper replaced by a spare.

use super::*;

impl<'e, E: Engine, R: RngCore + CryptoRng> PrivateProjector<'e, E, R> {
    /// One request (wire code `op`) for the projections `group` of `layer`,
    /// which share their input: one sharing of `x`, one round trip to every
    /// helper, one checked and decoded output per projection. Accounts the
    /// owner's and the helpers' time in the stats.
    pub(super) fn delegate(
        &mut self,
        layer: usize,
        op: u8,
        group: &[Projection],
        x: &[f32],
        n: usize,
    ) -> Result<Vec<Vec<f32>>> {
        // One-time set-up of the matrices is not per-token overhead.
        for p in group {
            self.matrix_state(layer, *p)?;
        }
        let start = Instant::now();
        let helpers_before = self.stats.helper_nanos;
        let result = self.delegate_timed(layer, op, group, x, n);
        let total = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let in_helpers = self.stats.helper_nanos - helpers_before;
        self.stats.owner_nanos += total.saturating_sub(in_helpers);
        result
    }

    /// [`Self::delegate`] without the time accounting: one step, attempted
    /// again with fresh shares (on spares, once the culprits are dropped) as
    /// long as the helpers are at fault and someone can take their place.
    pub(super) fn delegate_timed(
        &mut self,
        layer: usize,
        op: u8,
        group: &[Projection],
        x: &[f32],
        n: usize,
    ) -> Result<Vec<Vec<f32>>> {
        self.step += 1;
        let mut attempt = 0u32;
        let mut unattributed_retry = false;
        loop {
            let (culprits, error) = match self.attempt(layer, op, group, x, n, attempt) {
                Ok(outs) => return Ok(outs),
                Err(Failure::Fatal(e)) => return Err(*e),
                Err(Failure::Helpers { culprits, error }) => (culprits, *error),
            };
            if culprits.is_empty() {
                // Nobody named: fresh shares on the same helpers, once.
                if unattributed_retry {
                    return Err(error.into());
                }
                unattributed_retry = true;
            } else {
                if culprits.len() > self.spares.len() {
                    return Err(error.into());
                }
                for &position in &culprits {
                    let helper = self.active[position];
                    let spare = self.spares.remove(0);
                    tracing::warn!(
                        helper,
                        spare,
                        layer,
                        op,
                        step = self.step,
                        attempt,
                        "private delegation: dropping a helper: {error}"
                    );
                    self.dropped.push(DroppedHelper {
                        helper,
                        peer: self.transport.helper_peer(helper),
                        layer: layer as u32,
                        op,
                        step: self.step,
                        attempt,
                        reason: error.to_string(),
                    });
                    self.stats.helpers_dropped += 1;
                    self.active[position] = spare;
                }
            }
            self.stats.retries += 1;
            attempt = attempt.checked_add(1).ok_or_else(|| {
                Error::InvalidArgument("private delegation: too many attempts".into())
            })?;
        }
    }

    /// One attempt of a step: fresh shares of `x` to the active helpers,
    /// their replies checked and decoded.
    pub(super) fn attempt(
        &mut self,
        layer: usize,
        op: u8,
        group: &[Projection],
        x: &[f32],
        n: usize,
        attempt: u32,
    ) -> std::result::Result<Vec<Vec<f32>>, Failure> {
        // Formatted only into errors.
        let name = Named(layer, group);
        let mut shapes = Vec::with_capacity(group.len());
        let mut format = None;
        // Elementwise max of the column bounds: a fixed point valid for every
        // matrix of the group.
        let mut bounds: Vec<u64> = Vec::new();
        for p in group {
            let st = self.matrix_state(layer, *p)?;
            if bounds.is_empty() {
                bounds = st.bounds.clone();
            } else if bounds.len() != st.cols {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the fused matrices differ in width"
                ))
                .into());
            } else {
                bounds
                    .iter_mut()
                    .zip(&st.bounds)
                    .for_each(|(b, c)| *b = (*b).max(*c));
            }
            shapes.push(st.rows);
            if format.is_some_and(|f| f != st.format) {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the fused matrices take differently quantized inputs"
                ))
                .into());
            }
            format = Some(st.format);
        }
        let format = format.unwrap_or(ActivationFormat::F32);
        let cols = bounds.len();
        let rows: usize = shapes.iter().sum();
        if n == 0 || Some(x.len()) != n.checked_mul(cols) {
            return Err(Error::InvalidArgument(format!(
                "{name} input: expected {n} tokens of {cols} values, found {} values",
                x.len()
            ))
            .into());
        }
        let (rows32, cols32, n32) =
            match (u32::try_from(rows), u32::try_from(cols), u32::try_from(n)) {
                (Ok(r), Ok(c), Ok(n)) => (r, c, n),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{name}: {n} tokens of a {rows}x{cols} matrix do not fit the wire format"
                    ))
                    .into())
                }
            };
        // The values ggml's quantized mat-vec would multiply (its integers
        // times the block scales, exact in f64): the ring then reproduces the
        // local path's integer dot products.
        // Every buffer that holds the input, its encoding, the helpers' partial
        // results or their sum is zeroed when dropped, on every return path.
        let xq = Zeroizing::new(quantize_like_ggml(format, x)?);
        let encoded = ring::encode_batch(&xq, &bounds);
        // Per token and block of 32: ggml's s minus the exact block sum.
        let s_delta = Zeroizing::new(if self.match_ggml_s && format == ActivationFormat::Q8_1 {
            for p in group {
                self.ensure_mins(layer, *p)?;
            }
            let s = q8_1_sums(x)?;
            s.iter()
                .zip(xq.chunks_exact(32))
                .map(|(s, b)| f64::from(*s) - b.iter().sum::<f64>())
                .collect()
        } else {
            Vec::new()
        });
        // What the fixed-point grid cannot hold exactly (activations far below
        // their token's maximum): the owner multiplies that part in itself.
        let residual = Residuals(match &encoded {
            Ok((xr, params)) => residuals(&xq, xr, params, cols),
            Err(_) => Vec::new(),
        });
        drop(xq);
        let (xr, params) = encoded?;
        let xr = Zeroizing::new(xr);
        let n_helpers = self.active.len();
        let shares = share(&xr, n_helpers, &mut self.rng)?;
        self.stats.round_trips += 1;
        if attempt == 0 {
            self.stats.projections += group.len() as u64;
        }
        let mut y = Zeroizing::new(vec![0u64; n * rows]);
        // Each helper's partial result, kept until the checks pass so a
        // failure can be attributed to a helper.
        let mut parts: Vec<Zeroizing<Vec<u64>>> = Vec::with_capacity(n_helpers);
        // A helper whose session cannot be opened has failed like one that
        // does not answer.
        let mut culprits = Vec::new();
        let mut first_error = None;
        for i in 0..n_helpers {
            if let Err(e) = self.ensure_link(self.active[i]) {
                culprits.push(i);
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(Failure::Helpers {
                error: Box::new(self.failure(
                    &culprits,
                    (layer, op, attempt),
                    HelperFailureKind::NoSession,
                    format!(
                        "delegated {name} (step {}, attempt {attempt}): helper{} {:?} could not \
                         open a session: {e}",
                        self.step,
                        if culprits.len() > 1 { "s" } else { "" },
                        culprits.iter().map(|&i| self.active[i]).collect::<Vec<_>>(),
                    ),
                )),
                culprits,
            });
        }
        // Seal every share, then send them all at once.
        let mut calls = Vec::with_capacity(n_helpers);
        for i in 0..n_helpers {
            // Share position `i` goes to pool helper `h`.
            let h = self.active[i];
            let (kind, mut payload) = {
                let mut p =
                    Vec::with_capacity(4 + if i + 1 < n_helpers { 32 } else { xr.len() * 8 });
                p.extend_from_slice(&n32.to_le_bytes());
                if i + 1 < n_helpers {
                    p.extend_from_slice(shares.seeds()[i].as_bytes());
                    (KIND_SEED, p)
                } else {
                    for v in shares.last() {
                        p.extend_from_slice(&v.to_le_bytes());
                    }
                    (KIND_FULL, p)
                }
            };
            let header = EnvelopeHeader {
                direction: Direction::OwnerToHelper,
                kind,
                n: n_helpers as u16,
                helper_index: i as u16,
                op,
                layer: layer as u32,
                session_id: self.session_id,
                owner_peer: self.owner_peer.clone(),
                helper_peer: self.transport.helper_peer(h),
                model_hash: self.model_hash,
                step: self.step,
                rows: rows32,
                cols: cols32,
                attempt,
                request_hash: *blake3::hash(&payload).as_bytes(),
            };
            let link = self.links[h].as_mut().expect("opened above");
            let sealed = link.to_helper.seal(&header, &payload);
            payload.zeroize();
            match sealed {
                Ok(envelope) => {
                    self.stats.bytes_sent += envelope.len() as u64;
                    calls.push(HelperCall {
                        helper: h,
                        header,
                        envelope,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let headers: Vec<EnvelopeHeader> = calls.iter().map(|c| c.header.clone()).collect();
        // The transport: the header's fields travel in the clear next to the envelope.
        let in_helpers = Instant::now();
        let answers = self.transport.exchange(calls);
        self.stats.helper_nanos +=
            u64::try_from(in_helpers.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.helper_compute_nanos += answers
            .iter()
            .filter_map(|a| a.as_ref().ok().map(|a| a.compute_nanos))
            .max()
            .unwrap_or(0);
        let mut errors = Vec::new();
        for (i, (answer, header)) in answers.into_iter().zip(headers).enumerate() {
            let h = self.active[i];
            let expected = EnvelopeHeader {
                direction: Direction::HelperToOwner,
                kind: KIND_RESULT,
                ..header
            };
            // No answer, an envelope that does not open, a reply of the wrong
            // size: this helper's fault.
            let part = answer.and_then(|reply| {
                self.stats.bytes_received += reply.envelope.len() as u64;
                let link = self.links[h].as_mut().expect("opened above");
                let mut opened = link.from_helper.open(&expected, &reply.envelope)?;
                let part = decode_reply(&opened.payload, y.len());
                opened.payload.zeroize();
                part
            });
            match part {
                Ok(part) => parts.push(Zeroizing::new(part)),
                Err(e) => {
                    culprits.push(i);
                    errors.push(format!("helper {h} gave no usable answer: {e}"));
                }
            }
        }
        if !culprits.is_empty() {
            return Err(Failure::Helpers {
                error: Box::new(self.failure(
                    &culprits,
                    (layer, op, attempt),
                    HelperFailureKind::NoAnswer,
                    format!(
                        "delegated {name} (step {}, attempt {attempt}): {}",
                        self.step,
                        errors.join("; ")
                    ),
                )),
                culprits,
            });
        }
        for part in &parts {
            ring::add_assign(&mut y, part);
        }
        // Check every product before decoding any of them.
        let mut failed = None;
        let mut offset = 0;
        for (p, r) in group.iter().zip(&shapes) {
            let span = offset..offset + n * r;
            let st = &self.matrices[&(layer, *p)];
            if let Err(failure) = st.checker.check(&xr, &y[span.clone()]) {
                failed = Some((*p, span, failure));
                break;
            }
            offset += n * r;
        }
        drop(xr);
        if let Some((p, span, failure)) = failed {
            self.stats.checks_failed += 1;
            let slices: Vec<&[u64]> = parts.iter().map(|v| &v[span.clone()]).collect();
            let culprits = self.attribute(layer, p, &shares, &slices);
            drop(parts);
            let culprits = culprits.unwrap_or_default();
            let who = if culprits.is_empty() {
                format!("one of helpers {:?} (not attributable)", self.active)
            } else {
                format!(
                    "helper{} {}",
                    if culprits.len() > 1 { "s" } else { "" },
                    culprits
                        .iter()
                        .map(|&i| self.active[i].to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(Failure::Helpers {
                error: Box::new(self.failure(
                    &culprits,
                    (layer, op, attempt),
                    HelperFailureKind::WrongResult,
                    format!(
                        "delegated layer {layer} {p:?} (step {}, attempt {attempt}): {who} \
                         returned a wrong result; the reconstruction failed the integrity check \
                         ({failure})",
                        self.step
                    ),
                )),
                culprits,
            });
        }
        drop(parts);
        drop(shares);
        let mut outs = Vec::with_capacity(group.len());
        let mut offset = 0;
        for (p, r) in group.iter().zip(&shapes) {
            let mut out =
                Zeroizing::new(ring::decode_batch(&y[offset..offset + n * r], *r, &params)?);
            if let (Some(mins), false) = (&self.matrices[&(layer, *p)].mins, s_delta.is_empty()) {
                let nb = cols / 32;
                for (yt, dt) in out.chunks_exact_mut(*r).zip(s_delta.chunks_exact(nb)) {
                    for (yv, mr) in yt.iter_mut().zip(mins.chunks_exact(nb)) {
                        *yv += mr
                            .iter()
                            .zip(dt)
                            .map(|(m, d)| f64::from(*m) * d)
                            .sum::<f64>();
                    }
                }
            }
            if !residual.0.is_empty() {
                self.add_residual_product(layer, *p, *r, &residual.0, &mut out)?;
            }
            outs.push(out.iter().map(|v| *v as f32).collect());
            offset += n * r;
        }
        Ok(outs)
    }

    /// The typed failure of a step naming the helpers at share positions `culprits`.
    pub(super) fn failure(
        &self,
        culprits: &[usize],
        (layer, op, attempt): (usize, u8, u32),
        kind: HelperFailureKind,
        message: String,
    ) -> HelperFailure {
        let peer = |h: usize| {
            let bytes = self.transport.helper_peer(h);
            crate::network::PeerId::from_bytes(&bytes)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
        };
        HelperFailure {
            helpers: culprits
                .iter()
                .map(|&i| (self.active[i], peer(self.active[i])))
                .collect(),
            layer: layer as u32,
            op,
            step: self.step,
            attempt,
            kind,
            message,
        }
    }
}

/// `layer L [projections]`, as errors name a delegated step.
struct Named<'a>(usize, &'a [Projection]);

impl std::fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer {} {:?}", self.0, self.1)
    }
}
