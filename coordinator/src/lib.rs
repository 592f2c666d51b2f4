//! `sweep-coordinator`: the coordinator — gRPC services, the durable store, auth, leases and
//! the HTTP endpoints. Builds and runs without Python, libtorch or a GPU, and without the CLI's
//! tables and figures (those are `sweep-cli`).
//!
//! * [`store`]: the store as a trait in domain terms (`sweep-core`'s records, states and
//!   [`store::StoreError`]); [`store::sqlite`] implements it (WAL; every acknowledged write is
//!   committed; group commit; the state directory's lock and checks).
//! * [`server`]: `SweepService` + `WorkerService` (plus `grpc.health.v1` and reflection), TLS,
//!   lease reaper, event fan-out; [`auth`]: bearer tokens with roles; [`http`]: `/metrics` and
//!   `/healthz` (axum), and [`dashboard`]: the web dashboard and its JSON API on the same port.
//! * [`history`]: checks a state's history against the store's invariants, from a snapshot read
//!   through [`store::StateReader`] (`sweep check-state`), and copies a live one (`sweep backup`).

pub mod auth;
pub mod clock;
pub mod dashboard;
pub mod history;
pub mod http;
pub mod server;
pub mod store;
