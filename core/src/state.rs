//! Lifecycle states of sweeps, trials and attempts, with their stable string forms (used in the
//! store, on the wire and in `--output json`).

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($s => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// A trial waits in the queue, runs on a worker, or has ended.
    TrialState {
        Pending => "pending",
        // No registered worker has enough devices for it; waits for one that has.
        Unschedulable => "unschedulable",
        Running => "running",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
        // Stopped early (`early_stopping`): its metrics so far are its result.
        Stopped => "stopped",
        // Waits at an ASHA rung (`early_stopping: { strategy: asha }`) until it is promoted
        // (then pending again, from its resume point at the rung) or stopped.
        Paused => "paused",
    }
}

impl TrialState {
    pub fn is_terminal(self) -> bool {
        matches!(self, TrialState::Completed | TrialState::Failed | TrialState::Cancelled | TrialState::Stopped)
    }
}

string_enum! {
    /// A sweep's state follows from its trials' states (see [`SweepState::of`]); unschedulable
    /// and paused trials count as waiting, trials stopped early as completed.
    SweepState {
        Pending => "pending",
        Running => "running",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

impl SweepState {
    /// The state of a sweep whose trials are in `states`: pending until a trial starts, running
    /// until every trial has ended, then completed (all completed), cancelled (any cancelled)
    /// or failed (any failed).
    pub fn of(states: impl IntoIterator<Item = TrialState>) -> SweepState {
        let mut n = [0u64; TrialState::ALL.len()];
        for s in states {
            n[s as usize] += 1;
        }
        SweepState::of_counts(n)
    }

    /// [`SweepState::of`] from the number of trials in each state, indexed as
    /// [`TrialState::ALL`].
    pub fn of_counts(n: [u64; TrialState::ALL.len()]) -> SweepState {
        let [waiting, unschedulable, running, completed, failed, cancelled, stopped, paused] = n;
        let completed = completed + stopped;
        let pending = waiting + unschedulable + paused;
        if running > 0 || (pending > 0 && completed + failed + cancelled > 0) {
            SweepState::Running
        } else if pending > 0 {
            SweepState::Pending
        } else if cancelled > 0 {
            SweepState::Cancelled
        } else if failed > 0 {
            SweepState::Failed
        } else {
            SweepState::Completed
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, SweepState::Completed | SweepState::Failed | SweepState::Cancelled)
    }
}

string_enum! {
    /// A registered worker: active (holds a lease), quarantined (keeps its lease, gets no
    /// trials: its attempts kept failing) or gone (its lease ended).
    WorkerState {
        Active => "active",
        Quarantined => "quarantined",
        Gone => "gone",
    }
}

string_enum! {
    /// One try at running a trial on a worker.
    AttemptState {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Lost => "lost",
        Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TrialState::*;

    #[test]
    fn sweep_state_follows_trials() {
        assert_eq!(SweepState::of([Pending, Pending]), SweepState::Pending);
        assert_eq!(SweepState::of([Pending, Running]), SweepState::Running);
        assert_eq!(SweepState::of([Pending, Completed]), SweepState::Running);
        assert_eq!(SweepState::of([Completed, Completed]), SweepState::Completed);
        assert_eq!(SweepState::of([Completed, Failed]), SweepState::Failed);
        assert_eq!(SweepState::of([Cancelled, Failed, Completed]), SweepState::Cancelled);
        assert_eq!(SweepState::of([Unschedulable, Pending]), SweepState::Pending);
        assert_eq!(SweepState::of([Unschedulable, Completed]), SweepState::Running);
        assert!(!Unschedulable.is_terminal());
        assert_eq!(SweepState::of([Paused, Stopped]), SweepState::Running);
        assert_eq!(SweepState::of([Paused, Paused]), SweepState::Pending);
        assert!(!Paused.is_terminal());
    }

    #[test]
    fn string_forms_round_trip() {
        for s in TrialState::ALL {
            assert_eq!(TrialState::parse(s.as_str()), Some(*s));
        }
        for s in AttemptState::ALL {
            assert_eq!(AttemptState::parse(s.as_str()), Some(*s));
        }
        assert_eq!(SweepState::parse("bogus"), None);
    }
}
