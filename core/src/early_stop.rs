//! Early stopping: which trials stop before their last epoch, decided from the metrics the
//! sweep's trials reported — pure functions, the store carries them out when an epoch is
//! reported.
//!
//! Decisions are taken over **fine-tuning** epochs, counted from the first fine-tuning epoch of
//! each trial (`ft_epoch` 1, 2, …; the trial's epochs are still numbered over both phases, so
//! no counter restarts at the phase switch). Trials of one sweep are compared at the same
//! fine-tuning epoch, whatever their feature-extraction length.
//!
//! * **ASHA** (`strategy: asha`; Li et al., "A System for Massively Parallel Hyperparameter
//!   Tuning", MLSys 2020), in its asynchronous stopping form: rungs at fine-tuning epochs
//!   `min_epochs · etaᵏ` (k = 0, 1, …). A trial reaching a rung continues when its metric is
//!   in the top `1/eta` of the values the sweep's other trials recorded at that rung before it
//!   (the `(1 - 1/eta)` quantile, interpolated linearly), and stops otherwise; the first trial
//!   at a rung always continues.
//! * **Median** (`strategy: median`; the median stopping rule of Google Vizier, Golovin et al.,
//!   KDD 2017): from fine-tuning epoch `min_epochs` on, a trial stops when its metric is worse
//!   than the median of the other trials' values at the same fine-tuning epoch, once at least
//!   `min_trials` others have reported it.
//!
//! A trial's last epoch is never a decision point (it ends anyway). The order reports arrive in
//! matters (as in every asynchronous scheduler); the same order gives the same decisions.

/// The metric decisions compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Higher is better.
    ValAccuracy,
    /// Lower is better.
    ValLoss,
}

impl Metric {
    pub const ALL: [(&'static str, Metric); 2] = [("val_accuracy", Metric::ValAccuracy), ("val_loss", Metric::ValLoss)];

    pub fn name(self) -> &'static str {
        match self {
            Metric::ValAccuracy => "val_accuracy",
            Metric::ValLoss => "val_loss",
        }
    }

    /// The value as a score where higher is better.
    fn score(self, value: f64) -> f64 {
        match self {
            Metric::ValAccuracy => value,
            Metric::ValLoss => -value,
        }
    }

    fn show(self, value: f64) -> String {
        match self {
            Metric::ValAccuracy => format!("{:.1}%", value * 100.0),
            Metric::ValLoss => format!("{value:.4}"),
        }
    }
}

/// How trials are stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Rungs at `min_epochs · etaᵏ`; the top `1/eta` go on.
    Asha { eta: u32 },
    /// Worse than the median of at least `min_trials` others: stop.
    Median { min_trials: u32 },
}

/// A sweep's early-stopping setting (`early_stopping:` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EarlyStopping {
    pub strategy: Strategy,
    pub metric: Metric,
    /// The first fine-tuning epoch a decision is taken at (ASHA's smallest rung).
    pub min_epochs: u32,
}

impl EarlyStopping {
    /// Whether fine-tuning epoch `ft_epoch` of a trial with `ft_epochs` is a decision point.
    pub fn decides_at(&self, ft_epoch: u32, ft_epochs: u32) -> bool {
        if ft_epoch < self.min_epochs || ft_epoch >= ft_epochs {
            return false;
        }
        match self.strategy {
            Strategy::Median { .. } => true,
            Strategy::Asha { eta } => {
                let mut rung = u64::from(self.min_epochs);
                while rung < u64::from(ft_epoch) {
                    rung = rung.saturating_mul(u64::from(eta.max(2)));
                }
                rung == u64::from(ft_epoch)
            }
        }
    }

