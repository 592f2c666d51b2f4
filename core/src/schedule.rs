//! What runs next: the scheduling policy as pure functions. The store reads the candidates inside
//! its transaction, asks [`next`], and carries the decision out in the same transaction.
//!
//! Today's policy: the oldest waiting sweep (by submission) whose next trial fits the worker's
//! free devices gets the worker; within a sweep, trials go in grid order; a trial holds the
//! first free devices, as many as `resources.gpus_per_trial`.

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
        .filter(|c| c.devices >= 1 && c.devices as usize <= free)
        .min_by_key(|c| (c.order, c.trial))
        .map(|c| Decision { sweep: c.sweep.clone(), trial: c.trial, devices: c.devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(sweep: &'static str, order: i64, trial: u32, devices: u32) -> Candidate<&'static str> {
        Candidate { sweep, order, trial, devices }
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
}
