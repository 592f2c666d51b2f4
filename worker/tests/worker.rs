//! The worker's integration tests, in one binary (libtorch is linked once): training, data,
//! resume points, data parallelism, parity with torchvision, the tools.

mod attempt;
mod common;
mod data;
mod data_parallel;
mod dist;
mod flowers;
mod parity;
mod pretrain;
mod resume;
mod stages;
mod tools;
mod trainer;
