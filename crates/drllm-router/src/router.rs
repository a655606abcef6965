//! The routers of all blocks as one batched module: for block `l`, `Linear(hidden -> D)`,
//! tanh-approximated GELU, `Linear(D -> 3)`, applied to each pooled window, logits averaged over
//! windows. Batched over blocks (one `bmm` per linear layer for all blocks), which is what makes
//! training on cached features fast.

use serde::{Deserialize, Serialize};
use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// Decision names, by class index (a path count).
pub const CLASSES: [&str; 3] = ["skip", "execute", "repeat"];

/// Sizes of a set of routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterShape {
    /// Blocks of the model (one router each).
    pub num_layers: usize,
    /// Hidden size of the model (router input).
    pub hidden_size: usize,
    /// Width of the router's hidden layer (128 in the paper).
    pub router_hidden: usize,
}

/// The routers of every block. Weights are stored batched: `w1 [L, H, D]`, `b1 [L, D]`,
/// `w2 [L, D, 3]`, `b2 [L, 3]` (each `w` is the transpose of a PyTorch `Linear.weight`).
#[derive(Debug)]
pub struct Routers {
    /// Sizes.
    pub shape: RouterShape,
    /// First layer weights `[L, H, D]`.
    pub w1: Tensor,
    /// First layer biases `[L, D]`.
    pub b1: Tensor,
    /// Second layer weights `[L, D, 3]`.
    pub w2: Tensor,
    /// Second layer biases `[L, 3]`.
    pub b2: Tensor,
}

impl Routers {
    /// New trainable routers in `vs`, Xavier-uniform weights and zero biases (the initialisation
    /// follows `tch::manual_seed`).
    pub fn new(vs: &Path, shape: RouterShape) -> Self {
        let (l, h, d) = (
            shape.num_layers as i64,
            shape.hidden_size as i64,
            shape.router_hidden as i64,
        );
        let xavier = |fan_in: i64, fan_out: i64| {
            let b = (6.0 / (fan_in + fan_out) as f64).sqrt();
            Init::Uniform { lo: -b, up: b }
        };
        Routers {
            shape,
            w1: vs.var("w1", &[l, h, d], xavier(h, d)),
            b1: vs.var("b1", &[l, d], Init::Const(0.0)),
            w2: vs.var("w2", &[l, d, 3], xavier(d, 3)),
            b2: vs.var("b2", &[l, 3], Init::Const(0.0)),
        }
    }

