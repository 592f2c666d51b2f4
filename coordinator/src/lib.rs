//! `sweep-coordinator`: the coordinator (gRPC services, scheduler, durable store) and the
//! `sweep` CLI. Builds and runs without Python, libtorch or a GPU.
//!
//! * [`store`]: SQLite store (WAL); every acknowledged write is committed.
//! * [`server`]: `SweepService` + `WorkerService` (plus `grpc.health.v1` and reflection), TLS,
//!   lease reaper, event fan-out; [`auth`]: bearer tokens with roles; [`metrics`]: `/metrics`.
//! * [`cli`], [`output`]: client commands and their table / JSON / CSV output; [`config`]: the
//!   config file; [`watch`]: following a sweep live; [`plot`]: the PNG figures.
//! * [`run`]: `sweep run`, a whole sweep on one machine.
//! * [`history`]: checks a state database's history against the store's invariants
//!   (`sweep check-state`).
//! * [`sim`]: simulated workers for load tests (`sweep simulate-workers`, `benches/load.rs`).

pub mod auth;
pub mod cli;
pub mod config;
pub mod history;
pub mod metrics;
pub mod output;
pub mod plot;
pub mod run;
pub mod server;
pub mod sim;
pub mod store;
pub mod watch;
