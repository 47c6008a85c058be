//! The running sensor: the event loop that drains the rings, merges the startup scan
//! with the live stream, accounts for losses and drives the outputs ([`agent`]), and the
//! service manager's readiness and watchdog protocol ([`notify`]).

pub mod agent;
pub mod assess;
pub mod core;
pub mod events;
pub mod notify;