    /// Logits `[N, L, 3]` (f32) for pooled features `x` `[N, L, W, H]` (any float kind).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_layer_major(&x.permute([1, 0, 2, 3]))
    }

    /// Logits `[N, L, 3]` (f32) for pooled features stored block-major, `x` `[L, N, W, H]`: the
    /// layout training keeps, where a batch's features are already one matrix per block.
    pub fn forward_layer_major(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (l, n, w, h) = (s[0], s[1], s[2], s[3]);
        // [L, N*W, H]: every block's windows as one matrix (a view when `x` is contiguous).
        let xs = x.to_kind(Kind::Float).reshape([l, n * w, h]);
        let z = (xs.bmm(&self.w1) + self.b1.unsqueeze(1)).gelu("tanh");
        let logits = z.bmm(&self.w2) + self.b2.unsqueeze(1);
        logits
            .view([l, n, w, 3])
            .mean_dim(2, false, Kind::Float)
            .permute([1, 0, 2])
    }

    /// Logits `[B, 3]` (f32) of block `l`'s router for pooled windows `x` `[B, W, H]`.
    pub fn forward_block(&self, l: usize, x: &Tensor) -> Tensor {
        let l = l as i64;
        let z = (x.to_kind(Kind::Float).matmul(&self.w1.get(l)) + self.b1.get(l)).gelu("tanh");
        (z.matmul(&self.w2.get(l)) + self.b2.get(l)).mean_dim(1, false, Kind::Float)
    }

    /// The weights as PyTorch-style per-block tensors: `routers.{l}.fc1.weight [D, H]`,
    /// `routers.{l}.fc1.bias [D]`, `routers.{l}.fc2.weight [3, D]`, `routers.{l}.fc2.bias [3]`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(4 * self.shape.num_layers);
        for l in 0..self.shape.num_layers as i64 {
            let t = |x: &Tensor| x.get(l).detach().to_device(tch::Device::Cpu).contiguous();
            out.push((
                format!("routers.{l}.fc1.weight"),
                t(&self.w1).tr().contiguous(),
            ));
            out.push((format!("routers.{l}.fc1.bias"), t(&self.b1)));
            out.push((
                format!("routers.{l}.fc2.weight"),
                t(&self.w2).tr().contiguous(),
            ));
            out.push((format!("routers.{l}.fc2.bias"), t(&self.b2)));
        }
        out
    }

    /// Copies of the weights without gradient tracking (e.g. to keep the best epoch).
    pub fn snapshot(&self) -> Routers {
        let c = |t: &Tensor| t.detach().copy();
        Routers {
            shape: self.shape,
            w1: c(&self.w1),
            b1: c(&self.b1),
            w2: c(&self.w2),
            b2: c(&self.b2),
        }
    }

    /// The routers on `device`.
    pub fn to_device(&self, device: tch::Device) -> Routers {
        Routers {
            shape: self.shape,
            w1: self.w1.to_device(device),
            b1: self.b1.to_device(device),
            w2: self.w2.to_device(device),
            b2: self.b2.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_moves_decisions_toward_skip_or_execute_and_reaches_the_baseline() {
        tch::manual_seed(4);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let shape = RouterShape {
            num_layers: 2,
            hidden_size: 6,
            router_hidden: 4,
        };
        let h = Tensor::randn([64, 5, 6], (Kind::Float, tch::Device::Cpu));
        let lens = vec![5; 64];
        let base = Routers::new(&vs.root(), shape);
        // Spread the routers' own choices over all three classes.
        base.b2
            .detach()
            .copy_(&Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.3, -0.2, 0.1]).view([2, 3]));
        let _ = base.w2.detach().f_mul_scalar_(20.0).unwrap();
        let decide = |b: f64, l: usize| {
            Policy::new(base.snapshot(), 2, b)
                .unwrap()
                .decide(l, &h, &lens)
        };
        for l in 0..2 {
            let own = decide(0.0, l);
            assert!((0..3u8).all(|c| own.contains(&c)), "{own:?}");
            // Toward skip: fewer applications at every step, none at -1.
            let mut last: Option<Vec<u8>> = None;
            for b in [-1.0, -0.9, -0.5, -0.1, 0.0] {
                let d = decide(b, l);
                if let Some(prev) = &last {
                    let (now, before): (u32, u32) = (
                        d.iter().map(|&c| c as u32).sum(),
                        prev.iter().map(|&c| c as u32).sum(),
                    );
                    assert!(now >= before, "budget {b}");
                }
                if b == -1.0 {
                    assert!(d.iter().all(|&c| c == 0));
                }
                last = Some(d);
            }
            // Toward execute: a decision once execute stays execute, and 1 is the baseline.
            let mut last = own.clone();
            for b in [0.1, 0.3, 0.6, 0.9, 0.99, 1.0] {
                let d = decide(b, l);
                for (r, (&now, &before)) in d.iter().zip(&last).enumerate() {
                    assert!(
                        before != 1 || now == 1,
                        "budget {b} row {r}: {before} -> {now}"
                    );
                    assert!(now == 1 || now == own[r], "budget {b} row {r}");
                }
                if b == 1.0 {
                    assert!(d.iter().all(|&c| c == 1));
                }
                last = d;
            }
        }
        for b in [1.5, -2.0, f64::NAN] {
            let e = Policy::new(base.snapshot(), 2, b).unwrap_err().to_string();
            assert!(e.contains("outside [-1, 1]"), "{e}");
        }
    }

    #[test]
    fn decisions_are_the_argmax_of_the_shifted_log_probabilities() {
        tch::manual_seed(5);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let shape = RouterShape {
            num_layers: 3,
            hidden_size: 8,
            router_hidden: 6,
        };
        let base = Routers::new(&vs.root(), shape);
        let _ = base.b2.detach().f_uniform_(-1.0, 1.0);
        // Rows of different lengths (left padding) and two prefills of different widths.
        for t in [7i64, 4] {
            let h = Tensor::randn([5, t, 8], (Kind::Float, tch::Device::Cpu));
            let lens: Vec<usize> = (0..5).map(|r| 1 + (r * 3) % t as usize).collect();
            for budget in [-0.9, -0.3, 0.0, 0.2, 0.7] {
                let p = Policy::new(base.snapshot(), 3, budget).unwrap();
                let bias = Tensor::from_slice(&budget_bias(budget).map(|x| x as f32));
                for l in 0..3 {
                    let pooled = crate::pool::pool_windows(&h, &lens, 3);
                    let logp = base.forward_block(l, &pooled).log_softmax(-1, Kind::Float);
                    let want: Vec<i64> = Vec::try_from(&(logp + &bias).argmax(-1, false)).unwrap();
                    let got = p.decide(l, &h, &lens);
                    let want: Vec<u8> = want.into_iter().map(|c| c as u8).collect();
                    assert_eq!(got, want, "t {t} budget {budget} block {l}");
                }
            }
        }
    }

    #[test]
    fn batched_forward_equals_each_router_alone() {
        tch::manual_seed(3);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let shape = RouterShape {
            num_layers: 3,
            hidden_size: 5,
            router_hidden: 4,
        };
        let r = Routers::new(&vs.root(), shape);
        let _ = r.b1.detach().f_uniform_(-1.0, 1.0);
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, tch::Device::Cpu));
        let got = r.forward(&x);
        assert_eq!(got.size(), [2, 3, 3]);
        for l in 0..3i64 {
            // One router: Linear, GELU(tanh), Linear per window, then the mean over windows.
            let xl = x.select(1, l); // [N, W, H]
            let z = (xl.matmul(&r.w1.get(l)) + r.b1.get(l)).gelu("tanh");
            let want = (z.matmul(&r.w2.get(l)) + r.b2.get(l)).mean_dim(1, false, Kind::Float);
            let diff = (got.select(1, l) - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "block {l}: {diff}");
            let one = r.forward_block(l as usize, &xl);
            assert!((one - want).abs().max().double_value(&[]) < 1e-5);
        }
    }
}

