//! portwatch: reports every TCP listener and UDP bind on a Linux host, as it happens,
//! attributed to its process and classified by risk.
//!
//! One module per stage of an event's path, in the order the data takes:
//! [`kernel`] (load and attach the programs, decode their records) → [`attribution`]
//! (process, user, unit, container; the startup scan of /proc) → [`classify`]
//! (exposure, firewall verdict, risk, advice) → [`pipeline`] (the event loop that merges,
//! dedups and accounts) → [`output`] (the event, its renderings, the destinations).
//! [`time`] turns kernel timestamps into wall-clock time, [`metrics`] serves the agent's
//! own figures to Prometheus, [`inventory`] is `portwatch snapshot`, and [`cli`] and
//! [`config`] are the command line and its file form. See docs/ARCHITECTURE.md.

pub mod attribution;
pub mod classify;
pub mod cli;
pub mod config;
pub mod inventory;
pub mod kernel;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod socket;
pub mod time;
