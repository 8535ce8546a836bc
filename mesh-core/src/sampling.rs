//! Picking the next token from a vector of logits.
//!
//! [`Sampler`] applies the same chain as llama.cpp's default sampler:
//! repetition penalty, top-k, top-p, min-p, temperature, softmax and a random
//! draw. With a temperature of zero or below it returns the arg-max after the
//! penalty. Its random number generator is ChaCha20 seeded from
//! [`SamplerParams::seed`], so the same seed, logits and history give the same
//! tokens on every platform.

use std::cmp::Ordering;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::{Error, Result};

/// Settings of a [`Sampler`].
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    /// Softmax temperature; zero or below means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns this off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probabilities add up
    /// to at least `top_p`; 1.0 turns this off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the probability of
    /// the most likely token; 0 turns this off.
    pub min_p: f32,
    /// Penalty for tokens seen in the last `repeat_last_n` tokens of the
    /// history: positive logits are divided by it, negative ones multiplied;
    /// 1.0 turns this off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the repetition penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random number generator.
    pub seed: u64,
}

impl Default for SamplerParams {
    /// llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95, min-p
    /// 0.05, no repetition penalty (window 64), seed 0.
    fn default() -> Self {
        SamplerParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplerParams {
    /// Parameters that always pick the most likely token, with no penalty.
    pub fn greedy() -> Self {
        SamplerParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 0,
            seed: 0,
        }
    }

    /// Check every field; the error names the first bad field and its value.
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &str, expected: &str, found: f32) -> Error {
            Error::InvalidArgument(format!(
                "sampler {field}: expected {expected}, found {found}"
            ))
        }
        if !self.temperature.is_finite() {
            return Err(bad(
                "temperature",
                "a finite number (<= 0 for greedy)",
                self.temperature,
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(bad("top_p", "a number in [0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", "a number in [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(bad(
                "repeat_penalty",
                "a finite number > 0 (1.0 = off)",
                self.repeat_penalty,
            ));
        }
        Ok(())
    }
}

/// A token id and its (possibly penalised) logit.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Most likely first; equal logits are ordered by id so the order is total
/// and every selection is deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Unnormalised softmax weight of `logit` for a distribution whose largest
/// logit is `max`. Infinite maxima give all the weight to the tokens at the
/// maximum, uniformly.
fn weight(logit: f32, max: f32, temperature: f32) -> f64 {
    if max.is_finite() {
        f64::from((logit - max) / temperature).exp()
    } else if logit == max {
        1.0
    } else {
        0.0
    }
}

fn max_logit(candidates: &[Candidate]) -> f32 {
    candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Picks tokens from logits according to [`SamplerParams`].
///
/// A sampler keeps its random state between calls, so a generation should use
/// one sampler from start to end. It is cheap to create and reuses its buffers.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplerParams,
    rng: ChaCha20Rng,
    /// The logits after the repetition penalty.
    work: Vec<f32>,
    /// The tokens still in the running.
    candidates: Vec<Candidate>,
    /// The distinct tokens of the penalty window.
    recent: Vec<u32>,
    /// Softmax weights of the candidates, for the draw.
    weights: Vec<f64>,
}

impl Sampler {
    /// A sampler with these parameters, its random generator seeded from `params.seed`.
    pub fn new(params: SamplerParams) -> Result<Sampler> {
        params.validate()?;
        let rng = ChaCha20Rng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            work: Vec::new(),
            candidates: Vec::new(),
            recent: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplerParams {
        &self.params
    }

    /// Pick the next token.
    ///
    /// `logits` has one entry per vocabulary token; NaN entries are never
    /// picked. `history` holds the previous tokens (prompt and generated) for
    /// the repetition penalty. Fails if `logits` is empty or all NaN, or if a
    /// token of the penalty window is outside the vocabulary.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::InvalidArgument(
                "sampler: expected at least one logit, found none".into(),
            ));
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(Error::InvalidArgument(format!(
                "sampler: expected at most {} logits, found {}",
                u32::MAX,
                logits.len()
            )));
        }
        self.work.clear();
        self.work.extend_from_slice(logits);
        self.apply_penalty(history)?;

        if self.params.temperature <= 0.0 {
            return argmax(&self.work).ok_or_else(all_nan);
        }

        let top_k = self.params.top_k;
        self.candidates.clear();
        if top_k > 0 {
            self.collect_top_k(top_k);
        } else {
            self.candidates.extend(
                (0u32..)
                    .zip(&self.work)
                    .filter(|(_, l)| !l.is_nan())
                    .map(|(id, &logit)| Candidate { id, logit }),
            );
        }
        if self.candidates.is_empty() {
            return Err(all_nan());
        }
        let sorted = top_k > 0;
        if self.params.top_p < 1.0 {
            self.apply_top_p(sorted);
        }
        if self.params.min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p),
            // on the distribution before temperature, as llama.cpp does.
            let max = max_logit(&self.candidates);
            if max.is_finite() {
                let threshold = max + self.params.min_p.ln();
                self.candidates.retain(|c| c.logit >= threshold);
            }
        }
        self.draw().ok_or_else(all_nan)
    }

    /// Collect the `k` most likely non-NaN tokens, most likely first, in one
    /// pass: the buffer is cut back to `k` whenever it fills, and tokens
    /// below the k-th best so far are skipped without being stored.
    fn collect_top_k(&mut self, k: usize) {
        let cap = k.saturating_mul(2).max(64);
        let mut threshold: Option<f32> = None;
        for (id, &logit) in (0u32..).zip(&self.work) {
            // Ids come in increasing order, so a later token that ties the
            // k-th best ranks below it and can be skipped too.
            if logit.is_nan() || threshold.is_some_and(|t| logit <= t) {
                continue;
            }
            self.candidates.push(Candidate { id, logit });
            if self.candidates.len() >= cap {
                self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
                self.candidates.truncate(k);
                threshold = Some(self.candidates[k - 1].logit);
            }
        }
        if self.candidates.len() > k {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
    }

    /// llama.cpp's repetition penalty over the distinct tokens of the last
    /// `repeat_last_n` history tokens.
    fn apply_penalty(&mut self, history: &[u32]) -> Result<()> {
        let penalty = self.params.repeat_penalty;
        let n = self.params.repeat_last_n.min(history.len());
        if penalty == 1.0 || n == 0 {
            return Ok(());
        }
        self.recent.clear();
        self.recent.extend_from_slice(&history[history.len() - n..]);
        self.recent.sort_unstable();
        self.recent.dedup();
        for &token in &self.recent {
            let Some(logit) = usize::try_from(token)
                .ok()
                .and_then(|i| self.work.get_mut(i))
            else {
                return Err(Error::InvalidArgument(format!(
                    "sampler: history token {token} is outside the vocabulary of {} tokens",
                    self.work.len()
                )));
            };
            if *logit <= 0.0 {
                *logit *= penalty;
            } else {
                *logit /= penalty;
            }
        }
        Ok(())
    }

    /// Keep the smallest most-likely prefix whose probability (softmax of the
    /// current logits, no temperature) reaches `top_p`; leaves the candidates
    /// sorted. Without a prior top-k, it selects growing prefixes rather than
    /// sorting the whole vocabulary.
    fn apply_top_p(&mut self, sorted: bool) {
        let top_p = f64::from(self.params.top_p);
        let max = max_logit(&self.candidates);
        let total: f64 = self
            .candidates
            .iter()
            .map(|c| weight(c.logit, max, 1.0))
            .sum();
        let len = self.candidates.len();
        let mut k = if sorted { len } else { len.min(64) };
        loop {
            if !sorted {
                if k < len {
                    self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
                }
                self.candidates[..k].sort_unstable_by(by_logit_desc);
            }
            let mut cumulative = 0.0;
            for i in 0..k {
                cumulative += weight(self.candidates[i].logit, max, 1.0) / total;
                if cumulative >= top_p {
                    self.candidates.truncate(i + 1);
                    return;
                }
            }
            if k == len {
                // Rounding kept the sum just below top_p: keep everything.
                return;
            }
            k = len.min(k.saturating_mul(4));
        }
    }

    /// Softmax with temperature over the candidates, then one random draw.
    /// `None` only if no candidate is left, which the steps before prevent.
    fn draw(&mut self) -> Option<u32> {
        let temperature = self.params.temperature;
        let max = max_logit(&self.candidates);
        self.weights.clear();
        self.weights.extend(
            self.candidates
                .iter()
                .map(|c| weight(c.logit, max, temperature)),
        );
        let total: f64 = self.weights.iter().sum();
        let target = self.rng.gen::<f64>() * total;
        let mut cumulative = 0.0;
        let mut last = None;
        for (c, &w) in self.candidates.iter().zip(&self.weights) {
            if w > 0.0 {
                cumulative += w;
                last = Some(c.id);
                if target < cumulative {
                    return Some(c.id);
                }
            }
        }
        // Rounding put the target at the very end; the maximum always has
        // weight 1, so `last` is set whenever candidates remain.
        last.or_else(|| self.candidates.first().map(|c| c.id))
    }
}

