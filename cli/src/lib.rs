//! `sweep-cli`: the client side of `sweep` — commands against a coordinator and what they
//! print (tables, JSON, CSV), following a sweep live, the PNG figures, the config file, and the
//! simulated workers of load tests. No SQLite and no server here: the `sweep` binary (package
//! `sweep`) brings this and `sweep-coordinator` together.
//!
//! * [`client`]: a connected client and the commands; [`output`]: tables, stable JSON and CSV;
//!   [`config`]: the config file; [`watch`]: following a sweep live; [`plot`]: the PNG figures;
//!   [`plan`]: `sweep plan`, the stage tree and the epochs sharing saves, offline.
//! * [`sim`]: simulated workers for load tests (`sweep simulate-workers`, the `load` bench).

pub mod client;
pub mod config;
pub mod gc;
pub mod output;
pub mod plan;
pub mod plot;
pub mod sim;
pub mod watch;
