//! What runs next: the scheduling policy as pure functions. The store reads the candidates inside
//! its transaction, asks [`next`], and carries the decision out in the same transaction.
//!
//! The policy: the oldest waiting sweep (by submission) whose next trial fits the worker's free
//! devices gets the worker; a trial holds the first free devices, as many as
//! `resources.gpus_per_trial`. Within a sweep without shared stages, trials go in grid order.
//! Within a sweep with a stage tree ([`ready`]), a trial runs the epochs no running trial is
//! computing for it: the one trial that runs a stage is the one with the longest chain after
//! it (it goes on down the critical path in the same attempt; the other branches start from
//! the stage's end state when it is stored), and among the ready trials the longest remaining
//! chain goes first, then grid order.

use crate::stages::StageTree;

/// A sweep with a trial waiting for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<Id> {
    pub sweep: Id,
    /// Submission order (smaller: submitted earlier).
    pub order: i64,
    /// The sweep's next waiting trial (its grid index).
    pub trial: u32,
    /// Devices one trial of the sweep holds.
    pub devices: u32,
    /// Epochs left on the longest chain that starts where this trial would start (its
    /// critical path): a longer one goes first within a sweep.
    pub remaining: u32,
}

impl<Id> Candidate<Id> {
    /// Whether its trial fits `free` free devices (a trial that says it needs none is never
    /// placed).
    pub fn fits(&self, free: usize) -> bool {
        self.devices >= 1 && self.devices as usize <= free
    }
}

/// What the worker runs next: a trial, on the first `devices` of its free devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<Id> {
    pub sweep: Id,
    pub trial: u32,
    pub devices: u32,
}

/// The next trial for a worker with `free` free devices, if any fits.
pub fn next<Id: Clone>(candidates: &[Candidate<Id>], free: usize) -> Option<Decision<Id>> {
    candidates
        .iter()
        .filter(|c| c.fits(free))
        .min_by_key(|c| (c.order, std::cmp::Reverse(c.remaining), c.trial))
        .map(|c| Decision { sweep: c.sweep.clone(), trial: c.trial, devices: c.devices })
}

/// Where one trial of a sweep with a stage tree stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub state: Standing,
    /// Its epochs `1..=stored` are stored (its own or computed for it by a trial it shares
    /// them with).
    pub stored: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Pending: it may be handed out.
    Waiting,
    /// An attempt of it runs.
    Running,
    /// Ended, or waiting for something other than a worker (unschedulable): it runs nothing.
    Idle,
}

