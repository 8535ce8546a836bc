//! The owner's integrity checks: per-matrix state, Freivalds check vectors
//! (cached on disk), residuals, and attributing a failed check to a helper.

use super::*;

impl<'e, E: Engine, R: RngCore + CryptoRng> PrivateProjector<'e, E, R> {
    /// Whether ggml converts the input of every matrix of `group` to the same format.
    pub(super) fn same_activation_format(
        &mut self,
        layer: usize,
        group: &[Projection],
    ) -> Result<bool> {
        let mut formats = Vec::with_capacity(group.len());
        for p in group {
            formats.push(self.matrix_state(layer, *p)?.format);
        }
        Ok(formats.windows(2).all(|w| w[0] == w[1]))
    }

    /// Loads the mins of a Q4_1 / Q5_1 matrix into its state (once), for
    /// [`Self::set_match_ggml_s`].
    pub(super) fn ensure_mins(&mut self, layer: usize, projection: Projection) -> Result<()> {
        let view = self.engine.weight(layer, projection)?;
        let Some(st) = self.matrices.get_mut(&(layer, projection)) else {
            return Ok(());
        };
        if st.mins.is_none() && matches!(view.ggml_type, GgmlType::Q4_1 | GgmlType::Q5_1) {
            // Q4_1 and Q5_1 blocks start with fp16 d and m.
            st.mins = Some(
                view.bytes
                    .chunks_exact(view.ggml_type.type_size() as usize)
                    .map(|b| f16_to_f32(u16::from_le_bytes([b[2], b[3]])))
                    .collect(),
            );
        }
        Ok(())
    }

    /// The owner's state for one matrix, built on first use.
    pub(super) fn matrix_state(
        &mut self,
        layer: usize,
        projection: Projection,
    ) -> Result<&MatrixState> {
        let key = (layer, projection);
        if !self.matrices.contains_key(&key) {
            let view = self.engine.weight(layer, projection)?;
            let m = Matrix::from_view(&view)?;
            let checker = self.checker(layer, projection, &m)?;
            let state = MatrixState {
                rows: m.rows(),
                cols: m.cols(),
                mins: None,
                format: ActivationFormat::for_weights(m.ggml_type())?,
                bounds: m.column_bounds()?,
                checker,
            };
            self.matrices.insert(key, state);
        }
        Ok(&self.matrices[&key])
    }

