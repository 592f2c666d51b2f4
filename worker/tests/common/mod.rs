//! Helpers shared by the worker's integration tests.

#![allow(dead_code)]

use sweep_core::{grid, spec};
use sweep_proto::v1;

/// The assignment of trial 0 of `spec_yaml`, as a coordinator would hand it out, on `cpu:0`.
pub fn assignment(spec_yaml: &str, sweep_id: &str, attempt_id: u64) -> v1::Assignment {
    let parsed = spec::parse(spec_yaml).expect("test spec parses");
    let t = grid::expand(&parsed.grid).remove(0);
    v1::Assignment {
        attempt_id,
        sweep_id: sweep_id.into(),
        trial_id: t.id.clone(),
        trial_index: 0,
        spec_yaml: spec_yaml.into(),
        backbone: t.backbone.name().into(),
        lr_decay: Some(v1::LrDecay::from(&t.lr_decay)),
        fe_epochs: t.fe_epochs,
        ft_epochs: t.ft_epochs,
        attempt_number: 1,
        devices: vec!["cpu:0".into()],
        resume: None,
    }
}