/// The trials of a sweep with a stage tree that may be handed out now, with the epochs left on
/// the longest chain from where each starts: a waiting trial whose next epoch (after
/// `stored`) is
/// - not being computed for it: no running trial that shares that epoch with it has stored
///   less than it has (such a trial reports that epoch, and the store credits it to every
///   waiting trial that shares it);
/// - and not another's to run: among the waiting trials that share that epoch and stand at the
///   same point, it has the longest chain (the most epochs), then the most feature-extraction
///   epochs, then the lowest grid index ([`StageTree::runner_among`]).
///
/// So a stage is run once, by the trial on its critical path; a trial whose runner ends
/// (fails, is stopped early) is taken over by the next trial of the stage, from the stage's
/// newest stored epoch. `progress` is indexed by grid index, as `tree.trials`.
pub fn ready(tree: &StageTree, progress: &[Progress]) -> Vec<(u32, u32)> {
    let epochs = |t: usize| tree.trials.get(t).map_or(0, |x| x.epochs());
    // The waiting trials by where they stand: the stage of their next epoch and the epochs
    // stored. Trials standing at the same point share that epoch, and one of them runs it (so
    // a stage of n trials costs O(n), not O(n²)).
    let mut points: std::collections::BTreeMap<(usize, u32), Vec<usize>> = std::collections::BTreeMap::new();
    for (t, p) in progress.iter().enumerate() {
        if p.state != Standing::Waiting || p.stored >= epochs(t) {
            continue;
        }
        if let Some(stage) = tree.stage_at(t, p.stored + 1) {
            points.entry((stage.index, p.stored)).or_default().push(t);
        }
    }
    let mut out = Vec::new();
    for ((stage, stored), waiting) in points {
        let covered = tree.stages[stage]
            .trials
            .iter()
            .any(|&u| progress.get(u).is_some_and(|q| q.state == Standing::Running && q.stored <= stored));
        if covered {
            continue;
        }
        // The runner: the longest chain, then the most feature-extraction epochs, then the
        // lowest grid index; it serves the chains of every trial waiting here (its reports are
        // credited to them).
        let Some(runner) = tree.runner_among(&waiting) else { continue };
        out.push((runner as u32, epochs(runner).saturating_sub(stored)));
    }
    out.sort_by_key(|&(t, _)| t);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(sweep: &'static str, order: i64, trial: u32, devices: u32) -> Candidate<&'static str> {
        Candidate { sweep, order, trial, devices, remaining: 1 }
    }

    #[test]
    fn the_oldest_sweep_whose_next_trial_fits_goes_first() {
        let waiting = [c("new", 3, 0, 1), c("old", 1, 5, 1), c("middle", 2, 0, 1)];
        assert_eq!(next(&waiting, 1), Some(Decision { sweep: "old", trial: 5, devices: 1 }));
        // A sweep whose trials need more devices than are free is passed over, not waited for.
        let waiting = [c("big", 1, 0, 4), c("small", 2, 3, 2)];
        assert_eq!(next(&waiting, 2), Some(Decision { sweep: "small", trial: 3, devices: 2 }));
        assert_eq!(next(&waiting, 4), Some(Decision { sweep: "big", trial: 0, devices: 4 }));
        assert_eq!(next(&waiting, 1), None);
        assert_eq!(next(&waiting, 0), None);
        assert_eq!(next::<&str>(&[], 8), None);
        // A sweep that says it needs no device takes none (it cannot be placed).
        assert_eq!(next(&[c("zero", 1, 0, 0)], 8), None);
    }

    #[test]
    fn within_a_sweep_the_longest_remaining_chain_goes_first() {
        let mut a = c("s", 1, 0, 1);
        let mut b = c("s", 1, 3, 1);
        (a.remaining, b.remaining) = (4, 9);
        assert_eq!(next(&[a.clone(), b.clone()], 1).unwrap().trial, 3);
        b.remaining = 4;
        assert_eq!(next(&[a, b], 1).unwrap().trial, 0, "then grid order");
    }

    fn tree() -> StageTree {
        // resnet18 × {linear, exponential} × {[2, 3], [2, 5], [4, 1]}: t000 linear [2,3], t001
        // linear [2,5], t002 linear [4,1], t003–t005 the same with exponential. FE 1–2 shared by
        // all six; FE 3–4 by t002 and t005; FT 3–5 by t000 and t001 (linear), t003 and t004.
        let spec = crate::spec::parse(
            "name: s\ndataset: { kind: synthetic, classes: 3 }\ngrid:\n  backbone: [resnet18]\n  \
             lr_decay: [{ strategy: linear }, { strategy: exponential }]\n  epoch_split: [[2, 3], [2, 5], [4, 1]]\n",
        )
        .unwrap();
        StageTree::build(&spec, true)
    }

    fn waiting(stored: u32) -> Progress {
        Progress { state: Standing::Waiting, stored }
    }

    #[test]
    fn among_equal_chains_the_runner_has_the_most_feature_extraction() {
        // [1, 3], [3, 1], [2, 2]: all 4 epochs. t001 ([3, 1]) runs epoch 1 and goes on through
        // FE 2 and 3 in the same attempt (one feature cache for all three); the lower grid
        // index, t000, would have turned to fine-tuning after epoch 1.
        let spec = crate::spec::parse(
            "name: s\ndataset: { kind: synthetic, classes: 3 }\ngrid:\n  backbone: [resnet18]\n  \
             lr_decay: [{ strategy: linear }]\n  epoch_split: [[1, 3], [3, 1], [2, 2]]\n",
        )
        .unwrap();
        let t = StageTree::build(&spec, true);
        assert_eq!(ready(&t, &[waiting(0); 3]), vec![(1, 4)]);
        let at = |trial, epoch| t.stage_at(trial, epoch).unwrap().index;
        assert_eq!(t.runner(at(0, 1)), Some(1));
        assert!(t.continues_parent(at(1, 2)), "FE 2 in the same attempt");
        // Epoch 1 stored, t001 running on: t000 takes up its own fine-tuning from there; t002's
        // FE 2 is t001's to compute.
        let mut p = [waiting(1); 3];
        p[1] = Progress { state: Standing::Running, stored: 1 };
        assert_eq!(ready(&t, &p), vec![(0, 3)]);
    }

    #[test]
    fn a_stage_is_run_once_by_the_trial_on_its_critical_path() {
        let t = tree();
        // Nothing ran: one trial starts the shared feature extraction, the longest (t001: 7
        // epochs; t004 has as many, t001 comes first in the grid).
        assert_eq!(ready(&t, &[waiting(0); 6]), vec![(1, 7)]);
        // While t001 runs epochs 1–2 (epoch 1 stored, for all six), nobody else may start them.
        let mut p = [waiting(1); 6];
        p[1] = Progress { state: Standing::Running, stored: 1 };
        assert_eq!(ready(&t, &p), vec![]);
        // t001 stored epoch 2 (credited to the five others) and goes on with FT 3–5 (linear),
        // shared with t000: t000 waits for it. FT exponential (t004 runs it, t003 waits) and FE
        // 3–4 (t002 and t005 tie on 4 epochs: t002) start from the end of epoch 2.
        let mut p = [waiting(2); 6];
        p[1] = Progress { state: Standing::Running, stored: 2 };
        assert_eq!(ready(&t, &p), vec![(2, 3), (4, 5)]);
        // The same runners, read off the tree alone (`StageTree::runner`, what `sweep plan`
        // prices attempts by): t001 runs the root and continues into FT linear 3–5.
        let at = |trial, epoch| t.stage_at(trial, epoch).unwrap().index;
        assert_eq!([at(0, 1), at(2, 3), at(4, 3)].map(|s| t.runner(s)), [Some(1), Some(2), Some(4)]);
        assert!(t.continues_parent(at(1, 3)));
        assert!(!t.continues_parent(at(2, 3)) && !t.continues_parent(at(4, 3)) && !t.continues_parent(at(0, 1)));
        // t001 failed after epoch 3 (stored for t000 too) and waits again: it runs on, since it
        // has the longest chain; were it over (failed for good), t000 would take over from 3.
        let mut p = [waiting(2); 6];
        (p[0], p[1]) = (waiting(3), waiting(3));
        assert!(ready(&t, &p).contains(&(1, 4)));
        assert!(!ready(&t, &p).iter().any(|(i, _)| *i == 0));
        p[1] = Progress { state: Standing::Idle, stored: 3 };
        assert!(ready(&t, &p).contains(&(0, 2)));
        // A trial behind a running one (its own attempt failed before the runner passed it)
        // runs what it lacks itself: the runner will not report those epochs again.
        let mut p = [waiting(2); 6];
        p[1] = Progress { state: Standing::Running, stored: 4 };
        p[0] = waiting(2);
        assert!(ready(&t, &p).contains(&(0, 3)));
        // Every epoch stored, or not waiting: nothing to run.
        let done: Vec<Progress> =
            t.trials.iter().map(|x| Progress { state: Standing::Idle, stored: x.epochs() }).collect();
        assert_eq!(ready(&t, &done), vec![]);
    }
}
