//! Everything that leaves the agent: the event ([`event`]) and its renderings (ECS JSON
//! in [`json`], OCSF in [`ocsf`], syslog headers in [`syslog`], the text line in
//! [`sinks`]), and the destinations ([`sinks`]) with their disk spool ([`spool`]), TLS
//! ([`tls`]) and RELP ([`relp`]).

pub mod event;
pub mod json;
pub mod ocsf;
pub mod relp;
pub mod sinks;
pub mod spool;
pub mod syslog;
pub mod tls;
