//! One row's running reduction over the vocabulary: the online softmax's max and sums (entropy),
//! top-k, and the ranks of its targets.

/// The running reduction of one row of logits over vocabulary blocks (online softmax):
/// `s = Σ e^(z−m)` and `t = Σ e^(z−m)(z−m)` relative to the running max `m`.
#[derive(Clone, Debug)]
pub(super) struct RowState {
    pub(super) m: f32,
    pub(super) s: f64,
    pub(super) t: f64,
    pub(super) top_k: usize,
    /// `(id, logit)`, highest first; ties keep the lower id first.
    pub(super) top: Vec<(u32, f32)>,
    /// Per traced target: its index in the spec's `targets`, the logit comparisons use, how many
    /// other entries exceed it, and the logit as the GEMM computed it (for the probability).
    pub(super) target_index: Vec<usize>,
    pub(super) target_cmp: Vec<f32>,
    pub(super) target_above: Vec<usize>,
    pub(super) target_z: Vec<f32>,
}

/// The layout of a detail row's reduction over one vocabulary tile ([`RowState::tile_part`]), all
/// of a detail row that leaves the card on CUDA: `[m, s, s′, t, t′, ids, logits, above, own]`,
/// f32: the tile's max and `Σ e^(z−m)`, `Σ e^(z−m)(z−m)` (each as an f32 and its remainder, `s + s′`
/// in f64: the tiles add up as the host's f64 sums did); its top-k ids (as f32, exact below 2²⁴; −1
/// where the tile has fewer entries) and their logits (−∞ there), highest first, ties lower id
/// first, excluded ids left out; per target of the spec, how many of the tile's other entries
/// exceed `cmp`, and its own logit where the tile holds it (else `cmp`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct TilePart {
    pub(super) top_k: usize,
    pub(super) targets: usize,
}

/// Values before the top-k: `[m, s, s′, t, t′]` (row_reduce.cu's `DETAIL_HEAD`).
pub(super) const TILE_HEAD: usize = 5;

impl TilePart {
    pub(super) fn width(&self) -> usize {
        TILE_HEAD + 2 * self.top_k + 2 * self.targets
    }
}

impl RowState {
    pub(super) fn new(top_k: usize, target_index: Vec<usize>, target_cmp: Vec<f32>) -> Self {
        let n = target_cmp.len();
        RowState {
            target_index,
            m: f32::NEG_INFINITY,
            s: 0.0,
            t: 0.0,
            top_k,
            top: Vec::with_capacity(top_k + 1),
            target_z: target_cmp.clone(),
            target_cmp,
            target_above: vec![0; n],
        }
    }

    pub(super) fn update(&mut self, z: &[f32], v0: usize, targets: &[u32], excluded: &[bool]) {
        self.update_softmax(z);
        self.update_ranked(z, v0, targets, excluded);
    }

    /// The running max and the two sums.
    pub(super) fn update_softmax(&mut self, z: &[f32]) {
        self.raise_max(kernels::max(z));
        let (s, t) = kernels::sum_exp(z, self.m);
        self.s += s;
        self.t += t;
    }

    /// The running max raised to `m` where that is higher, the sums re-based on it:
    /// `e^(z−m') = e^(z−m)·e^(m−m')`.
    fn raise_max(&mut self, m: f32) {
        if m > self.m {
            if self.s > 0.0 {
                let d = (self.m - m) as f64;
                let f = d.exp();
                self.t = f * (self.t + d * self.s);
                self.s *= f;
            }
            self.m = m;
        }
    }

    /// Another part of the row's (max `m`, `s`, `t`), each relative to its own max, folded in.
    fn fold_softmax(&mut self, m: f32, s: f64, t: f64) {
        if s == 0.0 {
            return;
        }
        self.raise_max(m);
        let d = (m - self.m) as f64;
        let f = d.exp();
        self.s += f * s;
        self.t += f * (t + d * s);
    }

    /// `(id, z)` into the top-k, where it belongs: ties keep the entry already there (offered in
    /// increasing id, the lower id) first.
    fn offer(&mut self, id: u32, z: f32) {
        if self.top.len() < self.top_k || z > self.top[self.top.len() - 1].1 {
            let at = self.top.partition_point(|&(_, w)| w >= z);
            self.top.insert(at, (id, z));
            self.top.truncate(self.top_k);
        }
    }

