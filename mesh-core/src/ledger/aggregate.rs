//! Robust aggregation of competing LoRA updates: norm clipping, then
//! Multi-Krum, computed exactly and bit-reproducibly in factor space.
//!
//! When several updates of the same base model compete, the ledger's proposer
//! aggregates them and every validator recomputes the aggregate and votes only
//! for identical bytes, so the rule must be deterministic and must bound what
//! one malicious update can do.
//!
//! # The rule
//!
//! An update `i` changes every matrix it adapts by `Δ_i = s_i B_i A_i`
//! (`s_i` = alpha / rank, or 1 when alpha is 0, as the engine applies it at
//! scale 1). With `n` updates of which at most `f` are assumed Byzantine:
//!
//! 1. **Norms.** `‖Δ_i‖`, the Frobenius norm over all its matrices.
//! 2. **Clipping.** The bound `τ` is the lower median of the norms (or a
//!    configured bound); update `i` is scaled by `c_i = min(1, τ / ‖Δ_i‖)`, so
//!    an update blown up 100x counts no more than a typical one.
//! 3. **Multi-Krum** (Blanchard et al., 2017). `d_ij = ‖c_i Δ_i − c_j Δ_j‖²`;
//!    the score of `i` is the sum of its `n − f − 2` smallest `d_ij`; the
//!    `m = n − f` updates with the lowest scores are selected (ties: the lower
//!    index). An outlier (sign-flipped, scaled, unrelated) has far neighbours
//!    and is left out. Needs `n ≥ 2f + 3`; with `f = 0` every update is kept.
//! 4. **Mean.** The aggregate is `(1/m) Σ_selected c_i Δ_i`, written exactly as
//!    one adapter: per matrix, A stacks the selected `A_i` and B the matching
//!    `B_i` scaled by `s_i c_i / m` (rank `Σ r_i`, alpha 0, F32). Nothing is
//!    approximated, and the result loads and applies like any adapter.
//!
//! Every clipped update has norm at most `τ`, hence so does the aggregate.
//!
//! # Why not a coordinate-wise trimmed mean
//!
//! The coordinates of `A` and `B` mean nothing on their own (`B R`, `R⁻¹ A`
//! is the same update for any invertible `R`), so a per-coordinate median of
//! factors is not robust where it matters, and the dense `B A` of every
//! matrix is the size of the model per update. Frobenius inner products need
//! only `r x r` products: `⟨B_i A_i, B_j A_j⟩ = tr((B_iᵀ B_j)(A_j A_iᵀ))`,
//! which makes distance-based Multi-Krum exact and cheap.
//!
//! # Determinism
//!
//! Sums are f64, in a fixed order, in plain scalar code (Rust neither
//! reorders nor fuses float operations), and the output is written in a fixed
//! order: the same inputs in the same order give the same bytes on every
//! machine. Callers order the updates canonically (by update id) first.

use std::cmp::Ordering;

use crate::engine::lora::{adapter_bytes, base_tensor_name, pair_order};
use crate::engine::{LoraAdapter, LoraFactors, ModelInfo, Projection};
use crate::{Error, Result};

/// How to aggregate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AggregateConfig {
    /// How many of the updates may be Byzantine (`f`); Multi-Krum keeps the
    /// `n − f` most central ones and needs `n ≥ 2f + 3` when `f > 0`.
    pub byzantine: usize,
    /// The clip bound `τ` on each update's Frobenius norm; `None` = the lower
    /// median of the updates' norms.
    pub clip_bound: Option<f64>,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            byzantine: 1,
            clip_bound: None,
        }
    }
}

/// The result of [`aggregate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    /// The aggregate as GGUF adapter bytes (F32, alpha 0), loadable with
    /// [`LoraAdapter::from_bytes`].
    pub adapter: Vec<u8>,
    /// Indices of the selected updates, ascending.
    pub selected: Vec<usize>,
    /// The clip bound used.
    pub clip_bound: f64,
    /// Each update's norm before clipping.
    pub norms: Vec<f64>,
    /// Each update's Multi-Krum score (lower is more central).
    pub scores: Vec<f64>,
}

