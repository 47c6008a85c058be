//! Who owns a listener: /proc and the cgroup tree read defensively ([`procfs`]), a
//! kernel record turned into its owner with /proc's detail where /proc agrees
//! ([`enrich`]), and the startup scan of the listeners that already exist ([`scan`]).

pub mod enrich;
pub mod procfs;
pub mod scan;
