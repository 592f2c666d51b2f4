//! `sweep-coordinator`: the coordinator — gRPC services, the durable store, auth, leases and
//! the HTTP endpoints. Builds and runs without Python, libtorch or a GPU, and without the CLI's
//! tables and figures (those are `sweep-cli`).
//!
//! * [`store`]: SQLite store (WAL); every acknowledged write is committed; the state
//!   directory's lock and checks.
//! * [`server`]: `SweepService` + `WorkerService` (plus `grpc.health.v1` and reflection), TLS,
//!   lease reaper, event fan-out; [`auth`]: bearer tokens with roles; [`http`]: `/metrics` and `/healthz` (axum), where pages go.
//! * [`history`]: checks a state database's history against the store's invariants
//!   (`sweep check-state`), and copies a live one (`sweep backup`).

pub mod auth;
pub mod clock;
pub mod history;
pub mod http;
pub mod server;
pub mod store;
