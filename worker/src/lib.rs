//! `sweep-worker`: the libtorch side of a sweep.
//!
//! The training engine: backbones with torchvision's names ([`model`]), datasets decoded once
//! into an in-memory cache ([`data`]), batch-wise augmentation on the training device
//! ([`augment`]), torch.optim.Adam with a learning rate per parameter ([`adam`]), and the
//! trial loop — feature extraction, then fine-tuning with per-layer learning rates — that
//! reports metrics after every epoch ([`train`]), on one device or data-parallel over several
//! ([`dist`]: all-reduce over threads or NCCL; [`devices`]: device lists and the CUDA
//! inventory), checkpoints and resume points in an artifact store ([`artifacts`]: a local
//! directory or S3 through `object_store`). All randomness comes from seeded streams ([`rng`]), so a trial is reproducible
//! bit for bit on CPU.
//!
//! This is the only crate of the workspace that links libtorch.

pub mod adam;
pub mod alloc;
pub mod artifacts;
pub mod augment;
pub mod checkpoint;
pub mod daemon;
pub mod data;
pub mod devices;
pub mod dist;
pub mod mat;
pub mod metrics;
pub mod model;
pub mod pretrain;
pub mod resume;
pub mod rng;
pub mod tools;
pub mod train;
