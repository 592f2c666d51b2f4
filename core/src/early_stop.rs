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
//!   Tuning", MLSys 2020), in the paper's promotion form: rungs at fine-tuning epochs
//!   `min_epochs · etaᵏ` (k = 0, 1, …). A trial reaching a rung **pauses** there; it is
//!   **promoted** (goes on to the next rung) as soon as its metric is among the best
//!   `⌊n / eta⌋` of the `n` trials that recorded that fine-tuning epoch so far, so the first
//!   trials at a rung wait until enough others have arrived. Once no other trial can still
//!   reach the rung (the rung is *closed*: every trial that could has recorded it, or ended),
//!   the best `max(1, ⌊n / eta⌋)` are promoted and the other paused trials are **stopped**
//!   ([`EarlyStopping::promote`]). The paper's rule for an endless stream of configurations
//!   never stops a trial; a grid is finite, so the close is where the bottom of a rung ends.
//! * **Median** (`strategy: median`; the median stopping rule of Google Vizier, Golovin et al.,
//!   KDD 2017): from fine-tuning epoch `min_epochs` on, a trial stops when its metric is worse
//!   than the median of the other trials' values at the same fine-tuning epoch, once at least
//!   `min_trials` others have reported it.
//!
//! A trial's last epoch is never a decision point (it ends anyway), but its value counts at a
//! rung like any other. The order reports arrive in matters (as in every asynchronous
//! scheduler); the same order gives the same decisions. Ties rank by grid index (the lower
//! first), and a value that is not a number ranks last.

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
    /// Rungs at `min_epochs · etaᵏ`; trials pause there, the top `1/eta` are promoted.
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

    /// Whether fine-tuning epoch `ft_epoch` is one of the rungs (`min_epochs · etaᵏ`), for some
    /// trial long enough; always false for the median rule, which has no rungs.
    pub fn is_rung(&self, ft_epoch: u32) -> bool {
        self.pauses() && self.decides_at(ft_epoch, u32::MAX)
    }

    /// Whether trials pause at decision points to be promoted or stopped later
    /// ([`EarlyStopping::promote`], ASHA) rather than being decided at once
    /// ([`EarlyStopping::decide`], the median rule).
    pub fn pauses(&self) -> bool {
        matches!(self.strategy, Strategy::Asha { .. })
    }

    /// The median rule's decision for a trial whose metric at fine-tuning epoch `ft_epoch` (of
    /// `ft_epochs`) is `value`, given the values `peers` the sweep's other trials recorded at
    /// that fine-tuning epoch: `Some(why)` to stop it, `None` to let it go on. Always `None`
    /// for ASHA, whose trials pause instead ([`EarlyStopping::promote`]).
    pub fn decide(&self, ft_epoch: u32, ft_epochs: u32, value: f64, peers: &[f64]) -> Option<String> {
        let Strategy::Median { min_trials } = self.strategy else { return None };
        if !self.decides_at(ft_epoch, ft_epochs) || !value.is_finite() {
            return None;
        }
        let mut scores: Vec<f64> =
            peers.iter().copied().filter(|v| v.is_finite()).map(|v| self.metric.score(v)).collect();
        if scores.len() < min_trials.max(1) as usize {
            return None;
        }
        scores.sort_by(f64::total_cmp);
        let score = self.metric.score(value);
        let median = quantile(&scores, 0.5)?;
        (score < median).then(|| {
            format!(
                "stopped by the median rule at fine-tuning epoch {ft_epoch}: {} {} is worse than the median {} of \
                 {} other trials",
                self.metric.name(),
                self.metric.show(value),
                self.metric.show(self.metric.score(median)),
                scores.len()
            )
        })
    }

    /// ASHA at the rung of fine-tuning epoch `ft_epoch`: `arrived` holds every trial that
    /// recorded that epoch (grid index, metric), `waiting` the trials paused there, and
    /// `closed` says no other trial can still reach it. Returns which waiting trials are
    /// promoted and which are stopped, each with why; the others go on waiting.
    pub fn promote(&self, ft_epoch: u32, arrived: &[(u32, f64)], waiting: &[u32], closed: bool) -> Verdicts {
        let mut out = Verdicts::default();
        let Strategy::Asha { eta } = self.strategy else { return out };
        let eta = eta.max(2);
        // Best first; a value that is no number ranks last; ties by grid index.
        let key = |v: f64| if v.is_finite() { self.metric.score(v) } else { f64::NEG_INFINITY };
        let mut ranked: Vec<(u32, f64)> = arrived.to_vec();
        ranked.sort_by(|a, b| key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0)));
        let n = ranked.len();
        let rank_of: std::collections::HashMap<u32, usize> =
            ranked.iter().enumerate().map(|(i, (t, _))| (*t, i)).collect();
        let top = if closed { (n / eta as usize).max(1) } else { n / eta as usize };
        let name = self.metric.name();
        for &trial in waiting {
            let Some(&rank) = rank_of.get(&trial) else { continue };
            let shown = self.metric.show(ranked[rank].1);
            let place = format!("{} of the {n} trials at this rung", ordinal(rank + 1));
            if rank < top {
                out.promoted.push((
                    trial,
                    format!(
                        "promoted by ASHA at fine-tuning epoch {ft_epoch}: {name} {shown} is {place}, in the top {top} \
                         (1/{eta})"
                    ),
                ));
            } else if closed {
                out.stopped.push((
                    trial,
                    format!(
                        "stopped by ASHA at fine-tuning epoch {ft_epoch}: {name} {shown} is {place}; the rung is \
                         closed and only the top {top} (1/{eta}) go on"
                    ),
                ));
            }
        }
        out
    }

    /// Why a trial that just reached a rung pauses there (while it is not promoted).
    pub fn pause_note(&self, ft_epoch: u32) -> String {
        let eta = match self.strategy {
            Strategy::Asha { eta } => eta.max(2),
            Strategy::Median { .. } => 2,
        };
        format!(
            "paused by ASHA at fine-tuning epoch {ft_epoch}: it goes on once its {} is in the top 1/{eta} of the \
             trials at this rung, and stops if it is not when the rung closes",
            self.metric.name()
        )
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

/// What ASHA does at one rung ([`EarlyStopping::promote`]): trials promoted and trials stopped,
/// by grid index, each with why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdicts {
    pub promoted: Vec<(u32, String)>,
    pub stopped: Vec<(u32, String)>,
}