    /// Top-k and target ranks (rows whose position was asked for).
    pub(super) fn update_ranked(
        &mut self,
        z: &[f32],
        v0: usize,
        targets: &[u32],
        excluded: &[bool],
    ) {
        if self.top_k > 0 {
            for (i, &v) in z.iter().enumerate() {
                if (self.top.len() < self.top_k || v > self.top[self.top.len() - 1].1)
                    && !v.is_nan()
                    && !excluded.get(v0 + i).copied().unwrap_or(false)
                {
                    self.offer((v0 + i) as u32, v);
                }
            }
        }
        for (j, &t) in self.target_index.iter().enumerate() {
            let cmp = self.target_cmp[j];
            let mut above = z.iter().filter(|&&w| w > cmp).count();
            let id = targets[t] as usize;
            if (v0..v0 + z.len()).contains(&id) {
                let own = z[id - v0];
                self.target_z[j] = own;
                above -= (own > cmp) as usize;
            }
            self.target_above[j] += above;
        }
    }

    /// One vocabulary tile's reduction of one row, as the tensor path leaves it where the rows live
    /// (a CUDA kernel computes the same, lens/row_reduce.cu): `z` the logits of entries `v0..`,
    /// `cmp` the row's logit of each of the spec's `targets` (all of them, whichever this row
    /// traces). Laid out as [`TilePart`] says; [`Self::merge_tile`] folds the tiles back in order.
    pub(super) fn tile_part(
        z: &[f32],
        v0: usize,
        layout: TilePart,
        targets: &[u32],
        excluded: &[bool],
        cmp: &[f32],
    ) -> Vec<f32> {
        let mut st = RowState::new(layout.top_k, (0..cmp.len()).collect(), cmp.to_vec());
        st.update(z, v0, targets, excluded);
        let mut out = Vec::with_capacity(layout.width());
        let split = |x: f64| [x as f32, (x - x as f32 as f64) as f32];
        out.push(st.m);
        out.extend(split(st.s));
        out.extend(split(st.t));
        let pad = layout.top_k - st.top.len();
        out.extend(st.top.iter().map(|&(id, _)| id as f32));
        out.extend(std::iter::repeat_n(-1.0, pad));
        out.extend(st.top.iter().map(|&(_, z)| z));
        out.extend(std::iter::repeat_n(f32::NEG_INFINITY, pad));
        out.extend(st.target_above.iter().map(|&a| a as f32));
        out.extend(&st.target_z);
        out
    }

    /// A tile's part ([`Self::tile_part`]) of the entries `v0..v0 + len` folded into the row's
    /// reduction; tiles come in increasing `v0` (so that ties in the top-k keep the lower id).
    pub(super) fn merge_tile(
        &mut self,
        part: &[f32],
        v0: usize,
        len: usize,
        layout: TilePart,
        targets: &[u32],
    ) {
        let (k, n) = (layout.top_k, layout.targets);
        let joined = |i: usize| part[i] as f64 + part[i + 1] as f64;
        self.fold_softmax(part[0], joined(1), joined(3));
        let part = &part[TILE_HEAD..];
        let (ids, zs) = (&part[..k], &part[k..2 * k]);
        for (&id, &z) in ids.iter().zip(zs).take(self.top_k) {
            if id < 0.0 {
                break;
            }
            self.offer(id as u32, z);
        }
        let (above, own) = (&part[2 * k..2 * k + n], &part[2 * k + n..]);
        for (j, &t) in self.target_index.iter().enumerate() {
            self.target_above[j] += above[t] as usize;
            if (v0..v0 + len).contains(&(targets[t] as usize)) {
                self.target_z[j] = own[t];
            }
        }
    }

    pub(super) fn wants_detail(&self) -> bool {
        self.top_k > 0 || !self.target_cmp.is_empty()
    }

    pub(super) fn lse(&self) -> f32 {
        (self.m as f64 + self.s.ln()) as f32
    }

    /// `H = log s − t/s` (nats).
    pub(super) fn entropy(&self) -> f32 {
        ((self.s.ln() - self.t / self.s) as f32).max(0.0)
    }
}

mod kernels {
    //! The one hot loop of the lens: `Σ e^(z−m)` and `Σ e^(z−m)(z−m)` over a vocabulary row,
    //! with a branch-free exp the compiler vectorises (AVX-512, or AVX2+FMA, when the CPU has
    //! them).

    use crate::models::fastmath::{exp, vectorised};