    /// The decision for a trial whose metric at fine-tuning epoch `ft_epoch` (of `ft_epochs`)
    /// is `value`, given the values `peers` the sweep's other trials recorded at that
    /// fine-tuning epoch: `Some(why)` to stop it, `None` to let it go on.
    pub fn decide(&self, ft_epoch: u32, ft_epochs: u32, value: f64, peers: &[f64]) -> Option<String> {
        if !self.decides_at(ft_epoch, ft_epochs) || !value.is_finite() {
            return None;
        }
        let mut scores: Vec<f64> =
            peers.iter().copied().filter(|v| v.is_finite()).map(|v| self.metric.score(v)).collect();
        scores.sort_by(f64::total_cmp);
        let score = self.metric.score(value);
        let shown = self.metric.show(value);
        let name = self.metric.name();
        match self.strategy {
            Strategy::Asha { eta } => {
                let cutoff = quantile(&scores, 1.0 - 1.0 / f64::from(eta.max(2)))?;
                (score < cutoff).then(|| {
                    format!(
                        "stopped by ASHA at fine-tuning epoch {ft_epoch}: {name} {shown} is below the top 1/{eta} \
                         of {} trials at this rung (cutoff {})",
                        scores.len(),
                        self.metric.show(self.metric.score(cutoff))
                    )
                })
            }
            Strategy::Median { min_trials } => {
                if scores.len() < min_trials.max(1) as usize {
                    return None;
                }
                let median = quantile(&scores, 0.5)?;
                (score < median).then(|| {
                    format!(
                        "stopped by the median rule at fine-tuning epoch {ft_epoch}: {name} {shown} is worse than \
                         the median {} of {} other trials",
                        self.metric.show(self.metric.score(median)),
                        scores.len()
                    )
                })
            }
        }
    }

    /// Its exact form in a store (`asha val_accuracy eta=3 min=1`); [`EarlyStopping::parse`]
    /// reads it back.
    pub fn canonical(&self) -> String {
        match self.strategy {
            Strategy::Asha { eta } => format!("asha {} eta={eta} min={}", self.metric.name(), self.min_epochs),
            Strategy::Median { min_trials } => {
                format!("median {} trials={min_trials} min={}", self.metric.name(), self.min_epochs)
            }
        }
    }

    /// Reads [`EarlyStopping::canonical`]'s form.
    pub fn parse(s: &str) -> Option<EarlyStopping> {
        let parts: Vec<&str> = s.split(' ').collect();
        let [strategy, metric, param, min] = parts.as_slice() else { return None };
        let metric = Metric::ALL.iter().find(|(n, _)| n == metric)?.1;
        let min_epochs: u32 = min.strip_prefix("min=")?.parse().ok().filter(|m| *m >= 1)?;
        let strategy = match *strategy {
            "asha" => Strategy::Asha { eta: param.strip_prefix("eta=")?.parse().ok().filter(|e| *e >= 2)? },
            "median" => {
                Strategy::Median { min_trials: param.strip_prefix("trials=")?.parse().ok().filter(|n| *n >= 1)? }
            }
            _ => return None,
        };
        Some(EarlyStopping { strategy, metric, min_epochs })
    }
}

