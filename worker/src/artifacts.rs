//! The artifact store lives in its own crate, `sweep-artifacts` (`sweep gc` uses it too).

pub use sweep_artifacts::*;
