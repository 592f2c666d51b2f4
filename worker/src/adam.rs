//! Adam with exactly `torch.optim.Adam`'s update (single-tensor implementation, no amsgrad, not
//! decoupled) and a learning rate per parameter.
//!
//! PyTorch expresses per-layer learning rates as parameter groups; here every parameter carries
//! its own rate, which is the same thing at the finest grain. For each parameter with a
//! gradient, one [`step`](Adam::step) does, as `torch/optim/adam.py` (`_single_tensor_adam`):
//!
//! ```text
//! step += 1
//! grad = grad + weight_decay * param                 (if weight_decay != 0: L2, not AdamW)
//! exp_avg.lerp_(grad, 1 - beta1)
//! exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value = 1 - beta2)
//! bias_correction1 = 1 - beta1 ** step
//! bias_correction2 = 1 - beta2 ** step
//! step_size = lr / bias_correction1
//! denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)
//! param.addcdiv_(exp_avg, denom, value = -step_size)
//! ```
//!
//! with the same scalar arithmetic in double precision and the same tensor operations, so the
//! result matches PyTorch's CPU Adam. Parameters without a gradient are skipped, and their state
//! is created on their first step, as in PyTorch. The state ([`AdamState`]) is public so that it
//! can be checkpointed and restored.

use tch::{TchError, Tensor};

/// Hyper-parameters shared by every parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// L2 penalty added to the gradient (`torch.optim.Adam`'s `weight_decay`).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    /// PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The per-parameter state of `torch.optim.Adam` (`state[p]`).
#[derive(Debug)]
pub struct AdamState {
    /// Number of steps taken (PyTorch keeps it as a float tensor; the value is the same).
    pub step: u64,
    /// First moment estimate, same shape as the parameter.
    pub exp_avg: Tensor,
    /// Second moment estimate, same shape as the parameter.
    pub exp_avg_sq: Tensor,
}

/// One optimised parameter.
#[derive(Debug)]
pub struct AdamParam {
    /// Its name (torchvision's, for models).
    pub name: String,
    /// The parameter itself (shares storage with the model's).
    pub tensor: Tensor,
    /// Its learning rate.
    pub lr: f64,
    /// `None` until its first step with a gradient.
    pub state: Option<AdamState>,
}

/// The optimiser.
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    params: Vec<AdamParam>,
}

impl Adam {
    /// An optimiser over `(name, parameter, learning rate)` triples.
    pub fn new(params: impl IntoIterator<Item = (String, Tensor, f64)>, config: AdamConfig) -> Adam {
        let params = params
            .into_iter()
            .map(|(name, tensor, lr)| AdamParam { name, tensor: tensor.shallow_clone(), lr, state: None })
            .collect();
        Adam { config, params }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// The parameters, their learning rates and states, in construction order.
    pub fn params(&self) -> &[AdamParam] {
        &self.params
    }

    /// Mutable access (to restore a checkpointed state or change a learning rate).
    pub fn params_mut(&mut self) -> &mut [AdamParam] {
        &mut self.params
    }

    /// Zeroes the gradients of every parameter (the next backward pass then sets them).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// One Adam update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<(), TchError> {
        let AdamConfig { beta1, beta2, eps, weight_decay } = self.config;
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let state = match &mut p.state {
                    Some(s) => s,
                    None => p.state.insert(AdamState {
                        step: 0,
                        exp_avg: p.tensor.f_zeros_like()?,
                        exp_avg_sq: p.tensor.f_zeros_like()?,
                    }),
                };
                state.step += 1;
                let grad = if weight_decay != 0.0 { grad.f_add(&p.tensor.f_mul_scalar(weight_decay)?)? } else { grad };
                let _ = state.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
                // addcmul_(grad, grad, value=v) computes self + (v * grad) * grad.
                let _ = state.exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = state.exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, &grad)?;
                let step = state.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = p.lr / bias_correction1;
                let bias_correction2_sqrt = bias_correction2.sqrt();
                let mut denom = state.exp_avg_sq.f_sqrt()?;
                let _ = denom.f_div_scalar_(bias_correction2_sqrt)?;
                let _ = denom.f_add_scalar_(eps)?;
                // addcdiv_(exp_avg, denom, value=-s) computes self + (-s * exp_avg) / denom.
                let _ = p.tensor.f_addcdiv_(&state.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Runs 3 Adam steps on `loss = sum(c * w^2) + sum(w)` from `w0` and returns `w` after each.
    fn run(lr: f64, weight_decay: f64) -> Vec<Vec<f32>> {
        let w = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).set_requires_grad(true);
        let c = Tensor::from_slice(&[0.5f32, 1.5, 2.0, 0.1]);
        let mut opt =
            Adam::new([("w".to_string(), w.shallow_clone(), lr)], AdamConfig { weight_decay, ..Default::default() });
        let mut out = Vec::new();
        for _ in 0..3 {
            opt.zero_grad();
            let loss = (&c * &w * &w).sum(Kind::Float) + w.sum(Kind::Float);
            loss.backward();
            opt.step().unwrap();
            out.push(Vec::<f32>::try_from(&w.detach()).unwrap());
        }
        out
    }

