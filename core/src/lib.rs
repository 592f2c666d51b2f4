//! `sweep-core`: the pure logic of a transfer-learning sweep.
//!
//! Spec parsing and validation ([`spec`]), grid expansion ([`grid`]), the backbones' layer
//! groups ([`backbone`]), how epochs are cut into batches and replicas' parts ([`batching`]), learning-rate strategies ([`lr`]), scoring and ranking
//! ([`leaderboard`]), what runs next ([`schedule`]), which trials stop early ([`early_stop`]), lifecycle states ([`state`]), the stage tree of shared epochs ([`stages`]), the records the store keeps
//! ([`records`]) and text safe to print ([`text`]).
//!
//! **No IO, no async runtime, no libtorch**: everything here is a function of its inputs, so the
//! coordinator (which must run without libtorch) and the worker share one definition of a sweep.

pub mod backbone;
pub mod batching;
pub mod early_stop;
pub mod grid;
pub mod leaderboard;
pub mod lr;
pub mod records;
pub mod schedule;
pub mod spec;
pub mod stages;
pub mod state;
pub mod text;

pub use backbone::Backbone;
pub use grid::Trial;
pub use lr::LrDecay;
pub use spec::{SpecError, SweepSpec};
