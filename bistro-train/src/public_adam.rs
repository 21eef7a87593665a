//! The public optimizer state: a lazy AdamW whose moments and step counts every node holds.
//!
//! Protocol v4 (the learning lab's arm D1, `docs/learning/README.md`) sends each window's
//! gradient at a random `1/compression` of the coordinates as dithered codes; every node
//! applies the accepted mean of the decoded codes through AdamW *at those coordinates only*
//! (lazy: a coordinate's moments and step count change only in the windows that draw it).
//! The moments and counts are therefore a function of public data, part of the state every
//! node must agree on: they are in the state hash ([`crate::accepted::state_hash`]), in
//! checkpoints and in the local state, and a repaired or joining node resumes them exactly.
//!
//! One coordinate's step, in f64 from the f32 state, stored f32 (the same arithmetic on every
//! node; no fused multiply-add, powers by repeated squaring):
//! `t += 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;`
//! `theta = theta (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.

use bistro_model::{ParamSpec, Params};
use rayon::prelude::*;

use crate::hparams::HParams;
use crate::slices::SliceIndices;

/// Name prefixes of the optimizer tensors in checkpoints: first moments, second moments,
/// step counts (the parameter's name follows).
pub const TENSOR_PREFIXES: [&str; 3] = ["bistro.adam.m.", "bistro.adam.v.", "bistro.adam.t."];

/// The settings of one window's step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// The window's learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl AdamStep {
    /// The step of `window` under `h`.
    pub fn of(h: &HParams, window: u64) -> Self {
        AdamStep {
            lr: h.learning_rate_at(window),
            beta1: h.adam_beta1,
            beta2: h.adam_beta2,
            eps: h.adam_eps,
            weight_decay: h.weight_decay,
        }
    }
}

/// First and second moments and step counts of every parameter (canonical order).
#[derive(Clone, Debug, PartialEq)]
pub struct PublicAdam {
    /// First moments.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
    /// Per-coordinate step counts.
    pub t: Vec<Vec<u32>>,
}

/// Parameter values and optimizer state at a window's coordinates (one vector per
/// parameter, index order): what a step produces, or what it overwrites.
#[derive(Clone, Debug, PartialEq)]
pub struct AtIndices {
    /// Parameter values.
    pub theta: Vec<Vec<f32>>,
    /// First moments.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
    /// Step counts.
    pub t: Vec<Vec<u32>>,
}

/// `b^t` by repeated squaring (deterministic: only IEEE multiplications).
fn pow_u32(mut b: f64, mut t: u32) -> f64 {
    let mut r = 1.0;
    while t > 0 {
        if t & 1 == 1 {
            r *= b;
        }
        b *= b;
        t >>= 1;
    }
    r
}

/// Errors of the optimizer state.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AdamError {
    /// The state does not fit the model.
    #[error("optimizer state: {0}")]
    Shape(String),
}

impl PublicAdam {
    /// The state at genesis: zero moments, no steps.
    pub fn zeros(specs: &[ParamSpec]) -> Self {
        PublicAdam {
            m: specs.iter().map(|s| vec![0.0; s.numel()]).collect(),
            v: specs.iter().map(|s| vec![0.0; s.numel()]).collect(),
            t: specs.iter().map(|s| vec![0; s.numel()]).collect(),
        }
    }