/// One update's factors with the scale the engine applies to each pair.
struct Update {
    pairs: Vec<(LoraFactors, f64)>,
}

impl Update {
    fn new(adapter: &LoraAdapter) -> Update {
        let pairs = adapter
            .factors()
            .into_iter()
            .map(|f| {
                let s = f64::from(adapter.effective_scale(1.0, f.rank));
                (f, s)
            })
            .collect();
        Update { pairs }
    }
}

/// Position of a pair in the adapters' common order ([`LoraAdapter::factors`]'s).
fn key(f: &LoraFactors) -> (usize, usize) {
    pair_order(f.layer, f.projection)
}

/// `⟨B_x A_x, B_y A_y⟩` (Frobenius) of two pairs of the same matrix:
/// `tr((B_xᵀ B_y)(A_y A_xᵀ))`, in f64, in a fixed order.
fn pair_inner(x: &LoraFactors, y: &LoraFactors) -> f64 {
    let (rx, ry, cols) = (x.rank, y.rank, x.cols);
    // B_xᵀ B_y: rx x ry, summed over the rows.
    let mut btb = vec![0f64; rx * ry];
    for (bx, by) in x.b.chunks_exact(rx).zip(y.b.chunks_exact(ry)) {
        for (p, &u) in bx.iter().enumerate() {
            let u = f64::from(u);
            for (q, &v) in by.iter().enumerate() {
                btb[p * ry + q] += u * f64::from(v);
            }
        }
    }
    let mut total = 0f64;
    for (p, ax) in x.a.chunks_exact(cols).enumerate() {
        for (q, ay) in y.a.chunks_exact(cols).enumerate() {
            let mut aa = 0f64;
            for (&u, &v) in ax.iter().zip(ay) {
                aa += f64::from(u) * f64::from(v);
            }
            total += btb[p * ry + q] * aa;
        }
    }
    total
}

/// `⟨Δ_x, Δ_y⟩` over all matrices (pairs adapted by only one contribute 0).
fn inner(x: &Update, y: &Update) -> f64 {
    let (mut i, mut j, mut total) = (0, 0, 0f64);
    while i < x.pairs.len() && j < y.pairs.len() {
        let (fx, sx) = &x.pairs[i];
        let (fy, sy) = &y.pairs[j];
        match key(fx).cmp(&key(fy)) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                total += sx * sy * pair_inner(fx, fy);
                i += 1;
                j += 1;
            }
        }
    }
    total
}

/// `√v` for a sum of squares that rounding may have pushed just below 0;
/// NaN stays NaN (`f64::max` would turn it into 0).
fn sqrt_nonneg(v: f64) -> f64 {
    if v < 0.0 {
        0.0
    } else {
        v.sqrt()
    }
}

/// `‖Δ_x − Δ_y‖` (Frobenius, each adapter at scale 1): how far apart two
/// adapters of the same model move it. Exact up to f64 rounding, without
/// forming any dense matrix.
pub fn update_distance(x: &LoraAdapter, y: &LoraAdapter) -> f64 {
    let (x, y) = (Update::new(x), Update::new(y));
    sqrt_nonneg(inner(&x, &x) + inner(&y, &y) - 2.0 * inner(&x, &y))
}

/// `‖Δ_x‖` (Frobenius, at scale 1).
pub fn update_norm(x: &LoraAdapter) -> f64 {
    let x = Update::new(x);
    sqrt_nonneg(inner(&x, &x))
}