/// `1st`, `2nd`, `3rd`, `4th`, … `11th`, `21st`.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
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

    fn promoted(v: &Verdicts) -> Vec<u32> {
        v.promoted.iter().map(|p| p.0).collect()
    }

    fn stopped(v: &Verdicts) -> Vec<u32> {
        v.stopped.iter().map(|p| p.0).collect()
    }

    /// Scripted arrivals at one rung, as the store sees them: after each arrival, every trial
    /// still waiting there is looked at again against everything recorded so far.
    #[test]
    fn asha_promotes_the_top_third_as_they_arrive_and_stops_the_rest_when_the_rung_closes() {
        let a = asha(3, 1);
        let mut arrived: Vec<(u32, f64)> = Vec::new();
        let mut waiting: Vec<u32> = Vec::new();
        let mut promotions = Vec::new();
        for (t, v) in [(0, 0.50), (1, 0.40), (2, 0.60), (3, 0.55), (4, 0.30), (5, 0.58), (6, 0.20)] {
            arrived.push((t, v));
            waiting.push(t);
            let verdicts = a.promote(1, &arrived, &waiting, false);
            assert!(verdicts.stopped.is_empty(), "nothing stops while the rung is open");
            waiting.retain(|w| !verdicts.promoted.iter().any(|p| p.0 == *w));
            promotions.push(promoted(&verdicts));
        }
        // 1 and 2 arrivals: ⌊n/3⌋ = 0, everyone waits. At 3 (0.5, 0.4, 0.6): t2 is the top 1.
        // At 4 and 5: the top 1 is still t2 (gone on). At 6: the top 2 are t2 and t5. At 7:
        // still t2 and t5.
        assert_eq!(promotions, vec![vec![], vec![], vec![2], vec![], vec![], vec![5], vec![]]);
        // The rung closes: the top ⌊7/3⌋ = 2 have gone on; every other waiting trial stops.
        let closing = a.promote(1, &arrived, &waiting, true);
        assert_eq!(promoted(&closing), Vec::<u32>::new());
        assert_eq!(stopped(&closing), vec![0, 1, 3, 4, 6]);
        let why = &closing.stopped[0].1;
        assert!(why.contains("ASHA at fine-tuning epoch 1") && why.contains("val_accuracy 50.0%"), "{why}");
        assert!(why.contains("4th of the 7 trials") && why.contains("top 2 (1/3)"), "{why}");
        let promoted_why = &a.promote(1, &arrived, &[2], false).promoted[0].1;
        assert!(promoted_why.contains("1st of the 7 trials at this rung, in the top 2"), "{promoted_why}");
        assert!(a.pause_note(1).contains("paused by ASHA at fine-tuning epoch 1"));
    }

    #[test]
    fn a_closed_rung_promotes_at_least_one_and_ties_go_to_the_lower_index() {
        let a = asha(3, 1);
        // Two trials (⌊2/3⌋ = 0): the best of them still goes on once the rung closes.
        let v = a.promote(1, &[(4, 0.5), (7, 0.6)], &[4, 7], true);
        assert_eq!((promoted(&v), stopped(&v)), (vec![7], vec![4]));
        // Equal values: the lower grid index ranks first.
        let v = a.promote(1, &[(9, 0.5), (3, 0.5), (5, 0.5)], &[9, 3, 5], false);
        assert_eq!(promoted(&v), vec![3]);
        // A value that is not a number ranks last.
        let v = a.promote(1, &[(0, f64::NAN), (1, 0.1), (2, 0.0)], &[0, 1, 2], true);
        assert_eq!((promoted(&v), stopped(&v)), (vec![1], vec![0, 2]));
        // A trial at the top that does not wait (it ended there, or went on) holds its place.
        let v = a.promote(1, &[(0, 0.9), (1, 0.5), (2, 0.4)], &[1, 2], true);
        assert_eq!((promoted(&v), stopped(&v)), (vec![], vec![1, 2]));
        // The median rule never pauses, and ASHA never decides at once.
        let m = EarlyStopping { strategy: Strategy::Median { min_trials: 1 }, ..a };
        assert!(!m.pauses() && a.pauses());
        assert_eq!(m.promote(1, &[(0, 0.9)], &[0], true), Verdicts::default());
        assert_eq!(a.decide(1, 8, 0.0, &[0.9, 0.9]), None);
    }

    #[test]
    fn ordinals_read_as_english() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111].into_iter().map(ordinal).collect();
        assert_eq!(got, ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]);
    }

    #[test]
    fn loss_is_better_lower() {
        let a = EarlyStopping { metric: Metric::ValLoss, ..asha(2, 1) };
        let v = a.promote(1, &[(0, 2.0), (1, 1.0), (2, 1.5), (3, 0.9)], &[0, 1, 2, 3], true);
        assert_eq!((promoted(&v), stopped(&v)), (vec![1, 3], vec![0, 2]));
        assert!(v.stopped[0].1.contains("val_loss 2.0000"), "{}", v.stopped[0].1);
        let m = EarlyStopping { strategy: Strategy::Median { min_trials: 1 }, ..a };
        assert!(m.decide(1, 4, 2.0, &[1.0, 1.5]).is_some(), "a higher loss than the median stops");
        assert!(m.decide(1, 4, 0.9, &[1.0, 1.5]).is_none());
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