fn all_nan() -> Error {
    Error::InvalidArgument("sampler: expected at least one logit that is not NaN".into())
}

/// Index of the largest logit; the first one wins on ties and NaN entries
/// are skipped. `None` when `logits` is empty or all NaN.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (id, &logit) in (0u32..).zip(logits) {
        if logit.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if logit <= b => {}
            _ => best = Some((id, logit)),
        }
    }
    best.map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::Rng;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerParams {
        SamplerParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
        }
    }

    /// Deterministic pseudo-random logits in [-8, 8).
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-8.0f32..8.0)).collect()
    }

    fn sequence(p: SamplerParams, steps: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(p).unwrap();
        let mut history = Vec::new();
        for step in 0..steps {
            let l = logits(1000, step as u64);
            let t = sampler.sample(&l, &history).unwrap();
            history.push(t);
        }
        history
    }

    #[test]
    fn argmax_first_max_wins_and_skips_nan() {
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, 0.5]), Some(3));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplerParams::greedy()).unwrap();
        for seed in 0..20 {
            let l = logits(49152, seed);
            assert_eq!(s.sample(&l, &[]).unwrap(), argmax(&l).unwrap());
        }
    }

    #[test]
    fn negative_temperature_is_greedy() {
        let mut s = Sampler::new(params(-1.0, 40, 0.9, 0.1)).unwrap();
        let l = logits(500, 3);
        assert_eq!(s.sample(&l, &[]).unwrap(), argmax(&l).unwrap());
    }

    #[test]
    fn top_k_selects_like_a_full_sort_with_ties_and_nan() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        // Few distinct values, so many ties straddle the cut.
        let l: Vec<f32> = (0..49152)
            .map(|i| {
                if i % 97 == 0 {
                    f32::NAN
                } else {
                    f32::from(rng.gen_range(0u8..20))
                }
            })
            .collect();
        for k in [1, 7, 40, 100, 1000] {
            let mut s = Sampler::new(params(1.0, k, 1.0, 0.0)).unwrap();
            s.work = l.clone();
            s.candidates.clear();
            s.collect_top_k(k);
            let got: Vec<u32> = s.candidates.iter().map(|c| c.id).collect();
            let mut want: Vec<u32> = (0..l.len() as u32)
                .filter(|&i| !l[i as usize].is_nan())
                .collect();
            want.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            want.truncate(k);
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(params(1.5, 1, 1.0, 0.0)).unwrap();
        for seed in 0..20 {
            let l = logits(4096, seed);
            assert_eq!(s.sample(&l, &[]).unwrap(), argmax(&l).unwrap());
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let p = params(1.0, 0, 1.0, 0.0);
        let a = sequence(p.clone(), 50);
        let b = sequence(p.clone(), 50);
        assert_eq!(a, b);
        let c = sequence(SamplerParams { seed: 7, ..p }, 50);
        assert_ne!(a, c);
    }

    #[test]
    fn default_params_are_reproducible_and_valid() {
        let p = SamplerParams::default();
        p.validate().unwrap();
        assert_eq!(sequence(p.clone(), 30), sequence(p, 30));
    }

    /// Temperature 1 and no truncation draw in proportion to the softmax.
    #[test]
    fn samples_follow_softmax() {
        let l = [2.0f32, 1.0, 0.5, 0.0, -1.0, -3.0];
        let max = 2.0f32;
        let w: Vec<f64> = l.iter().map(|&x| f64::from(x - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let n = 20_000usize;
        let mut counts = [0usize; 6];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0)).unwrap();
        for _ in 0..n {
            counts[s.sample(&l, &[]).unwrap() as usize] += 1;
        }
        let chi2: f64 = counts
            .iter()
            .zip(&w)
            .map(|(&c, &wi)| {
                let expected = n as f64 * wi / total;
                (c as f64 - expected).powi(2) / expected
            })
            .sum();
        // 5 degrees of freedom: p = 0.001 at 20.5.
        assert!(
            chi2 < 20.5,
            "chi-square {chi2} too large, counts {counts:?}"
        );
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let l = [1.0f32, 0.0];
        let count_first = |t: f32| {
            let mut s = Sampler::new(params(t, 0, 1.0, 0.0)).unwrap();
            (0..5000)
                .filter(|_| s.sample(&l, &[]).unwrap() == 0)
                .count()
        };
        let cold = count_first(0.25);
        let warm = count_first(1.0);
        let hot = count_first(4.0);
        assert!(cold > warm && warm > hot, "{cold} {warm} {hot}");
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03.
        let l = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(params(1.0, 0, 0.8, 0.0)).unwrap();
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[s.sample(&l, &[]).unwrap() as usize] = true;
        }
        assert_eq!(seen, [true, true, false, false]);
    }

    #[test]
    fn top_p_on_large_vocab_without_top_k() {
        // One token holds most of the mass; a selection of growing prefixes must
        // find the same set as a full sort.
        let mut l = logits(49152, 9);
        l[123] = 30.0;
        l[456] = 29.0;
        let mut s = Sampler::new(params(1.0, 0, 0.99, 0.0)).unwrap();
        for _ in 0..200 {
            let t = s.sample(&l, &[]).unwrap();
            assert!(t == 123 || t == 456, "{t}");
        }
    }

    #[test]
    fn min_p_excludes_unlikely_tokens() {
        // Relative probabilities 1, e^-1 = 0.37, e^-3 = 0.05.
        let l = [0.0f32, -1.0, -3.0];
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.1)).unwrap();
        let mut seen = [false; 3];
        for _ in 0..2000 {
            seen[s.sample(&l, &[]).unwrap() as usize] = true;
        }
        assert_eq!(seen, [true, true, false]);
    }

    #[test]
    fn repeat_penalty_follows_llama_cpp() {
        let mut s = Sampler::new(SamplerParams {
            repeat_penalty: 2.0,
            repeat_last_n: 3,
            ..SamplerParams::greedy()
        })
        .unwrap();
        // Token 0 (positive) is halved, token 2 (negative) doubled.
        assert_eq!(s.sample(&[3.0, 2.0, -0.1], &[0, 0]).unwrap(), 1);
        // Tokens outside the window are not penalised.
        assert_eq!(s.sample(&[3.0, 2.0], &[0, 1, 1, 1]).unwrap(), 0);
        // Repeats count once: 4.0 / 2 = 2.0 < 3.0.
        assert_eq!(s.sample(&[4.0, 3.0], &[0, 0, 0]).unwrap(), 1);
        // A negative logit goes further down: -1.0 * 2 < -1.5.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0]).unwrap(), 1);
        // Out-of-vocabulary history in the window is an error.
        assert!(matches!(
            s.sample(&[1.0, 2.0], &[5]),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn empty_and_nan_logits_are_errors() {
        for p in [SamplerParams::greedy(), SamplerParams::default()] {
            let mut s = Sampler::new(p).unwrap();
            assert!(matches!(s.sample(&[], &[]), Err(Error::InvalidArgument(_))));
            assert!(matches!(
                s.sample(&[f32::NAN; 8], &[]),
                Err(Error::InvalidArgument(_))
            ));
        }
    }

    #[test]
    fn nan_logits_are_never_sampled() {
        let mut s = Sampler::new(params(5.0, 0, 1.0, 0.0)).unwrap();
        let l = [f32::NAN, 0.0, f32::NAN, 0.0];
        for _ in 0..500 {
            let t = s.sample(&l, &[]).unwrap();
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn infinite_logits_are_handled() {
        let mut s = Sampler::new(params(1.0, 0, 0.9, 0.05)).unwrap();
        let l = [0.0, f32::INFINITY, 1.0, f32::NEG_INFINITY];
        for _ in 0..100 {
            assert_eq!(s.sample(&l, &[]).unwrap(), 1);
        }
        let l = [f32::NEG_INFINITY; 3];
        for _ in 0..100 {
            assert!(s.sample(&l, &[]).unwrap() < 3);
        }
    }

    #[test]
    fn validate_names_the_field() {
        let cases = [
            (
                SamplerParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplerParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplerParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplerParams {
                    top_p: f32::NAN,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplerParams {
                    min_p: -0.1,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplerParams {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                SamplerParams {
                    repeat_penalty: -1.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
        ];
        for (p, field) in cases {
            match Sampler::new(p) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains(field), "{msg}"),
                other => panic!("expected InvalidArgument for {field}, got {other:?}"),
            }
        }
    }

    /// Independent reference: is `id` allowed by top-k, top-p and min-p?
    fn allowed(l: &[f32], p: &SamplerParams, id: u32) -> bool {
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let Some(rank) = order.iter().position(|&t| t == id) else {
            return false;
        };
        let max = f64::from(l[order[0] as usize]);
        let w: Vec<f64> = order
            .iter()
            .map(|&t| (f64::from(l[t as usize]) - max).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let before: f64 = w[..rank].iter().sum::<f64>() / total;
        let eps = 1e-4;
        if p.top_p < 1.0 && before >= f64::from(p.top_p) + eps {
            return false;
        }
        w[rank] >= f64::from(p.min_p) * w[0] - eps
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn sampled_token_is_in_range_and_allowed(
            l in prop::collection::vec(-20.0f32..20.0, 1..300),
            top_k in 0usize..50,
            top_p in 0.0f32..=1.0,
            min_p in 0.0f32..=1.0,
            temperature in 0.05f32..3.0,
            seed in any::<u64>(),
        ) {
            let p = SamplerParams { temperature, top_k, top_p, min_p, repeat_penalty: 1.0, repeat_last_n: 0, seed };
            let mut s = Sampler::new(p.clone()).unwrap();
            for _ in 0..5 {
                let t = s.sample(&l, &[]).unwrap();
                prop_assert!((t as usize) < l.len());
                prop_assert!(allowed(&l, &p, t), "token {} not allowed", t);
            }
        }
    }
}
