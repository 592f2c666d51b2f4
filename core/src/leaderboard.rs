//! Scoring and ranking of trials from their per-epoch metrics.
//!
//! * `fe_val_accuracy`: validation accuracy after the last feature-extraction epoch;
//! * `best_val_accuracy` / `best_epoch`: the best validation accuracy during fine-tuning and the
//!   (1-based, global) epoch where it was reached — the recipe's Figure 6.
//!
//! Trials rank by best fine-tuning accuracy, then by feature-extraction accuracy, then by their
//! position in the grid; a trial without a score ranks after every trial with one.

use std::cmp::Ordering;

/// The two phases of a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    FeatureExtraction,
    FineTuning,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::FeatureExtraction => "feature_extraction",
            Phase::FineTuning => "fine_tuning",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "feature_extraction" => Some(Phase::FeatureExtraction),
            "fine_tuning" => Some(Phase::FineTuning),
            _ => None,
        }
    }

    /// The phase of global epoch `epoch` (1-based) of a trial with `fe_epochs` feature-extraction
    /// epochs.
    pub fn of_epoch(epoch: u32, fe_epochs: u32) -> Phase {
        if epoch <= fe_epochs { Phase::FeatureExtraction } else { Phase::FineTuning }
    }
}

/// What a worker reports after one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochMetrics {
    /// 1-based, counted over both phases.
    pub epoch: u32,
    pub phase: Phase,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
    /// Wall-clock seconds of the epoch (training and validation).
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Score {
    pub fe_val_accuracy: Option<f64>,
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<u32>,
}

/// Scores a trial from its metrics (any order; one row per epoch).
pub fn score(fe_epochs: u32, metrics: &[EpochMetrics]) -> Score {
    let mut s = Score::default();
    for m in metrics {
        if m.epoch == fe_epochs {
            s.fe_val_accuracy = Some(m.val_accuracy);
        }
        if m.phase == Phase::FineTuning {
            let better = match (s.best_val_accuracy, s.best_epoch) {
                (Some(best), Some(at)) => m.val_accuracy > best || (m.val_accuracy == best && m.epoch < at),
                _ => true,
            };
            if better {
                s.best_val_accuracy = Some(m.val_accuracy);
                s.best_epoch = Some(m.epoch);
            }
        }
    }
    s
}

/// A trial as the leaderboard orders it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked<'a> {
    pub score: &'a Score,
    /// Stopped early: its best is a partial run's, so it ranks after the trials that were not
    /// stopped (but before those without any score).
    pub stopped: bool,
    /// Its index in the grid (the last tie-break).
    pub index: usize,
}

/// Orders two trials for the leaderboard: best first. Trials with a score come before those
/// without; among them, those not stopped early before stopped ones; then by [`compare`].
pub fn rank(a: Ranked<'_>, b: Ranked<'_>) -> Ordering {
    let scored = |r: &Ranked<'_>| r.score.best_val_accuracy.is_some() || r.score.fe_val_accuracy.is_some();
    scored(&b)
        .cmp(&scored(&a))
        .then_with(|| a.stopped.cmp(&b.stopped))
        .then_with(|| compare(a.score, a.index, b.score, b.index))
}

/// Orders two trials by their scores alone: best first.
pub fn compare(a: &Score, a_index: usize, b: &Score, b_index: usize) -> Ordering {
    fn desc(a: Option<f64>, b: Option<f64>) -> Ordering {
        match (a, b) {
            (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    }
    desc(a.best_val_accuracy, b.best_val_accuracy)
        .then_with(|| desc(a.fe_val_accuracy, b.fe_val_accuracy))
        .then_with(|| a_index.cmp(&b_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(epoch: u32, fe: u32, acc: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            phase: Phase::of_epoch(epoch, fe),
            train_loss: 1.0,
            train_accuracy: 0.5,
            val_loss: 1.0,
            val_accuracy: acc,
            seconds: 1.0,
        }
    }

    #[test]
    fn scores_feature_extraction_end_and_best_fine_tuning_epoch() {
        let metrics = [m(1, 2, 0.3), m(2, 2, 0.5), m(3, 2, 0.7), m(4, 2, 0.9), m(5, 2, 0.9), m(6, 2, 0.8)];
        let s = score(2, &metrics);
        assert_eq!(s.fe_val_accuracy, Some(0.5));
        assert_eq!(s.best_val_accuracy, Some(0.9));
        assert_eq!(s.best_epoch, Some(4), "ties go to the earlier epoch");
    }

    #[test]
    fn unfinished_trials_have_partial_scores() {
        let s = score(3, &[m(1, 3, 0.2)]);
        assert_eq!(s, Score::default());
    }

    #[test]
    fn ranking_is_best_first_then_fe_then_grid_order() {
        let a = Score { fe_val_accuracy: Some(0.5), best_val_accuracy: Some(0.9), best_epoch: Some(3) };
        let b = Score { fe_val_accuracy: Some(0.6), best_val_accuracy: Some(0.9), best_epoch: Some(3) };
        let c = Score::default();
        assert_eq!(compare(&a, 0, &b, 1), Ordering::Greater);
        assert_eq!(compare(&b, 1, &c, 2), Ordering::Less);
        assert_eq!(compare(&c, 2, &c, 3), Ordering::Less);
        let mut v = [(c, 0), (a, 1), (b, 2)];
        v.sort_by(|x, y| compare(&x.0, x.1, &y.0, y.1));
        assert_eq!(v.iter().map(|x| x.1).collect::<Vec<_>>(), vec![2, 1, 0]);
    }

    #[test]
    fn stopped_trials_rank_after_the_others_with_a_score_and_before_those_without() {
        let best = Score { fe_val_accuracy: Some(0.5), best_val_accuracy: Some(0.9), best_epoch: Some(4) };
        let good = Score { fe_val_accuracy: Some(0.5), best_val_accuracy: Some(0.7), best_epoch: Some(4) };
        let none = Score::default();
        let mut v = [
            Ranked { score: &best, stopped: true, index: 0 },
            Ranked { score: &none, stopped: false, index: 1 },
            Ranked { score: &good, stopped: false, index: 2 },
            Ranked { score: &good, stopped: true, index: 3 },
        ];
        v.sort_by(|a, b| rank(*a, *b));
        assert_eq!(v.iter().map(|r| r.index).collect::<Vec<_>>(), vec![2, 0, 3, 1]);
    }
}
