//! The kernel side, seen from the agent: the host's preconditions ([`host`]), the
//! running kernel's struct offsets ([`btf`]), loading and attaching a hook set
//! ([`probes`]), decoding the ring buffers' records ([`ring`]) and reading the kernel's
//! flood folds ([`folds`]).

pub mod btf;
pub mod folds;
pub mod host;
pub mod probes;
pub mod ring;
