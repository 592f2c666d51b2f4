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
//!
//! **Flat buffers** ([`Adam::flat`]; training uses them on CUDA devices, [`Adam::for_device`]).
//! Looping over a model's parameters costs about nine kernels per parameter (1,450 for
//! resnet50, each a launch on a GPU). [`Adam::flat`] instead
//! moves the parameters (`set_data`) into one contiguous buffer, gives their gradients and both
//! moments slots in three more, and after the first backward pass re-points each gradient at its
//! slot, so that autograd accumulates straight into the flat gradient buffer. A step then runs
//! the same operations once per run of consecutive parameters with the same learning rate (one
//! run during feature extraction, one per layer group during fine-tuning) and zeroing the
//! gradients is one kernel. Every operation is elementwise, so each element sees exactly the
//! arithmetic of the per-parameter loop: the result is bit-identical (tested, on odd sizes and
//! thread counts), and the state keeps its per-parameter form (views into the flat buffers), so
//! checkpoints and resume points are unchanged. When a step finds a parameter without a gradient
//! or parameters at different step counts, it takes the per-parameter loop for that step (and
//! says so once). A step updates the parameters through the flat buffer, so their own version
//! counters do not move: autograd's "modified by an in-place operation" check cannot see it —
//! harmless here, as no graph outlives the step that consumed it.

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

/// Elements after which a run of equal learning rates is cut (at a parameter's end).
const RUN_ELEMENTS: i64 = 16 << 20;

/// The flat buffers of [`Adam::flat`].
#[derive(Debug)]
struct Flat {
    params: Tensor,
    grads: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// `(offset, numel)` of each parameter's slot.
    slots: Vec<(i64, i64)>,
    /// `(first parameter, offset, numel)` of each run of consecutive parameters with the same
    /// learning rate.
    runs: Vec<(usize, i64, i64)>,
}

impl Flat {
    fn slot(buffer: &Tensor, (offset, numel): (i64, i64), shape: &[i64]) -> Result<Tensor, TchError> {
        buffer.f_narrow(0, offset, numel)?.f_view(shape)
    }
}

/// The optimiser.
#[derive(Debug)]
pub struct Adam {
    config: AdamConfig,
    params: Vec<AdamParam>,
    flat: Option<Flat>,
    /// The flat layout fell back to the loop once (told once).
    warned_loop: bool,
}

impl Adam {
    /// An optimiser over `(name, parameter, learning rate)` triples.
    pub fn new(params: impl IntoIterator<Item = (String, Tensor, f64)>, config: AdamConfig) -> Adam {
        let params = params
            .into_iter()
            .map(|(name, tensor, lr)| AdamParam { name, tensor: tensor.shallow_clone(), lr, state: None })
            .collect();
        Adam { config, params, flat: None, warned_loop: false }
    }

    /// An optimiser over the same triples whose parameters are moved into one flat buffer (see
    /// the module documentation); every handle on a parameter — the model's included — then
    /// reads and writes its slot. Parameters of different devices or types than float32 keep
    /// the per-parameter loop.
    pub fn flat(params: impl IntoIterator<Item = (String, Tensor, f64)>, config: AdamConfig) -> Result<Adam, TchError> {
        let mut adam = Adam::new(params, config);
        let Some(first) = adam.params.first() else { return Ok(adam) };
        let (device, kind) = (first.tensor.device(), first.tensor.kind());
        if kind != tch::Kind::Float
            || adam.params.iter().any(|p| p.tensor.device() != device || p.tensor.kind() != kind)
        {
            return Ok(adam);
        }
        let mut slots = Vec::with_capacity(adam.params.len());
        let mut total = 0i64;
        for p in &adam.params {
            let n = p.tensor.numel() as i64;
            slots.push((total, n));
            total += n;
        }
        let options = (kind, device);
        let flat = tch::no_grad(|| -> Result<Flat, TchError> {
            let params = Tensor::f_empty([total], options)?;
            for (p, &slot) in adam.params.iter_mut().zip(&slots) {
                let view = Flat::slot(&params, slot, &p.tensor.size())?;
                view.shallow_clone().f_copy_(&p.tensor)?;
                p.tensor.f_set_data(&view)?;
            }
            let mut runs: Vec<(usize, i64, i64)> = Vec::new();
            for (i, (p, &(offset, numel))) in adam.params.iter().zip(&slots).enumerate() {
                match runs.last_mut() {
                    // A run ends at a change of learning rate, or past RUN_ELEMENTS (the step's
                    // temporaries are the size of a run; the bits do not depend on the cut).
                    Some(run) if adam.params[run.0].lr.to_bits() == p.lr.to_bits() && run.2 < RUN_ELEMENTS => {
                        run.2 += numel;
                    }
                    _ => runs.push((i, offset, numel)),
                }
            }
            Ok(Flat {
                params,
                grads: Tensor::f_zeros([total], options)?,
                exp_avg: Tensor::f_zeros([total], options)?,
                exp_avg_sq: Tensor::f_zeros([total], options)?,
                slots,
                runs,
            })
        })?;
        adam.flat = Some(flat);
        Ok(adam)
    }