    /// The check vectors for `m`: from the cache if there is a valid file,
    /// else computed (and written to the cache if there is one).
    pub(super) fn checker(
        &mut self,
        layer: usize,
        projection: Projection,
        m: &Matrix<'_>,
    ) -> Result<Checker> {
        let Some(dir) = self.cache_dir.clone() else {
            self.stats.checkers_computed += 1;
            return Checker::new(m, &mut self.rng);
        };
        let key = MatrixKey {
            model: self.model_hash,
            layer: u32::try_from(layer).map_err(|_| {
                Error::InvalidArgument(format!("layer {layer} does not fit the cache format"))
            })?,
            op: op_code(projection),
            rows: m.rows(),
            cols: m.cols(),
        };
        let hex: String = self.model_hash.iter().map(|b| format!("{b:02x}")).collect();
        let dir = dir.join(hex);
        let path = dir.join(format!("{layer}-{}.fvc", key.op));
        match std::fs::File::open(&path) {
            Ok(mut f) => match Checker::load(&mut f, &key) {
                Ok(c) => {
                    self.stats.checkers_loaded += 1;
                    return Ok(c);
                }
                Err(e) => {
                    self.stats.checker_cache_errors += 1;
                    self.last_cache_error = Some(e);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                self.stats.checker_cache_errors += 1;
                self.last_cache_error = Some(CacheError::Io(e));
            }
        }
        let checker = Checker::new(m, &mut self.rng)?;
        self.stats.checkers_computed += 1;
        let mut tag = [0u8; 8];
        self.rng.fill_bytes(&mut tag);
        if let Err(e) = write_cache_file(&dir, &path, &tag, &key, &checker) {
            self.stats.checker_cache_errors += 1;
            self.last_cache_error = Some(e);
        }
        Ok(checker)
    }

    /// Adds `W·r` to `out` (`n` tokens of `rows` values) for the sparse
    /// residual `r` of [`residuals`] (token, column, value): one block column
    /// of `projection`'s matrix per block that holds a residual.
    pub(super) fn add_residual_product(
        &mut self,
        layer: usize,
        projection: Projection,
        rows: usize,
        residual: &[(usize, usize, f64)],
        out: &mut [f64],
    ) -> Result<()> {
        let m = Matrix::from_view(&self.engine.weight(layer, projection)?)?;
        let bs = m.ggml_type().block_size() as usize;
        let mut blocks: Vec<usize> = residual.iter().map(|(_, j, _)| j / bs).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut w = vec![0i64; rows * bs];
        let unit = 2f64.powi(-(ring::WEIGHT_FRAC_BITS as i32));
        for b in blocks {
            m.block_column_weights(b, &mut w)?;
            for &(t, j, v) in residual.iter().filter(|(_, j, _)| j / bs == b) {
                let yt = &mut out[t * rows..(t + 1) * rows];
                for (y, wr) in yt.iter_mut().zip(w.chunks_exact(bs)) {
                    *y += wr[j - b * bs] as f64 * unit * v;
                }
            }
        }
        Ok(())
    }

    /// After a failed check: which helpers' partial results are not `W·X_i`.
    /// Freivalds is linear, so it applies to each share on its own (the range
    /// check does not: shares are uniform). Uses fresh check vectors and one
    /// pass over the matrix; an error confined to the top bits of a share can
    /// escape it (probability `2^-ATTRIBUTION_VECTORS` at worst), in which
    /// case nobody is named.
    pub(super) fn attribute(
        &mut self,
        layer: usize,
        projection: Projection,
        shares: &Shares,
        parts: &[&[u64]],
    ) -> Result<Vec<usize>> {
        let m = Matrix::from_view(&self.engine.weight(layer, projection)?)?;
        let (rows, cols) = (m.rows(), m.cols());
        let k = ATTRIBUTION_VECTORS;
        let r: Vec<u64> = (0..k * rows).map(|_| self.rng.next_u64()).collect();
        let mut v = vec![0u64; k * cols];
        let mut w = vec![0i64; cols];
        for row in 0..rows {
            m.row_weights(row, &mut w)?;
            for t in 0..k {
                let rt = r[t * rows + row];
                for (acc, wj) in v[t * cols..(t + 1) * cols].iter_mut().zip(&w) {
                    *acc = acc.wrapping_add(rt.wrapping_mul(ring::from_signed(*wj)));
                }
            }
        }
        let mut culprits = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let xi = Zeroizing::new(shares.expand(i)?);
            let wrong = part.len() % rows != 0
                || part.len() / rows != xi.len() / cols
                || xi
                    .chunks_exact(cols)
                    .zip(part.chunks_exact(rows))
                    .any(|(xt, yt)| {
                        (0..k).any(|t| {
                            ring::dot(&r[t * rows..(t + 1) * rows], yt)
                                != ring::dot(&v[t * cols..(t + 1) * cols], xt)
                        })
                    });
            drop(xi);
            if wrong {
                culprits.push(i);
            }
        }
        Ok(culprits)
    }
}

/// The part of each activation the fixed-point encoding rounded away:
/// `(token, column, x - decoded X)` for every nonzero difference (exact in
/// f64: the two are within a factor of two, or the encoding is zero).
pub(super) fn residuals(
    xq: &[f64],
    xr: &[u64],
    params: &[ring::FixedPoint],
    cols: usize,
) -> Vec<(usize, usize, f64)> {
    let mut out = Vec::new();
    for (t, ((x, e), fp)) in xq
        .chunks_exact(cols)
        .zip(xr.chunks_exact(cols))
        .zip(params)
        .enumerate()
    {
        let k = 2f64.powi(fp.scale_log2() - fp.frac_bits());
        for (j, (xv, ev)) in x.iter().zip(e).enumerate() {
            let r = xv - ring::to_signed(*ev) as f64 * k;
            if r != 0.0 {
                out.push((t, j, r));
            }
        }
    }
    out
}

/// Writes `checker` to `path` atomically: a new 0600 file next to it (name
/// suffixed with `tag`), synced, then renamed over `path`. Creates `dir`
/// (0700) if needed.
pub(super) fn write_cache_file(
    dir: &Path,
    path: &Path,
    tag: &[u8; 8],
    key: &MatrixKey,
    checker: &Checker,
) -> Result<(), CacheError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension(format!("fvc.tmp-{tag}"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut w = options.open(&tmp)?;
        checker.save(key, &mut w)?;
        w.flush()?;
        w.sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
