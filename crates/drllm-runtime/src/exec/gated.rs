//! A differentiable prefill with soft per-prompt gates: what distillation trains routers
//! through. Each row's state after a block is `g * block(h) + (1 - g) * h`: a gate of exactly 1
//! gives the block's output and 0 its input unchanged (as a path count of 0 does), in any dtype;
//! in between, the gradient of a loss on the output reaches the gates.

use tch::Tensor;

use super::PathBatch;
use crate::error::{Error, Result};

/// Gates of a [`PathBatch::prefill_gated`]: given block `l` and the hidden state entering it
/// (`[B, T, H]`, left-padded), each row's gate `[B]` (float; 1 executes, 0 skips).
pub type GateFn<'a> = dyn FnMut(usize, &Tensor) -> Tensor + 'a;

impl PathBatch<'_> {
    /// Prefills left-padded prompts through every block once, each block's update scaled per
    /// row by `gate(l, h)`; no KV cache is kept (prompts only, for training). Autograd records
    /// the pass unless the caller holds a no-grad guard, so a loss on the result has gradients
    /// with respect to whatever the gates were computed from. Needs a batch made by
    /// [`PathBatch::new_routed`], and consumes it: it holds no cache to decode from. A gate on
    /// another device than the model is moved to it. Returns final-normed hidden states
    /// `[B, T, H]`.
    pub fn prefill_gated(mut self, prompts: &[Vec<u32>], gate: &mut GateFn<'_>) -> Result<Tensor> {
        if !self.slots.is_empty() || self.key_valid.size()[1] != 0 {
            return Err(Error::Request(
                "prefill_gated needs a fresh batch from PathBatch::new_routed".into(),
            ));
        }
        let (ids, valid, padded) = self.layout(prompts)?;
        let model = self.model;
        let b = self.batch as i64;
        let t = ids.size()[1];
        let positions =
            (valid.to_kind(tch::Kind::Int64).cumsum(1, tch::Kind::Int64) - 1).clamp_min(0);
        self.key_valid = valid.shallow_clone();
        self.padded = padded;
        let mask = model.windowed(self.attention_mask(0, t), 0, t, &self.key_valid, &positions);
        let rope = model.rope(&positions);
        let mut h = model.embed(&ids);
        for (l, block) in model.blocks.iter().enumerate() {
            let g = gate(l, &h);
            if g.size() != [b] {
                return Err(Error::Request(format!(
                    "the gate of block {l} has shape {:?}, expected [{b}]",
                    g.size()
                )));
            }
            let out = block.forward(&model.cfg, &h, &rope, &mask, &mut None);
            let g = g.to_device(h.device()).to_kind(h.kind()).view([b, 1, 1]);
            h = &out * &g + &h * (-&g + 1.0);
        }
        Ok(model.final_norm(&h))
    }
}