    /// The optimiser training uses: [`Adam::flat`] when the parameters are on a CUDA device,
    /// where each of the loop's ~9 kernels per parameter is a launch; [`Adam::new`] on the
    /// CPU, where the loop is faster (each parameter's tensors stay in the cache across its
    /// nine passes, where a run of a whole layer group streams from memory nine times:
    /// resnet50's step 36 ms against 47 ms flat, `docs/benchmarks.md`) — PyTorch, too, loops on
    /// the CPU and uses its multi-tensor path on CUDA only. Both give the same bits.
    pub fn for_device(
        params: impl IntoIterator<Item = (String, Tensor, f64)>,
        config: AdamConfig,
    ) -> Result<Adam, TchError> {
        let params: Vec<_> = params.into_iter().collect();
        if params.first().is_some_and(|(_, t, _)| t.device().is_cuda()) {
            Adam::flat(params, config)
        } else {
            Ok(Adam::new(params, config))
        }
    }

    /// True when the parameters live in flat buffers ([`Adam::flat`]).
    pub fn is_flat(&self) -> bool {
        self.flat.is_some()
    }

    /// Sets the state of parameter `index` (a checkpointed one): copied into its slot of the
    /// flat buffers, or into fresh tensors on the parameter's device.
    pub fn restore_state(
        &mut self,
        index: usize,
        step: u64,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
    ) -> Result<(), TchError> {
        let Some(p) = self.params.get_mut(index) else {
            return Err(TchError::Shape(format!("no parameter {index} in this optimizer")));
        };
        let shape = p.tensor.size();
        if exp_avg.size() != shape || exp_avg_sq.size() != shape {
            return Err(TchError::Shape(format!("optimizer state of `{}` does not fit the parameter", p.name)));
        }
        tch::no_grad(|| {
            let mut state = Self::fresh_state(self.flat.as_ref(), index, &p.tensor)?;
            state.step = step;
            state.exp_avg.f_copy_(exp_avg)?;
            state.exp_avg_sq.f_copy_(exp_avg_sq)?;
            p.state = Some(state);
            Ok(())
        })
    }

    /// The state of parameter `index` before its first step: zero moments, in its slots of the
    /// flat buffers or in fresh tensors on the parameter's device.
    fn fresh_state(flat: Option<&Flat>, index: usize, tensor: &Tensor) -> Result<AdamState, TchError> {
        let (exp_avg, exp_avg_sq) = match flat {
            Some(f) => {
                let shape = tensor.size();
                let mut a = Flat::slot(&f.exp_avg, f.slots[index], &shape)?;
                let mut b = Flat::slot(&f.exp_avg_sq, f.slots[index], &shape)?;
                let _ = a.f_zero_()?;
                let _ = b.f_zero_()?;
                (a, b)
            }
            None => (tensor.f_zeros_like()?, tensor.f_zeros_like()?),
        };
        Ok(AdamState { step: 0, exp_avg, exp_avg_sq })
    }