/// Aggregate `updates` (adapters of `info`'s model, in canonical order) by
/// the rule in the [module docs](self). Errors (`InvalidArgument`): no
/// updates, an adapter of another model, too few updates for
/// `config.byzantine`, a clip bound that is not positive and finite, an
/// update whose values are not finite.
pub fn aggregate(
    info: &ModelInfo,
    updates: &[&LoraAdapter],
    config: &AggregateConfig,
) -> Result<Aggregate> {
    let n = updates.len();
    let f = config.byzantine;
    if n == 0 {
        return Err(Error::InvalidArgument("no updates to aggregate".into()));
    }
    if f > 0 && n < 2 * f + 3 {
        return Err(Error::InvalidArgument(format!(
            "Multi-Krum with {f} Byzantine update(s) needs at least {} updates, got {n}",
            2 * f + 3
        )));
    }
    if let Some(bad) = updates.iter().position(|u| u.base_model() != info.id) {
        return Err(Error::InvalidArgument(format!(
            "update {bad} adapts model {}, not {}",
            updates[bad].base_model(),
            info.id
        )));
    }
    let parsed: Vec<Update> = updates.iter().map(|u| Update::new(u)).collect();
    let finite = |u: &Update| {
        u.pairs
            .iter()
            .all(|(f, s)| s.is_finite() && f.a.iter().chain(&f.b).all(|v| v.is_finite()))
    };
    if let Some(bad) = parsed.iter().position(|u| !finite(u)) {
        return Err(Error::InvalidArgument(format!(
            "update {bad} ({}) has values that are not finite",
            updates[bad].id()
        )));
    }
    // Gram matrix of the updates: every later step is a function of it.
    let mut gram = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let g = inner(&parsed[i], &parsed[j]);
            gram[i * n + j] = g;
            gram[j * n + i] = g;
        }
    }
    let norms: Vec<f64> = (0..n).map(|i| sqrt_nonneg(gram[i * n + i])).collect();
    if let Some(bad) = norms.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "update {bad} ({}): its norm overflows",
            updates[bad].id()
        )));
    }
    let tau = match config.clip_bound {
        Some(t) if t.is_finite() && t > 0.0 => t,
        Some(t) => {
            return Err(Error::InvalidArgument(format!(
                "clip bound {t} is not a positive finite number"
            )))
        }
        None => {
            let mut sorted = norms.clone();
            sorted.sort_by(f64::total_cmp);
            sorted[(n - 1) / 2]
        }
    };
    let clip: Vec<f64> = norms
        .iter()
        .map(|&v| if v > tau { tau / v } else { 1.0 })
        .collect();
    // Squared distances between clipped updates, and Multi-Krum scores.
    let neighbours = n.saturating_sub(f + 2);
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let (ci, cj) = (clip[i], clip[j]);
                    (ci * ci * gram[i * n + i] + cj * cj * gram[j * n + j]
                        - 2.0 * ci * cj * gram[i * n + j])
                        .max(0.0)
                })
                .collect();
            d.sort_by(f64::total_cmp);
            d[..neighbours.min(d.len())].iter().sum::<f64>()
        })
        .collect();
    let m = n - f;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut selected = order[..m].to_vec();
    selected.sort_unstable();

    // The mean of the selected clipped updates, as one stacked adapter.
    let mut keys: Vec<((usize, usize), usize, Projection)> = selected
        .iter()
        .flat_map(|&i| {
            parsed[i]
                .pairs
                .iter()
                .map(|(f, _)| (key(f), f.layer, f.projection))
        })
        .collect();
    keys.sort_by_key(|k| k.0);
    keys.dedup_by_key(|k| k.0);
    let mut tensors = Vec::with_capacity(2 * keys.len());
    for (k, layer, projection) in keys {
        let mut parts: Vec<(&LoraFactors, f64)> = Vec::new();
        for &i in &selected {
            if let Some((fct, s)) = parsed[i].pairs.iter().find(|(fct, _)| key(fct) == k) {
                parts.push((fct, s * clip[i] / m as f64));
            }
        }
        let (cols, rows) = (parts[0].0.cols, parts[0].0.rows);
        let rank: usize = parts.iter().map(|(fct, _)| fct.rank).sum();
        let mut a = Vec::with_capacity(rank * cols);
        for (fct, _) in &parts {
            a.extend_from_slice(&fct.a);
        }
        let mut b = Vec::with_capacity(rows * rank);
        for o in 0..rows {
            for (fct, w) in &parts {
                b.extend(
                    fct.b[o * fct.rank..(o + 1) * fct.rank]
                        .iter()
                        .map(|&v| (f64::from(v) * w) as f32),
                );
            }
        }
        let base = base_tensor_name(layer, projection);
        tensors.push((format!("{base}.lora_a"), [cols as u64, rank as u64], a));
        tensors.push((format!("{base}.lora_b"), [rank as u64, rows as u64], b));
    }
    Ok(Aggregate {
        adapter: adapter_bytes(&info.architecture, 0.0, &tensors),
        selected,
        clip_bound: tau,
        norms,
        scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lora::projection_shape;
    use crate::engine::lora::testing::small_model;

    /// splitmix64 values uniform in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
            (0..n).map(|_| self.next() * amp).collect()
        }
    }

    const TARGETS: [(usize, Projection); 4] = [
        (0, Projection::Q),
        (0, Projection::Down),
        (1, Projection::K),
        (0, Projection::Output),
    ];

    /// One pair's factors: `(layer, projection, rank, a, b)`.
    type Pair = (usize, Projection, usize, Vec<f32>, Vec<f32>);

    /// An adapter from explicit factors.
    fn adapter(alpha: f32, pairs: &[Pair]) -> LoraAdapter {
        let info = small_model();
        let mut tensors = Vec::new();
        for (layer, p, rank, a, b) in pairs {
            let (cols, rows) = projection_shape(&info, *p);
            let base = base_tensor_name(*layer, *p);
            tensors.push((
                format!("{base}.lora_a"),
                [cols as u64, *rank as u64],
                a.clone(),
            ));
            tensors.push((
                format!("{base}.lora_b"),
                [*rank as u64, rows as u64],
                b.clone(),
            ));
        }
        LoraAdapter::from_bytes(&adapter_bytes("llama", alpha, &tensors), &info).unwrap()
    }

    /// Honest updates: one shared direction plus small independent noise, as
    /// peers fine-tuning on similar data produce; rank 4, alpha 8.
    fn honest(k: usize) -> Vec<LoraAdapter> {
        let info = small_model();
        let mut shared = Rng(1);
        let base: Vec<_> = TARGETS
            .iter()
            .map(|&(l, p)| {
                let (cols, rows) = projection_shape(&info, p);
                (l, p, shared.vec(4 * cols, 0.1), shared.vec(rows * 4, 0.1))
            })
            .collect();
        (0..k)
            .map(|i| {
                let mut noise = Rng(100 + i as u64);
                let pairs: Vec<_> = base
                    .iter()
                    .map(|(l, p, a, b)| {
                        let a: Vec<f32> = a.iter().map(|v| v + noise.next() * 0.01).collect();
                        let b: Vec<f32> = b.iter().map(|v| v + noise.next() * 0.01).collect();
                        (*l, *p, 4, a, b)
                    })
                    .collect();
                adapter(8.0, &pairs)
            })
            .collect()
    }

    /// `adapter`'s factors with B multiplied by `k`.
    fn scaled(x: &LoraAdapter, k: f32) -> LoraAdapter {
        let pairs: Vec<_> = x
            .factors()
            .into_iter()
            .map(|f| {
                let b: Vec<f32> = f.b.iter().map(|v| v * k).collect();
                (f.layer, f.projection, f.rank, f.a, b)
            })
            .collect();
        adapter(x.alpha(), &pairs)
    }

    /// Dense `s B A` of every pair, keyed like the factors.
    fn dense(x: &LoraAdapter) -> Vec<((usize, usize), Vec<f64>)> {
        x.factors()
            .into_iter()
            .map(|f| {
                let s = f64::from(x.effective_scale(1.0, f.rank));
                let mut w = vec![0f64; f.rows * f.cols];
                for o in 0..f.rows {
                    for r in 0..f.rank {
                        let bv = f64::from(f.b[o * f.rank + r]) * s;
                        for c in 0..f.cols {
                            w[o * f.cols + c] += bv * f64::from(f.a[r * f.cols + c]);
                        }
                    }
                }
                (key(&f), w)
            })
            .collect()
    }

    fn dense_distance(x: &LoraAdapter, y: &LoraAdapter) -> f64 {
        let (dx, dy) = (dense(x), dense(y));
        let mut total = 0f64;
        let mut keys: Vec<_> = dx.iter().chain(&dy).map(|(k, _)| *k).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let a = dx.iter().find(|(kk, _)| *kk == k).map(|(_, w)| w);
            let b = dy.iter().find(|(kk, _)| *kk == k).map(|(_, w)| w);
            let len = a.or(b).unwrap().len();
            for i in 0..len {
                let d = a.map_or(0.0, |w| w[i]) - b.map_or(0.0, |w| w[i]);
                total += d * d;
            }
        }
        total.sqrt()
    }

    #[test]
    fn gram_distances_equal_dense_ones() {
        let h = honest(2);
        // Another rank, alpha 0, and only one of the matrices.
        let info = small_model();
        let mut rng = Rng(7);
        let (cols, rows) = projection_shape(&info, Projection::Q);
        let other = adapter(
            0.0,
            &[(
                0,
                Projection::Q,
                2,
                rng.vec(2 * cols, 0.2),
                rng.vec(rows * 2, 0.2),
            )],
        );
        for (x, y) in [(&h[0], &h[1]), (&h[0], &other), (&other, &other)] {
            let exact = dense_distance(x, y);
            let fast = update_distance(x, y);
            assert!(
                (exact - fast).abs() <= 1e-9 * (1.0 + exact),
                "{exact} vs {fast}"
            );
        }
        let zero = dense_distance(&h[0], &scaled(&h[0], 0.0));
        assert!((update_norm(&h[0]) - zero).abs() <= 1e-9 * zero);
    }

    #[test]
    fn the_aggregate_is_the_mean_of_the_selected_clipped_updates() {
        let info = small_model();
        let h = honest(5);
        let refs: Vec<_> = h.iter().collect();
        let agg = aggregate(&info, &refs, &AggregateConfig::default()).unwrap();
        assert_eq!(agg.selected.len(), 4);
        let loaded = LoraAdapter::from_bytes(&agg.adapter, &info).unwrap();
        assert_eq!(
            loaded.rank(0, Projection::Q),
            Some(16),
            "4 selected x rank 4"
        );
        // Expected dense mean.
        let mut expected: Vec<((usize, usize), Vec<f64>)> = Vec::new();
        for &i in &agg.selected {
            let c = (agg.clip_bound / agg.norms[i]).min(1.0);
            for (k, w) in dense(&h[i]) {
                let slot = match expected.iter().position(|(kk, _)| *kk == k) {
                    Some(j) => j,
                    None => {
                        expected.push((k, vec![0.0; w.len()]));
                        expected.len() - 1
                    }
                };
                for (e, v) in expected[slot].1.iter_mut().zip(&w) {
                    *e += v * c / 4.0;
                }
            }
        }
        let got = dense(&loaded);
        assert_eq!(got.len(), expected.len());
        for ((k1, w1), (k2, w2)) in got.iter().zip(&expected) {
            assert_eq!(k1, k2);
            let (mut diff, mut norm) = (0f64, 0f64);
            for (a, b) in w1.iter().zip(w2) {
                diff += (a - b) * (a - b);
                norm += b * b;
            }
            assert!(
                diff.sqrt() <= 1e-6 * norm.sqrt(),
                "{k1:?}: {diff} vs {norm}"
            );
        }
        assert!(update_norm(&loaded) <= agg.clip_bound * (1.0 + 1e-6));
    }

    #[test]
    fn one_scaled_or_sign_flipped_update_moves_the_aggregate_by_at_most_the_clip_bound() {
        let info = small_model();
        let h = honest(6);
        let honest_refs: Vec<_> = h.iter().collect();
        let config = AggregateConfig {
            byzantine: 1,
            clip_bound: None,
        };
        let base = aggregate(&info, &honest_refs[..5], &config).unwrap();
        let base = LoraAdapter::from_bytes(&base.adapter, &info).unwrap();
        let typical = update_norm(&h[0]);
        for (what, bad) in [
            ("scaled 100x", scaled(&h[5], 100.0)),
            ("sign-flipped", scaled(&h[5], -1.0)),
            ("sign-flipped and scaled 100x", scaled(&h[5], -100.0)),
        ] {
            // The attacker's update in every position.
            for pos in 0..6 {
                let mut refs = honest_refs[..5].to_vec();
                refs.insert(pos, &bad);
                let agg = aggregate(&info, &refs, &config).unwrap();
                // Clipping turns the 100x update back into an honest-sized
                // one (which Multi-Krum may then keep); a flipped sign stays
                // an outlier and is left out.
                if what.starts_with("sign") {
                    assert!(!agg.selected.contains(&pos), "{what} at {pos}: selected");
                }
                let moved = update_distance(
                    &LoraAdapter::from_bytes(&agg.adapter, &info).unwrap(),
                    &base,
                );
                assert!(
                    moved <= agg.clip_bound,
                    "{what} at {pos}: moved {moved} > clip bound {}",
                    agg.clip_bound
                );
                // A plain mean would have moved it far more.
                let naive = aggregate(
                    &info,
                    &refs,
                    &AggregateConfig {
                        byzantine: 0,
                        clip_bound: Some(f64::MAX),
                    },
                )
                .unwrap();
                let naive_moved = update_distance(
                    &LoraAdapter::from_bytes(&naive.adapter, &info).unwrap(),
                    &base,
                );
                assert!(
                    naive_moved > 0.3 * typical && naive_moved > 3.0 * moved,
                    "{what}: naive mean moved {naive_moved}, robust {moved}"
                );
            }
        }
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes() {
        let info = small_model();
        let h = honest(5);
        let refs: Vec<_> = h.iter().collect();
        let a = aggregate(&info, &refs, &AggregateConfig::default()).unwrap();
        let b = aggregate(&info, &refs, &AggregateConfig::default()).unwrap();
        assert_eq!(a, b);
        // Another order selects the same updates and the same update, up to rounding.
        let mut rev = refs.clone();
        rev.reverse();
        let c = aggregate(&info, &rev, &AggregateConfig::default()).unwrap();
        let mapped: Vec<usize> = {
            let mut v: Vec<usize> = c.selected.iter().map(|&i| 4 - i).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(mapped, a.selected);
        let d = update_distance(
            &LoraAdapter::from_bytes(&a.adapter, &info).unwrap(),
            &LoraAdapter::from_bytes(&c.adapter, &info).unwrap(),
        );
        assert!(d <= 1e-6 * a.clip_bound, "{d}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let info = small_model();
        let h = honest(4);
        let refs: Vec<_> = h.iter().collect();
        let err = |r: Result<Aggregate>| match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(err(aggregate(&info, &[], &AggregateConfig::default())).contains("no updates"));
        assert!(err(aggregate(&info, &refs, &AggregateConfig::default())).contains("at least 5"));
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let c = AggregateConfig {
                byzantine: 0,
                clip_bound: Some(t),
            };
            assert!(err(aggregate(&info, &refs, &c)).contains("clip bound"));
        }
        let mut other = small_model();
        other.id = crate::engine::ModelId([9; 32]);
        let c = AggregateConfig {
            byzantine: 0,
            clip_bound: None,
        };
        assert!(err(aggregate(&other, &refs, &c)).contains("adapts model"));
        let inf = scaled(&h[0], f32::INFINITY);
        let with_inf = [&h[1], &inf, &h[2]];
        assert!(err(aggregate(&info, &with_inf, &c)).contains("update 1"));
        // f = 0: every update is kept, whatever n.
        let one = aggregate(&info, &refs[..1], &c).unwrap();
        assert_eq!(one.selected, vec![0]);
    }
}