/// The `q` quantile of sorted `v`, interpolated linearly between neighbours (numpy's default);
/// `None` for no values.
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    let last = v.len().checked_sub(1)?;
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (at - lo as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asha(eta: u32, min: u32) -> EarlyStopping {
        EarlyStopping { strategy: Strategy::Asha { eta }, metric: Metric::ValAccuracy, min_epochs: min }
    }

    #[test]
    fn asha_rungs_are_min_times_powers_of_eta_before_the_last_epoch() {
        let a = asha(3, 1);
        let rungs: Vec<u32> = (1..=30).filter(|&e| a.decides_at(e, 30)).collect();
        assert_eq!(rungs, vec![1, 3, 9, 27]);
        let b = asha(2, 2);
        assert_eq!((1..=16).filter(|&e| b.decides_at(e, 16)).collect::<Vec<_>>(), vec![2, 4, 8]);
        assert!(!a.decides_at(9, 9), "a trial's last epoch is no decision point");
    }

    /// Scripted arrivals at one rung, as the store sees them: each decision against the values
    /// recorded before it.
    #[test]
    fn asha_keeps_the_top_third_of_what_arrived_before() {
        let a = asha(3, 1);
        let mut recorded: Vec<f64> = Vec::new();
        let mut decisions = Vec::new();
        for v in [0.50, 0.40, 0.60, 0.55, 0.30, 0.58] {
            decisions.push(a.decide(1, 8, v, &recorded).is_none());
            recorded.push(v);
        }
        // 0.50 first: goes on. 0.40 vs [0.50]: cutoff 0.50, stops. 0.60 vs [0.40, 0.50]: cutoff
        // 0.4667, goes on. 0.55 vs [0.4, 0.5, 0.6]: cutoff 0.5333, goes on. 0.30 stops. 0.58 vs
        // [0.3, 0.4, 0.5, 0.55, 0.6]: cutoff 0.5333 (rank 2.67: 0.5 + 0.67 × 0.05), goes on.
        assert_eq!(decisions, vec![true, false, true, true, false, true]);
        let why = a.decide(1, 8, 0.40, &[0.50]).unwrap();
        assert!(why.contains("ASHA at fine-tuning epoch 1") && why.contains("val_accuracy 40.0%"), "{why}");
        assert!(why.contains("top 1/3 of 1 trials") && why.contains("cutoff 50.0%"), "{why}");
        // Not a rung: nothing is decided, whatever the values.
        assert_eq!(a.decide(2, 8, 0.0, &[0.9, 0.9]), None);
        // Ties go on (only strictly below the cutoff stops).
        assert_eq!(a.decide(3, 8, 0.5, &[0.5, 0.5]), None);
    }

    #[test]
    fn loss_is_better_lower() {
        let a = EarlyStopping { metric: Metric::ValLoss, ..asha(2, 1) };
        assert!(a.decide(1, 4, 2.0, &[1.0, 1.5]).is_some(), "a higher loss than the better half stops");
        assert!(a.decide(1, 4, 0.9, &[1.0, 1.5]).is_none());
        let why = a.decide(1, 4, 2.0, &[1.0]).unwrap();
        assert!(why.contains("val_loss 2.0000") && why.contains("cutoff 1.0000"), "{why}");
    }

    #[test]
    fn the_median_rule_waits_for_enough_trials_and_min_epochs() {
        let m =
            EarlyStopping { strategy: Strategy::Median { min_trials: 3 }, metric: Metric::ValAccuracy, min_epochs: 2 };
        assert_eq!(m.decide(1, 8, 0.1, &[0.5, 0.6, 0.7]), None, "before min_epochs");
        assert_eq!(m.decide(2, 8, 0.1, &[0.5, 0.6]), None, "too few others");
        let why = m.decide(2, 8, 0.1, &[0.5, 0.6, 0.7]).unwrap();
        assert!(why.contains("median 60.0% of 3 other trials"), "{why}");
        assert_eq!(m.decide(5, 8, 0.6, &[0.5, 0.6, 0.7]), None, "at the median goes on");
        assert_eq!(m.decide(8, 8, 0.0, &[0.5, 0.6, 0.7]), None, "the last epoch");
        assert_eq!(m.decide(3, 8, f64::NAN, &[0.5, 0.6, 0.7]), None, "no value, no decision");
    }

    #[test]
    fn the_stored_form_round_trips_and_refuses_garbage() {
        for e in [
            asha(3, 1),
            asha(4, 2),
            EarlyStopping { strategy: Strategy::Median { min_trials: 5 }, metric: Metric::ValLoss, min_epochs: 3 },
        ] {
            assert_eq!(EarlyStopping::parse(&e.canonical()), Some(e));
        }
        for bad in
            ["", "asha val_accuracy eta=1 min=1", "asha bogus eta=3 min=1", "median val_loss eta=3 min=1", "x y z w"]
        {
            assert_eq!(EarlyStopping::parse(bad), None, "{bad}");
        }
    }
}