    /// Check that the state has one vector of the right length per parameter and that every
    /// value is finite with non-negative second moments (what a downloaded state must be).
    pub fn check(&self, specs: &[ParamSpec]) -> Result<(), AdamError> {
        let n = specs.len();
        if self.m.len() != n || self.v.len() != n || self.t.len() != n {
            return Err(AdamError::Shape(format!("{} parameters expected", n)));
        }
        for (p, s) in specs.iter().enumerate() {
            let k = s.numel();
            if self.m[p].len() != k || self.v[p].len() != k || self.t[p].len() != k {
                return Err(AdamError::Shape(format!("`{}` needs {k} values per state vector", s.name)));
            }
            if self.m[p].iter().any(|x| !x.is_finite()) || self.v[p].iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                return Err(AdamError::Shape(format!("`{}` holds a non-finite or negative moment", s.name)));
            }
        }
        Ok(())
    }

    /// The state at `indices` (to restore it after a trial step).
    pub fn read(&self, theta_at_i: &[Vec<f32>], indices: &SliceIndices) -> AtIndices {
        let pick = |x: &[Vec<f32>]| -> Vec<Vec<f32>> {
            indices.all().iter().zip(x).map(|(ids, xs)| ids.iter().map(|&i| xs[i as usize]).collect()).collect()
        };
        AtIndices {
            theta: theta_at_i.to_vec(),
            m: pick(&self.m),
            v: pick(&self.v),
            t: indices
                .all()
                .iter()
                .zip(&self.t)
                .map(|(ids, ts)| ids.iter().map(|&i| ts[i as usize]).collect())
                .collect(),
        }
    }

    /// The step with gradient `g` at `indices` from `theta_at_i`, without changing anything.
    pub fn step_at(&self, theta_at_i: &[Vec<f32>], g: &[Vec<f32>], indices: &SliceIndices, s: &AdamStep) -> AtIndices {
        let per: Vec<_> = indices
            .all()
            .par_iter()
            .enumerate()
            .map(|(p, ids)| {
                let k = ids.len();
                let (mut th, mut mm, mut vv, mut tt) =
                    (Vec::with_capacity(k), Vec::with_capacity(k), Vec::with_capacity(k), Vec::with_capacity(k));
                for (j, &i) in ids.iter().enumerate() {
                    let i = i as usize;
                    let gj = g[p][j] as f64;
                    let t = self.t[p][i].saturating_add(1);
                    let m = s.beta1 * self.m[p][i] as f64 + (1.0 - s.beta1) * gj;
                    let v = s.beta2 * self.v[p][i] as f64 + (1.0 - s.beta2) * gj * gj;
                    let m_hat = m / (1.0 - pow_u32(s.beta1, t));
                    let v_hat = v / (1.0 - pow_u32(s.beta2, t));
                    let step = m_hat / (v_hat.sqrt() + s.eps);
                    th.push((theta_at_i[p][j] as f64 * (1.0 - s.lr * s.weight_decay) - s.lr * step) as f32);
                    mm.push(m as f32);
                    vv.push(v as f32);
                    tt.push(t);
                }
                (th, mm, vv, tt)
            })
            .collect();
        let mut out = AtIndices { theta: Vec::new(), m: Vec::new(), v: Vec::new(), t: Vec::new() };
        for (th, mm, vv, tt) in per {
            out.theta.push(th);
            out.m.push(mm);
            out.v.push(vv);
            out.t.push(tt);
        }
        out
    }

    /// Write `at` (parameters and state) at `indices`.
    pub fn write(&mut self, params: &Params, indices: &SliceIndices, at: &AtIndices) -> bistro_model::Result<()> {
        crate::slices::scatter_params(params, indices, &at.theta)?;
        for (p, ids) in indices.all().iter().enumerate() {
            for (j, &i) in ids.iter().enumerate() {
                let i = i as usize;
                self.m[p][i] = at.m[p][j];
                self.v[p][i] = at.v[p][j];
                self.t[p][i] = at.t[p][j];
            }
        }
        Ok(())
    }

    /// Apply the step with gradient `g` at `indices` to `params` and this state.
    pub fn apply(
        &mut self,
        params: &Params,
        indices: &SliceIndices,
        g: &[Vec<f32>],
        s: &AdamStep,
    ) -> bistro_model::Result<()> {
        let theta = crate::slices::gather_params(params, indices)?;
        let at = self.step_at(&theta, g, indices, s);
        self.write(params, indices, &at)
    }

    /// The bytes of parameter `p`'s state as hashed: m, v (f32 LE) then t (u32 LE).
    pub fn leaf_bytes(&self, p: usize, out: &mut Vec<u8>) {
        out.extend(self.m[p].iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.v[p].iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.t[p].iter().flat_map(|x| x.to_le_bytes()));
    }

    /// The state as named little-endian buffers for a safetensors file: `(name, dtype is
    /// u32, bytes)`, three per parameter under [`TENSOR_PREFIXES`].
    pub fn tensors(&self, specs: &[ParamSpec]) -> Vec<(String, bool, Vec<u8>)> {
        let mut out = Vec::with_capacity(3 * specs.len());
        for (p, s) in specs.iter().enumerate() {
            out.push((
                format!("{}{}", TENSOR_PREFIXES[0], s.name),
                false,
                self.m[p].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
            out.push((
                format!("{}{}", TENSOR_PREFIXES[1], s.name),
                false,
                self.v[p].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
            out.push((
                format!("{}{}", TENSOR_PREFIXES[2], s.name),
                true,
                self.t[p].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
        }
        out
    }
}

impl PublicAdam {
    /// Read the state from a safetensors file holding [`PublicAdam::tensors`] (other tensors
    /// are ignored): every tensor present with its dtype and length, then [`Self::check`].
    pub fn from_safetensors(st: &safetensors::SafeTensors<'_>, specs: &[ParamSpec]) -> Result<Self, AdamError> {
        use safetensors::tensor::Dtype;
        let read = |prefix: &str, s: &ParamSpec, dtype: Dtype| -> Result<Vec<[u8; 4]>, AdamError> {
            let name = format!("{prefix}{}", s.name);
            let view = st.tensor(&name).map_err(|_| AdamError::Shape(format!("`{name}` is missing")))?;
            if view.dtype() != dtype || view.shape() != [s.numel()] {
                return Err(AdamError::Shape(format!(
                    "`{name}` is {:?} {:?}, expected {dtype:?} [{}]",
                    view.dtype(),
                    view.shape(),
                    s.numel()
                )));
            }
            Ok(view.data().chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect())
        };
        let mut adam = PublicAdam { m: Vec::new(), v: Vec::new(), t: Vec::new() };
        for s in specs {
            adam.m.push(read(TENSOR_PREFIXES[0], s, Dtype::F32)?.into_iter().map(f32::from_le_bytes).collect());
            adam.v.push(read(TENSOR_PREFIXES[1], s, Dtype::F32)?.into_iter().map(f32::from_le_bytes).collect());
            adam.t.push(read(TENSOR_PREFIXES[2], s, Dtype::U32)?.into_iter().map(u32::from_le_bytes).collect());
        }
        adam.check(specs)?;
        Ok(adam)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_by_squaring_match() {
        for t in [0u32, 1, 2, 3, 7, 64, 1000] {
            assert!((pow_u32(0.95, t) - 0.95f64.powi(t as i32)).abs() < 1e-12);
        }
    }

    #[test]
    fn first_step_moves_by_the_learning_rate_against_the_sign() {
        let specs = vec![ParamSpec { name: "w".into(), shape: vec![4], kind: bistro_model::params::ParamKind::Norm }];
        let adam = PublicAdam::zeros(&specs);
        let idx = SliceIndices::from_lists(vec![vec![0, 2]]);
        let s = AdamStep { lr: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 };
        let at = adam.step_at(&[vec![1.0, 1.0]], &[vec![0.5, -2.0]], &idx, &s);
        assert!((at.theta[0][0] - 0.99).abs() < 1e-6 && (at.theta[0][1] - 1.01).abs() < 1e-6, "{at:?}");
        assert_eq!(at.t, vec![vec![1, 1]]);
    }
}
