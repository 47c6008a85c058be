//! portwatch: reports every TCP listener and UDP bind on a Linux host, as it happens,
//! attributed to its process and classified by risk.
//!
//! One module per stage of an event's path: [`probes`] (load/attach) → [`ring`] (decode
//! kernel records) → [`enrich`] (process, user, unit, container) → [`emit`] (JSON or
//! text); [`snapshot`] reads what already listens, [`agent`] runs the whole stream.
//! [`metrics`] serves the agent's own figures to Prometheus (`--metrics ADDR`).

pub mod agent;
pub mod btf;
pub mod classify;
pub mod cli;
pub mod config;
pub mod emit;
pub mod enrich;
pub mod event;
pub mod firewall;
pub mod folds;
pub mod json;
pub mod metrics;
pub mod notify;
pub mod ocsf;
pub mod probes;
pub mod procfs;
pub mod relp;
pub mod report;
pub mod ring;
pub mod risk;
pub mod snapshot;
pub mod spool;
pub mod sys;
pub mod syslog;
pub mod tls;