    /// torch.optim.Adam's update (`_single_tensor_adam`, no amsgrad) of `param` — one
    /// parameter, or a run of parameters in the flat buffers — after `step` steps, the moments
    /// already holding `step - 1`. Both layouts run this, so they give the same bits.
    #[allow(clippy::too_many_arguments)]
    fn update(
        config: &AdamConfig,
        param: &Tensor,
        grad: Tensor,
        exp_avg: &mut Tensor,
        exp_avg_sq: &mut Tensor,
        lr: f64,
        step: u64,
    ) -> Result<(), TchError> {
        let AdamConfig { beta1, beta2, eps, weight_decay } = *config;
        let grad = if weight_decay != 0.0 { grad.f_add(&param.f_mul_scalar(weight_decay)?)? } else { grad };
        let _ = exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
        // addcmul_(grad, grad, value=v) computes self + (v * grad) * grad.
        let _ = exp_avg_sq.f_mul_scalar_(beta2)?;
        let _ = exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, &grad)?;
        let step = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let step_size = lr / bias_correction1;
        let mut denom = exp_avg_sq.f_sqrt()?;
        let _ = denom.f_div_scalar_(bias_correction2.sqrt())?;
        let _ = denom.f_add_scalar_(eps)?;
        // addcdiv_(exp_avg, denom, value=-s) computes self + (-s * exp_avg) / denom.
        let _ = param.shallow_clone().f_addcdiv_(&exp_avg.f_mul_scalar(-step_size)?, &denom)?;
        Ok(())
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// The parameters, their learning rates and states, in construction order.
    pub fn params(&self) -> &[AdamParam] {
        &self.params
    }

    /// Zeroes the gradients of every parameter (the next backward pass then sets them): one
    /// kernel when every gradient is in the flat buffer.
    pub fn zero_grad(&mut self) {
        if let Some(f) = &mut self.flat
            && Self::grads_in_place(&self.params, f)
        {
            let _ = tch::no_grad(|| f.grads.f_zero_());
            return;
        }
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// True when every parameter's gradient is its slot of the flat gradient buffer.
    fn grads_in_place(params: &[AdamParam], f: &Flat) -> bool {
        params.iter().zip(&f.slots).all(|(p, &slot)| Self::grad_in_slot(&p.tensor.grad(), f, slot))
    }

    /// True when `grad` is the slot's view of the flat gradient buffer (an empty parameter's
    /// gradient always counts as in place: it has nothing to hold).
    fn grad_in_slot(grad: &Tensor, f: &Flat, (offset, numel): (i64, i64)) -> bool {
        let size = f.grads.kind().elt_size_in_bytes();
        grad.defined()
            && (numel == 0 || grad.data_ptr() as usize == f.grads.data_ptr() as usize + offset as usize * size)
    }

    /// Points every gradient at its slot of the flat gradient buffer (copying its value there),
    /// so that autograd accumulates into the buffer from now on. False when a parameter has no
    /// gradient.
    fn bind_grads(params: &[AdamParam], f: &Flat) -> Result<bool, TchError> {
        for (p, &slot) in params.iter().zip(&f.slots) {
            let mut g = p.tensor.grad();
            if !g.defined() {
                return Ok(false);
            }
            if !Self::grad_in_slot(&g, f, slot) {
                let view = Flat::slot(&f.grads, slot, &g.size())?;
                view.shallow_clone().f_copy_(&g)?;
                g.f_set_data(&view)?;
            }
        }
        Ok(true)
    }

    /// One Adam update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<(), TchError> {
        if let Some(f) = &self.flat {
            let step = self.params.first().map(|p| p.state.as_ref().map(|s| s.step));
            let same_step = self.params.iter().all(|p| Some(p.state.as_ref().map(|s| s.step)) == step);
            if same_step && tch::no_grad(|| Self::bind_grads(&self.params, f))? {
                return tch::no_grad(|| self.step_flat());
            }
            if !self.warned_loop {
                self.warned_loop = true;
                tracing::warn!(
                    "a parameter had no gradient (or the parameters' step counts differ): Adam steps one parameter at a time \
                     from now on (same result, more kernels)"
                );
            }
        }
        self.step_each()
    }

    /// [`Adam::step`] on the flat buffers, one run of equal learning rates at a time: every
    /// parameter has a gradient in its slot and all have taken the same number of steps.
    fn step_flat(&mut self) -> Result<(), TchError> {
        let Some(f) = &self.flat else { return Ok(()) };
        let mut step = 0;
        for (i, p) in self.params.iter_mut().enumerate() {
            if p.state.is_none() {
                p.state = Some(Self::fresh_state(Some(f), i, &p.tensor)?);
            }
            if let Some(s) = &mut p.state {
                s.step += 1;
                step = s.step;
            }
        }
        for &(first, offset, numel) in &f.runs {
            let param = f.params.f_narrow(0, offset, numel)?;
            let grad = f.grads.f_narrow(0, offset, numel)?;
            let mut exp_avg = f.exp_avg.f_narrow(0, offset, numel)?;
            let mut exp_avg_sq = f.exp_avg_sq.f_narrow(0, offset, numel)?;
            Self::update(&self.config, &param, grad, &mut exp_avg, &mut exp_avg_sq, self.params[first].lr, step)?;
        }
        Ok(())
    }

