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
        let cmax = kernels::max(z);
        if cmax > self.m {
            if self.s > 0.0 {
                // Re-base on the new max: e^(z−m') = e^(z−m)·e^(m−m').
                let d = (self.m - cmax) as f64;
                let f = d.exp();
                self.t = f * (self.t + d * self.s);
                self.s *= f;
            }
            self.m = cmax;
        }
        let (s, t) = kernels::sum_exp(z, self.m);
        self.s += s;
        self.t += t;
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
                    && !excluded.get(v0 + i).copied().unwrap_or(false)
                {
                    let at = self.top.partition_point(|&(_, w)| w >= v);
                    self.top.insert(at, ((v0 + i) as u32, v));
                    self.top.truncate(self.top_k);
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