/// The size of the budget's shift of the log-probabilities, `tan(pi/2 * |budget|)` nats: smooth
/// and monotone, 0.5 shifts by 1 nat, 0.8 by 3.1, 0.95 by 12.7, and 1 overrides every router.
pub fn budget_shift(budget: f64) -> f64 {
    (std::f64::consts::FRAC_PI_2 * budget.abs()).tan()
}

/// The shift added to the (skip, execute, repeat) log-probabilities at `budget`: below 0 skip
/// gains and repeat loses [`budget_shift`] nats (-1: every block skipped); above 0 execute gains
/// them, a confidence margin the routers must clear before leaving execute (1: every block
/// executed once, the baseline exactly), as the paper's `router_penalty` between the routers
/// and all-execute.
pub fn budget_bias(budget: f64) -> [f64; 3] {
    let s = budget_shift(budget);
    if budget < 0.0 {
        [s, 0.0, -s]
    } else {
        [0.0, s, 0.0]
    }
}

/// Why a budget cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("budget {0} is outside [-1, 1] (-1 = skip every block, 0 = the plain routers, 1 = execute every block once)")]
pub struct BudgetError(pub f64);

/// Routed inference's decisions: the hidden state entering a block is pooled exactly as in
/// training, its router scores skip / execute / repeat, and the budget shifts the
/// log-probabilities toward skip (budget < 0) or toward execute (budget > 0, see
/// [`budget_bias`]) before the argmax.
pub struct Policy {
    /// The routers (on the model's device).
    pub routers: Routers,
    /// Pooling windows (from the package manifest).
    pub windows: usize,
    budget: f64,
    /// Per block `(w1 [H, D], b1 [D], w2 [D, 3], b2 + shift [3])`, split once: `decide` runs
    /// inside prefill, block by block, where every tensor op's dispatch cost counts.
    blocks: Vec<[Tensor; 4]>,
    /// Pooling weights `[B, W, T]` of the last (lens, T): the same for every block of a prefill.
    pool: std::sync::Mutex<Option<(Vec<usize>, i64, Tensor)>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("shape", &self.routers.shape)
            .field("windows", &self.windows)
            .field("budget", &self.budget)
            .finish()
    }
}

impl Policy {
    /// A policy with `budget` in [-1, 1].
    pub fn new(routers: Routers, windows: usize, budget: f64) -> Result<Self, BudgetError> {
        if !(-1.0..=1.0).contains(&budget) || budget.is_nan() {
            return Err(BudgetError(budget));
        }
        // log_softmax only subtracts a per-row constant, so the argmax of the shifted
        // log-probabilities is the argmax of the logits plus the shift: the shift is folded
        // into the second bias.
        let shift = Tensor::from_slice(&budget_bias(budget).map(|x| x as f32))
            .to_device(routers.w1.device());
        let _g = tch::no_grad_guard();
        let blocks = (0..routers.shape.num_layers as i64)
            .map(|l| {
                [
                    routers.w1.get(l).detach(),
                    routers.b1.get(l).detach(),
                    routers.w2.get(l).detach(),
                    (routers.b2.get(l).detach().to_kind(Kind::Float) + &shift),
                ]
            })
            .collect();
        Ok(Policy {
            routers,
            windows,
            budget,
            blocks,
            pool: std::sync::Mutex::new(None),
        })
    }

    /// The budget this policy was made with.
    pub fn budget(&self) -> f64 {
        self.budget
    }

    /// Counts for block `l` of each row of `h` `[B, T, H]` (row `r` holds `lens[r]` real tokens
    /// at its end).
    pub fn decide(&self, l: usize, h: &Tensor, lens: &[usize]) -> Vec<u8> {
        let _g = tch::no_grad_guard();
        let s = h.size();
        let (b, t, hid) = (s[0], s[1], s[2]);
        let w = self.windows.max(1) as i64;
        let pooled = {
            let mut cache = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = matches!(&*cache, Some((ls, tt, _)) if ls.as_slice() == lens && *tt == t);
            if !fresh {
                let p = crate::pool::pool_weights(lens, t as usize, self.windows, h.device());
                *cache = Some((lens.to_vec(), t, p));
            }
            let (_, _, p) = cache.as_ref().expect("just filled");
            let x = if h.kind() == Kind::Float {
                h.shallow_clone()
            } else {
                h.to_kind(Kind::Float)
            };
            p.bmm(&x)
        };
        let Some([w1, b1, w2, b2]) = self.blocks.get(l) else {
            return vec![1; b as usize];
        };
        let z = b1.addmm(&pooled.view([b * w, hid]), w1).gelu("tanh");
        let choice = b2
            .addmm(&z, w2)
            .view([b, w, 3])
            .mean_dim(1, false, Kind::Float)
            .argmax(-1, false)
            .to_device(tch::Device::Cpu);
        Vec::<i64>::try_from(&choice)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.clamp(0, 2) as u8)
            .collect()
    }
}