    /// [`Adam::step`], one parameter at a time.
    fn step_each(&mut self) -> Result<(), TchError> {
        let (config, flat) = (&self.config, &self.flat);
        tch::no_grad(|| {
            for (i, p) in self.params.iter_mut().enumerate() {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let state = match &mut p.state {
                    Some(s) => s,
                    None => p.state.insert(Self::fresh_state(flat.as_ref(), i, &p.tensor)?),
                };
                state.step += 1;
                Self::update(config, &p.tensor, grad, &mut state.exp_avg, &mut state.exp_avg_sq, p.lr, state.step)?;
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

    /// Parameters of odd sizes (vector tails everywhere) with runs of equal and different
    /// learning rates; `flat` selects the layout.
    fn odd_params() -> Vec<(String, Tensor, f64)> {
        let sizes: [&[i64]; 9] = [&[1], &[3], &[7, 1], &[17], &[3, 11], &[65], &[1000], &[7, 7, 83], &[70_001]];
        let lrs = [1e-3, 1e-3, 3e-4, 3e-4, 3e-4, 1e-4, 1e-4, 1e-3, 2e-5];
        sizes
            .iter()
            .zip(lrs)
            .enumerate()
            .map(|(i, (shape, lr))| {
                let t = Tensor::randn(*shape, (Kind::Float, Device::Cpu)) * (1.0 + i as f64);
                (format!("p{i}"), t.set_requires_grad(true), lr)
            })
            .collect()
    }

    fn clone_params(p: &[(String, Tensor, f64)]) -> Vec<(String, Tensor, f64)> {
        p.iter().map(|(n, t, lr)| (n.clone(), t.detach().copy().set_requires_grad(true), *lr)).collect()
    }

    /// `steps` steps of loss = Σ c·w² + Σ w over the parameters (gradients through autograd,
    /// so that the flat layout's accumulation is what is tested), skipping parameter `skip` in
    /// the loss of step `skip_at`.
    fn train(opt: &mut Adam, params: &[(String, Tensor, f64)], steps: usize, skip: Option<(usize, usize)>) {
        for step in 0..steps {
            opt.zero_grad();
            let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
            for (i, (_, w, _)) in params.iter().enumerate() {
                if skip == Some((i, step)) {
                    continue;
                }
                let c = 0.5 + 0.1 * i as f64;
                loss = loss + (w * w * c).sum(Kind::Float) + w.sum(Kind::Float);
            }
            loss.backward();
            opt.step().unwrap();
        }
    }

    fn assert_same(a: &Adam, b: &Adam, what: &str) {
        for (x, y) in a.params().iter().zip(b.params()) {
            assert!(x.tensor.equal(&y.tensor), "{what}: {} differs", x.name);
            match (&x.state, &y.state) {
                (Some(s), Some(t)) => {
                    assert_eq!(s.step, t.step, "{what}: {}", x.name);
                    assert!(s.exp_avg.equal(&t.exp_avg) && s.exp_avg_sq.equal(&t.exp_avg_sq), "{what}: {}", x.name);
                }
                (None, None) => {}
                _ => panic!("{what}: {} has state in one layout only", x.name),
            }
        }
    }

    #[test]
    fn flat_buffers_are_bit_identical_to_the_loop() {
        for threads in [1, 2] {
            tch::set_num_threads(threads);
            for weight_decay in [0.0, 0.01] {
                let config = AdamConfig { weight_decay, ..AdamConfig::default() };
                let p = odd_params();
                let q = clone_params(&p);
                let mut each = Adam::new(clone_params(&p), config);
                let each_params: Vec<_> =
                    each.params().iter().map(|x| (x.name.clone(), x.tensor.shallow_clone(), x.lr)).collect();
                let mut flat =
                    Adam::flat(q.iter().map(|(n, t, lr)| (n.clone(), t.shallow_clone(), *lr)), config).unwrap();
                assert!(flat.is_flat());
                assert_eq!(flat.flat.as_ref().unwrap().runs.len(), 5, "runs of equal learning rates");
                train(&mut each, &each_params, 6, None);
                train(&mut flat, &q, 6, None);
                assert!(Adam::grads_in_place(flat.params(), flat.flat.as_ref().unwrap()), "the flat step ran");
                assert_same(&each, &flat, &format!("{threads} thread(s), weight decay {weight_decay}"));
                // The caller's handles are the flat buffer's slots.
                for ((_, t, _), x) in q.iter().zip(flat.params()) {
                    assert!(t.equal(&x.tensor));
                }
            }
            // A parameter left out of the first step's loss: it has no gradient then, so that
            // step takes the loop, and its state starts a step later, as in PyTorch; the steps
            // counts then differ, and every later step takes the loop too.
            let p = odd_params();
            let q = clone_params(&p);
            let mut each = Adam::new(clone_params(&p), AdamConfig::default());
            let each_params: Vec<_> =
                each.params().iter().map(|x| (x.name.clone(), x.tensor.shallow_clone(), x.lr)).collect();
            let mut flat =
                Adam::flat(q.iter().map(|(n, t, lr)| (n.clone(), t.shallow_clone(), *lr)), AdamConfig::default())
                    .unwrap();
            train(&mut each, &each_params, 4, Some((3, 0)));
            train(&mut flat, &q, 4, Some((3, 0)));
            assert_same(&each, &flat, &format!("{threads} thread(s), a parameter without a gradient"));
            assert_eq!(flat.params()[3].state.as_ref().map(|s| s.step), Some(3));
        }
        tch::set_num_threads(1);
    }

    #[test]
    fn flat_buffers_take_gradients_in_place_and_zero_them_at_once() {
        let p = odd_params();
        let mut flat =
            Adam::flat(p.iter().map(|(n, t, lr)| (n.clone(), t.shallow_clone(), *lr)), AdamConfig::default()).unwrap();
        train(&mut flat, &p, 1, None);
        let f = flat.flat.as_ref().unwrap();
        assert!(Adam::grads_in_place(flat.params(), f), "after the first step every gradient is its slot");
        let before = f.grads.abs().sum(Kind::Float).double_value(&[]);
        assert!(before > 0.0);
        flat.zero_grad();
        let f = flat.flat.as_ref().unwrap();
        assert_eq!(f.grads.abs().sum(Kind::Float).double_value(&[]), 0.0);
        for (_, w, _) in &p {
            assert_eq!(w.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
        // The next backward pass accumulates into the buffer.
        train(&mut flat, &p, 1, None);
        assert!(Adam::grads_in_place(flat.params(), flat.flat.as_ref().unwrap()));
    }

    #[test]
    fn restored_state_goes_into_the_slots_and_training_goes_on_identically() {
        let p = odd_params();
        let mut reference = Adam::new(clone_params(&p), AdamConfig::default());
        let ref_params: Vec<_> =
            reference.params().iter().map(|x| (x.name.clone(), x.tensor.shallow_clone(), x.lr)).collect();
        train(&mut reference, &ref_params, 3, None);
        // A resume point: the reference's weights and state, restored into both layouts.
        let weights: Vec<_> =
            ref_params.iter().map(|(n, t, lr)| (n.clone(), t.detach().copy().set_requires_grad(true), *lr)).collect();
        let restore = |opt: &mut Adam| {
            for (i, x) in reference.params().iter().enumerate() {
                let s = x.state.as_ref().unwrap();
                opt.restore_state(i, s.step, &s.exp_avg, &s.exp_avg_sq).unwrap();
            }
        };
        let q = clone_params(&weights);
        let mut each = Adam::new(clone_params(&weights), AdamConfig::default());
        let each_params: Vec<_> =
            each.params().iter().map(|x| (x.name.clone(), x.tensor.shallow_clone(), x.lr)).collect();
        let mut flat =
            Adam::flat(q.iter().map(|(n, t, lr)| (n.clone(), t.shallow_clone(), *lr)), AdamConfig::default()).unwrap();
        restore(&mut each);
        restore(&mut flat);
        train(&mut each, &each_params, 2, None);
        train(&mut reference, &ref_params, 2, None);
        train(&mut flat, &q, 2, None);
        assert_same(&each, &flat, "restored");
        assert_same(&reference, &flat, "uninterrupted");
        let bad = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let e = flat.restore_state(0, 1, &bad, &bad).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(flat.restore_state(99, 1, &bad, &bad).is_err());
    }
}