    #[inline(always)]
    fn sum_exp_generic(z: &[f32], m: f32) -> (f64, f64) {
        const LANES: usize = 16;
        let mut s = [0f32; LANES];
        let mut t = [0f32; LANES];
        let chunks = z.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                let d = c[i] - m;
                let e = exp(d);
                s[i] += e;
                t[i] += e * d;
            }
        }
        let mut s_tot: f64 = s.iter().map(|&v| v as f64).sum();
        let mut t_tot: f64 = t.iter().map(|&v| v as f64).sum();
        for &v in rest {
            let d = v - m;
            let e = exp(d);
            s_tot += e as f64;
            t_tot += (e * d) as f64;
        }
        (s_tot, t_tot)
    }

    /// The row's largest value (NaNs ignored, as `f32::max` does), compiled for AVX-512 or AVX2
    /// where the CPU has them: the baseline build's SSE2 fold took as long as the sum of
    /// exponentials.
    pub fn max(z: &[f32]) -> f32 {
        let mut m = f32::NEG_INFINITY;
        vectorised(
            #[inline(always)]
            || m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        );
        m
    }

    /// Compiled for AVX-512 or AVX2 + FMA where the CPU has them ([`vectorised`]).
    pub fn sum_exp(z: &[f32], m: f32) -> (f64, f64) {
        let mut r = (0.0, 0.0);
        vectorised(
            #[inline(always)]
            || r = sum_exp_generic(z, m),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked online reduction equals a direct softmax over the whole row.
    #[test]
    fn blocked_row_reduction_matches_a_direct_softmax() {
        let z: Vec<f32> = (0..10_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0 + (i as f32) * 1e-3)
            .collect();
        let m = z.iter().copied().fold(f32::MIN, f32::max);
        let s: f64 = z.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let p: Vec<f64> = z.iter().map(|&v| ((v - m) as f64).exp() / s).collect();
        let h: f64 = -p
            .iter()
            .map(|&q| if q > 0.0 { q * q.ln() } else { 0.0 })
            .sum::<f64>();
        let targets = [5u32, 9_999];
        let mut st = RowState::new(
            3,
            vec![0, 1],
            targets.iter().map(|&t| z[t as usize]).collect(),
        );
        for (b, chunk) in z.chunks(777).enumerate() {
            st.update(chunk, b * 777, &targets, &[]);
        }
        assert!(
            (st.entropy() as f64 - h).abs() < 1e-5,
            "{} vs {h}",
            st.entropy()
        );
        assert!((st.lse() as f64 - (m as f64 + s.ln())).abs() < 1e-5);
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
        assert_eq!(
            st.top.iter().map(|t| t.0 as usize).collect::<Vec<_>>(),
            order[..3].to_vec()
        );
        for (k, &id) in targets.iter().enumerate() {
            let rank = 1 + z.iter().filter(|&&w| w > z[id as usize]).count();
            assert_eq!(st.target_above[k] + 1, rank);
            assert!(((st.target_z[k] - st.lse()).exp() as f64 - p[id as usize]).abs() < 1e-6);
        }
    }

    /// A row reduced tile by tile into [`TilePart`]s and merged back equals the row reduced in
    /// one go: the same top-k (ties across and within tiles, excluded ids, a tile with fewer
    /// entries than k), the same ranks and target logits, and the sums to rounding.
    #[test]
    fn tiles_merged_back_equal_the_whole_row() {
        // Values on a coarse grid: many ties, across the tiles' boundaries too.
        let z: Vec<f32> = (0..1000).map(|i| ((i * 7919 % 61) as f32) / 4.0).collect();
        let mut excluded = vec![false; z.len()];
        for i in (3..z.len()).step_by(17) {
            excluded[i] = true;
        }
        let targets = [998u32, 5, 640];
        let cmp: Vec<f32> = targets.iter().map(|&t| z[t as usize] + 0.125).collect();
        for (top_k, tile) in [(5, 100), (12, 7), (3, 1000), (9, 333)] {
            let layout = TilePart {
                top_k,
                targets: targets.len(),
            };
            // The row traces two of the three targets, in its own order.
            let traced = vec![2, 0];
            let traced_cmp: Vec<f32> = traced.iter().map(|&j| cmp[j]).collect();
            let mut whole = RowState::new(top_k, traced.clone(), traced_cmp.clone());
            whole.update(&z, 0, &targets, &excluded);
            let mut merged = RowState::new(top_k, traced, traced_cmp);
            for (b, chunk) in z.chunks(tile).enumerate() {
                let part = RowState::tile_part(chunk, b * tile, layout, &targets, &excluded, &cmp);
                assert_eq!(part.len(), layout.width());
                merged.merge_tile(&part, b * tile, chunk.len(), layout, &targets);
            }
            assert_eq!(merged.top, whole.top, "k {top_k}, tile {tile}");
            assert_eq!(merged.target_above, whole.target_above);
            assert_eq!(merged.target_z, whole.target_z);
            assert_eq!(merged.m, whole.m);
            assert!((merged.s / whole.s - 1.0).abs() < 1e-6);
            assert!((merged.entropy() - whole.entropy()).abs() < 1e-5);
        }
    }

    #[test]
    fn excluded_ids_never_enter_the_top_k() {
        let z: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mut excluded = vec![false; 100];
        excluded[99] = true;
        excluded[97] = true;
        let mut st = RowState::new(2, vec![], vec![]);
        st.update(&z, 0, &[], &excluded);
        assert_eq!(st.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![98, 96]);
    }
}