    // Produced once with the repository's venv (torch 2.11.0, CPU, float32):
    //   w = torch.tensor([1.0, -2.0, 0.5, 3.0], requires_grad=True)
    //   c = torch.tensor([0.5, 1.5, 2.0, 0.1])
    //   opt = torch.optim.Adam([w], lr=LR, weight_decay=WD, foreach=False)
    //   for _ in range(3):
    //       opt.zero_grad(); ((c*w*w).sum() + w.sum()).backward(); opt.step()
    //       print([float(x) for x in w.detach()])   # repr of the float32 values
    // The update is elementwise, so a per-parameter learning rate only changes LR.
    // LR = 0.1, WD = 0.0 (the digits are the exact float32 values, as Python printed them):
    #[allow(clippy::excessive_precision)]
    const TORCH_LR_0_1: [[f32; 4]; 3] = [
        [0.9000000357627869, -1.899999976158142, 0.4000000059604645, 2.9000000953674316],
        [0.8001665472984314, -1.8002089262008667, 0.30062559247016907, 2.800034761428833],
        [0.7006234526634216, -1.7007863521575928, 0.20245665311813354, 2.7001280784606934],
    ];
    // LR = 0.01, WD = 0.1:
    #[allow(clippy::excessive_precision)]
    const TORCH_LR_0_01_WD: [[f32; 4]; 3] = [
        [0.9900000095367432, -1.9900000095367432, 0.49000000953674316, 2.990000009536743],
        [0.9800013899803162, -1.9800015687942505, 0.4800037741661072, 2.9800004959106445],
        [0.9700051546096802, -1.9700058698654175, 0.4700138568878174, 2.970001697540283],
    ];

    fn assert_matches(got: &[Vec<f32>], want: &[[f32; 4]; 3]) {
        for (step, (g, w)) in got.iter().zip(want).enumerate() {
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                // Same operations in the same order: expect equality up to the last bit or so.
                assert!(
                    (a - b).abs() <= 2.0 * f32::EPSILON * b.abs().max(1.0),
                    "step {} element {i}: {a} vs torch {b}",
                    step + 1
                );
            }
        }
    }

    #[test]
    fn matches_torch_optim_adam() {
        assert_matches(&run(0.1, 0.0), &TORCH_LR_0_1);
    }

    #[test]
    fn matches_torch_optim_adam_with_weight_decay() {
        assert_matches(&run(0.01, 0.1), &TORCH_LR_0_01_WD);
    }

    #[test]
    fn first_step_moves_by_lr_and_skips_params_without_grad() {
        // After one step, exp_avg/bc1 = g and sqrt(exp_avg_sq/bc2) = |g|: every element moves by
        // lr * g / (|g| + eps) ~ lr * sign(g).
        let a = Tensor::from_slice(&[1.0f32, -1.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[5.0f32]).set_requires_grad(true);
        let mut opt = Adam::new(
            [("a".to_string(), a.shallow_clone(), 0.5), ("b".to_string(), b.shallow_clone(), 0.5)],
            AdamConfig::default(),
        );
        (&a * 3.0).sum(Kind::Float).backward();
        opt.step().unwrap();
        let got = Vec::<f32>::try_from(&a.detach()).unwrap();
        assert!((got[0] - 0.5).abs() < 1e-6 && (got[1] + 1.5).abs() < 1e-6, "{got:?}");
        assert_eq!(Vec::<f32>::try_from(&b.detach()).unwrap(), vec![5.0]);
        assert_eq!(opt.params()[0].state.as_ref().map(|s| s.step), Some(1));
        assert!(opt.params()[1].state.is_none());
        assert_eq!(opt.params()[0].state.as_ref().unwrap().exp_avg.device(), Device::Cpu);
    }
}
