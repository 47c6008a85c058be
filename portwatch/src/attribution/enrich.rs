//! Attribution: who owns a listener. Live events carry what the kernel captured (pid,
//! parent, comm, uid, cgroup id, task start time); /proc adds executable, command line
//! and the cgroup path, but only after checking that the pid still names the same task
//! (same start time), so pid reuse can never attribute a listener to the wrong program.
//!
//! Caches are bounded by entries and by bytes: [`PROC_CACHE_MAX`] processes in
//! [`PROC_CACHE_BYTES`], [`CGROUP_CACHE_MAX`] cgroups in [`CGROUP_CACHE_BYTES`]; when
//! one is full it is cleared (refilling costs a few /proc reads per process). What a
//! process puts in an entry is bounded too: its command line is cut to
//! [`procfs::ARGV_EVENT_BUDGET`]. Processes that have exited are dropped from the cache
//! (checked at most every [`PRUNE_INTERVAL`]): the end of a listener reuses the owner
//! the agent kept with the open listener, not this cache.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    attribution::procfs::{self, CgroupInfo, CgroupResolver, Users},
    kernel::ring::Record,
    output::event::{
        ArgvCut, AttributionChanged, Cgroup, Container, Named, Parent, Process, Shared, Systemd,
        shared,
    },
    time::Clocks,
};

pub const PROC_CACHE_MAX: usize = 8192;
pub const CGROUP_CACHE_MAX: usize = 4096;
/// Estimated bytes of cached processes at most (strings and their rendered JSON).
pub const PROC_CACHE_BYTES: usize = 8 << 20;
/// Estimated bytes of cached cgroups at most.
pub const CGROUP_CACHE_BYTES: usize = 2 << 20;
/// Shortest time between two sweeps of the process cache for exited processes.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
/// Bookkeeping bytes counted per cache entry on top of its strings.
const ENTRY_OVERHEAD: usize = 256;
/// Distinct uids (and gids) kept with their shared objects; past it the cache restarts.
const NAMES_CACHE_MAX: usize = 4096;

/// The shared object for `id` named `name`: the cached one while its name still holds.
fn named(cache: &mut HashMap<u32, Shared<Named>>, id: u32, name: Option<String>) -> Shared<Named> {
    if let Some(n) = cache.get(&id)
        && n.name == name
    {
        return n.clone();
    }
    if cache.len() >= NAMES_CACHE_MAX {
        cache.clear();
    }
    let n = shared(Named {
        id: id.to_string(),
        name,
    });
    cache.insert(id, n.clone());
    n
}

/// Everything known about the owner of a socket, shared between the events of its life.
#[derive(Clone, Debug, Default)]
pub struct Owner {
    pub process: Option<Shared<Process>>,
    pub container: Option<Shared<Container>>,
    pub systemd: Option<Shared<Systemd>>,
    pub cgroup: Option<Shared<Cgroup>>,
    pub attribution: &'static str,
    pub kernel: bool,
    /// Set when the command line was cut for the event (`portwatch.process`).
    pub argv_cut: Option<Shared<ArgvCut>>,
    /// /proc disagreed with the kernel's record (`portwatch.attribution_changed`).
    pub changed: Option<Shared<AttributionChanged>>,
}

impl Owner {
    /// Estimated memory the owner holds: its strings, counted twice because each
    /// shared part also keeps its rendered JSON once written.
    fn bytes(&self) -> usize {
        let p = self.process.as_ref().map_or(0, |p| {
            p.name.as_ref().map_or(0, String::len)
                + p.executable.as_ref().map_or(0, String::len)
                + p.command_line.as_ref().map_or(0, String::len)
                + p.args
                    .as_ref()
                    .map_or(0, |a| a.iter().map(|s| s.len() + 24).sum())
                + 64
        });
        let c = self
            .cgroup
            .as_ref()
            .map_or(0, |c| c.path.as_ref().map_or(0, String::len));
        let u = self.systemd.as_ref().map_or(0, |s| {
            s.unit.as_ref().map_or(0, String::len) + s.slice.as_ref().map_or(0, String::len)
        });
        2 * (p + c + u) + ENTRY_OVERHEAD
    }
}

impl CgroupParts {
    fn bytes(&self) -> usize {
        let c = self
            .cgroup
            .as_ref()
            .map_or(0, |c| c.path.as_ref().map_or(0, String::len));
        let u = self.systemd.as_ref().map_or(0, |s| {
            s.unit.as_ref().map_or(0, String::len) + s.slice.as_ref().map_or(0, String::len)
        });
        let k = self.container.as_ref().map_or(0, |k| k.id.len());
        2 * (c + u + k) + ENTRY_OVERHEAD
    }
}

#[derive(Clone, Debug, Default)]
struct CgroupParts {
    container: Option<Shared<Container>>,
    systemd: Option<Shared<Systemd>>,
    cgroup: Option<Shared<Cgroup>>,
}

/// A process's owner as first read, valid for later records with the same start time,
/// thread name, cgroup and uid (any change is read from /proc again).
struct CachedProc {
    start_ticks: u64,
    bytes: usize,
    thread_comm: Vec<u8>,
    cgroup_id: u64,
    uid: u32,
    owner: Owner,
}

pub struct Enricher {
    procs: HashMap<u32, CachedProc>,
    procs_bytes: usize,
    last_prune: Instant,
    cgroups: HashMap<u64, CgroupParts>,
    cgroups_bytes: usize,
    resolver: CgroupResolver,
    users: Users,
    /// uid/gid -> the shared `user`/`group` object, reused while the name is unchanged.
    user_cache: HashMap<u32, Shared<Named>>,
    group_cache: HashMap<u32, Shared<Named>>,
    ns_per_tick: u64,
    id_seed: u64,
    pub clocks: Clocks,
}

impl Enricher {
    pub fn new(cgroup_root: PathBuf, machine_id: &str, boot_id: &str) -> Enricher {
        let ticks = procfs::clock_ticks_per_sec().max(1);
        Enricher {
            procs: HashMap::new(),
            procs_bytes: 0,
            last_prune: Instant::now(),
            cgroups: HashMap::new(),
            cgroups_bytes: 0,
            resolver: CgroupResolver::new(cgroup_root),
            users: Users::new(),
            user_cache: HashMap::new(),
            group_cache: HashMap::new(),
            ns_per_tick: 1_000_000_000 / ticks,
            id_seed: fnv1a(FNV_OFFSET, format!("{machine_id}/{boot_id}").as_bytes()),
            clocks: Clocks::now(),
        }
    }

    /// Entries in the process and the cgroup cache now (`portwatch_cache_entries`).
    pub fn cache_sizes(&self) -> (usize, usize) {
        (self.procs.len(), self.cgroups.len())
    }

    /// Estimated bytes held by the process and the cgroup cache.
    pub fn cache_bytes(&self) -> (usize, usize) {
        (self.procs_bytes, self.cgroups_bytes)
    }

    /// Keeps `owner` for `pid`, within the cache's entry and byte bounds; first drops
    /// processes that have exited, at most once per [`PRUNE_INTERVAL`].
    fn cache_proc(&mut self, r: &Record, start_ticks: u64, owner: Owner) {
        let (pid, thread_comm) = (r.pid, r.comm.clone());
        if self.last_prune.elapsed() >= PRUNE_INTERVAL {
            self.last_prune = Instant::now();
            self.prune_exited(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        }
        let bytes = owner.bytes() + thread_comm.len();
        if self.procs.len() >= PROC_CACHE_MAX || self.procs_bytes + bytes > PROC_CACHE_BYTES {
            self.procs.clear();
            self.procs_bytes = 0;
        }
        if let Some(old) = self.procs.insert(
            pid,
            CachedProc {
                start_ticks,
                bytes,
                thread_comm,
                cgroup_id: r.cgroup_id,
                uid: r.uid,
                owner,
            },
        ) {
            self.procs_bytes -= old.bytes;
        }
        self.procs_bytes += bytes;
    }

    /// Drops cached processes for which `alive(pid)` is false.
    fn prune_exited(&mut self, alive: impl Fn(u32) -> bool) {
        let mut freed = 0;
        self.procs.retain(|&pid, c| {
            let keep = alive(pid);
            if !keep {
                freed += c.bytes;
            }
            keep
        });
        self.procs_bytes -= freed;
    }

    pub fn user(&mut self, uid: u32) -> Shared<Named> {
        let name = self.users.user_name(uid);
        named(&mut self.user_cache, uid, name)
    }

    pub fn group(&mut self, gid: u32) -> Shared<Named> {
        let name = self.users.group_name(gid);
        named(&mut self.group_cache, gid, name)
    }

    /// `process.entity_id`: stable for one process across agent restarts and distinct
    /// across pid reuse (boot, pid and start time).
    fn entity_id(&self, pid: u32, start_ticks: u64) -> String {
        let h = fnv1a(
            fnv1a(self.id_seed, &pid.to_le_bytes()),
            &start_ticks.to_le_bytes(),
        );
        format!("{h:016x}")
    }

    /// Whether the process `pid` that started at `start_boottime_ns` (0: unknown) still
    /// runs (the pid may name a newer process).
    pub fn alive(&self, pid: u32, start_boottime_ns: u64) -> bool {
        procfs::read_stat(pid).is_ok_and(|st| {
            start_boottime_ns == 0 || st.start_ticks == start_boottime_ns / self.ns_per_tick
        })
    }

    /// Owner of a live record. What the kernel captured (thread name, cgroup, uid) is
    /// what the event says; /proc adds the executable and command line when it still
    /// agrees, and `changed` says where it does not.
    pub fn owner_for_record(&mut self, r: &Record) -> Owner {
        let start_ticks = r.start_boottime_ns.map(|ns| ns / self.ns_per_tick);
        if let (Some(c), Some(start)) = (self.procs.get(&r.pid), start_ticks)
            && c.start_ticks == start
            && c.thread_comm == r.comm
            && c.cgroup_id == r.cgroup_id
            && c.uid == r.uid
        {
            return c.owner.clone();
        }
        let cg = self.cgroup_by_id(r.cgroup_id);
        let from_proc = procfs::read_stat(r.pid)
            .ok()
            .filter(|st| start_ticks.is_none_or(|t| t == st.start_ticks));
        let kernel_comm = procfs::escape_bytes(&r.comm);
        match from_proc {
            Some(st) => {
                let (mut p, argv_cut) = self.read_process(r.pid, st.comm, st.ppid, st.start_ticks);
                // The kernel's parent is the one at listen time; /proc's may be a reaper.
                if let Some(ppid) = r.ppid {
                    p.parent = Some(Parent { pid: ppid });
                }
                if let Some(ns) = r.start_boottime_ns {
                    p.start_ns = Some(self.clocks.wall_from_boottime(ns));
                }
                let kernel_cgroup = cg.cgroup.as_ref().and_then(|c| c.path.clone());
                let changed = drift(r, &kernel_comm, kernel_cgroup.as_deref(), &mut p);
                let owner = Owner {
                    process: Some(shared(p)),
                    container: cg.container,
                    systemd: cg.systemd,
                    cgroup: cg.cgroup,
                    attribution: if r.kthread { "kernel-thread" } else { "proc" },
                    kernel: r.kthread,
                    argv_cut: if changed.as_ref().is_some_and(|c| c.name.is_some()) {
                        None
                    } else {
                        argv_cut
                    },
                    changed: changed.map(shared),
                };
                if let Some(start_ticks) = start_ticks {
                    self.cache_proc(r, start_ticks, owner.clone());
                }
                owner
            }
            None => {
                // Gone (or the pid now names another task): report only what the kernel
                // saw; executable and command line stay absent rather than guessed.
                let p = Process {
                    pid: r.pid,
                    name: Some(kernel_comm),
                    parent: r.ppid.map(|pid| Parent { pid }),
                    start_ns: r
                        .start_boottime_ns
                        .map(|ns| self.clocks.wall_from_boottime(ns)),
                    entity_id: start_ticks.map(|t| self.entity_id(r.pid, t)),
                    ..Process::default()
                };
                Owner {
                    process: Some(shared(p)),
                    container: cg.container,
                    systemd: cg.systemd,
                    cgroup: cg.cgroup,
                    attribution: if r.kthread { "kernel-thread" } else { "kernel" },
                    kernel: r.kthread,
                    argv_cut: None,
                    changed: None,
                }
            }
        }
    }

    /// Owner of a socket found by the /proc snapshot: `pids` hold it (empty: the kernel).
    pub fn owner_for_pids(&mut self, pids: &[u32]) -> Owner {
        let Some(&pid) = pids.iter().min() else {
            return Owner {
                attribution: "kernel-socket",
                kernel: true,
                ..Owner::default()
            };
        };
        let Ok(st) = procfs::read_stat(pid) else {
            return Owner {
                attribution: "snapshot-gone",
                ..Owner::default()
            };
        };
        let (mut p, argv_cut) = self.read_process(pid, st.comm, st.ppid, st.start_ticks);
        p.start_ns = Some(
            self.clocks
                .wall_from_boottime(st.start_ticks * self.ns_per_tick),
        );
        let cg = procfs::read_cgroup(pid)
            .ok()
            .map(|path| self.cgroup_from_path(None, path));
        let cg = cg.unwrap_or_default();
        Owner {
            process: Some(shared(p)),
            container: cg.container,
            systemd: cg.systemd,
            cgroup: cg.cgroup,
            attribution: "proc",
            kernel: false,
            argv_cut,
            changed: None,
        }
    }

    fn read_process(
        &mut self,
        pid: u32,
        comm: String,
        ppid: u32,
        start_ticks: u64,
    ) -> (Process, Option<Shared<ArgvCut>>) {
        let exe = procfs::read_exe(pid).ok();
        // The file /proc/<pid>/exe points at, even when deleted or in another mount ns.
        let executable_owner = std::fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        let argv = procfs::read_cmdline_capped(pid).ok().flatten();
        let cut = argv.as_ref().filter(|a| a.truncated).map(|a| {
            shared(ArgvCut {
                truncated: true,
                original_length: a.original_len,
                original_args_count: a.original_args,
            })
        });
        let (command_line, args) = argv.map(|a| (a.command_line, a.args)).unzip();
        let p = Process {
            pid,
            name: Some(comm),
            parent: Some(Parent { pid: ppid }),
            executable: exe,
            command_line,
            args,
            start_ns: None,
            entity_id: Some(self.entity_id(pid, start_ticks)),
            executable_owner,
        };
        (p, cut)
    }

    fn cgroup_by_id(&mut self, id: u64) -> CgroupParts {
        if let Some(c) = self.cgroups.get(&id) {
            return c.clone();
        }
        let Some(path) = self.resolver.path(id) else {
            // Not resolvable (yet): report the id alone, and do not cache the miss.
            return CgroupParts {
                cgroup: Some(shared(Cgroup {
                    id: Some(id),
                    path: None,
                })),
                ..CgroupParts::default()
            };
        };
        let parts = self.cgroup_from_path(Some(id), path);
        let bytes = parts.bytes();
        if self.cgroups.len() >= CGROUP_CACHE_MAX || self.cgroups_bytes + bytes > CGROUP_CACHE_BYTES
        {
            self.cgroups.clear();
            self.cgroups_bytes = 0;
        }
        self.cgroups_bytes += bytes;
        self.cgroups.insert(id, parts.clone());
        parts
    }

    fn cgroup_from_path(&mut self, id: Option<u64>, path: String) -> CgroupParts {
        let CgroupInfo {
            systemd_unit,
            systemd_slice,
            user_manager,
            container_id,
            container_runtime,
            ..
        } = procfs::parse_cgroup_path(&path);
        CgroupParts {
            container: container_id.map(|id| {
                shared(Container {
                    id,
                    runtime: container_runtime,
                })
            }),
            systemd: (systemd_unit.is_some() || systemd_slice.is_some()).then(|| {
                shared(Systemd {
                    unit: systemd_unit,
                    slice: systemd_slice,
                    user_manager,
                })
            }),
            cgroup: Some(shared(Cgroup {
                id,
                path: Some(path),
            })),
        }
    }
}

/// Where /proc, read now, disagrees with the kernel's record `r` of the process `p` was
/// read for, and `p` corrected to the kernel's view: with `renamed` its name is the
/// kernel's and the executable and command line (perhaps another program's) move to the
/// returned record. Costs a read of the thread's comm, the cgroup and the status file.
fn drift(
    r: &Record,
    kernel_comm: &str,
    kernel_cgroup: Option<&str>,
    p: &mut Process,
) -> Option<AttributionChanged> {
    let mut c = AttributionChanged::default();
    // The record's comm is the thread's that listened. The main thread's name is in
    // `p`; another thread's is read from its task directory. When that thread is gone
    // nothing is claimed: its name may differ from the main thread's by design.
    let now = if r.tid == r.pid {
        p.name.clone()
    } else {
        procfs::read_thread_comm(r.pid, r.tid).ok()
    };
    if let Some(now) = now
        && now != kernel_comm
    {
        c.reasons.push("renamed");
        c.name = Some(now);
        // The main thread: an exec since the bind looks the same as a rename, so the
        // program /proc shows now is not reported as the listener's. (Another thread
        // that still runs cannot have exec'd: an exec ends every other thread.)
        if r.tid == r.pid {
            p.name = Some(kernel_comm.to_owned());
            c.executable = p.executable.take();
            c.command_line = p.command_line.take();
            p.args = None;
            p.executable_owner = None;
        }
    }
    if let (Some(bound), Ok(now)) = (kernel_cgroup, procfs::read_cgroup(r.pid))
        && bound != now
    {
        c.reasons.push("cgroup-moved");
        c.cgroup = Some(now);
    }
    if let Ok((uid, _)) = procfs::read_ids(r.pid)
        && uid != r.uid
    {
        c.reasons.push("uid-changed");
        c.uid = Some(uid);
    }
    (!c.reasons.is_empty()).then_some(c)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner_with_args(n: usize) -> Owner {
        Owner {
            process: Some(shared(Process {
                pid: 1,
                command_line: Some("x".repeat(n)),
                args: Some(vec!["x".repeat(n)]),
                ..Process::default()
            })),
            ..Owner::default()
        }
    }

    fn record(pid: u32, comm: &[u8]) -> Record {
        Record {
            kind: portwatch_common::Kind::ListenStarted,
            ktime_ns: 0,
            pid,
            tid: pid,
            uid: 0,
            gid: 0,
            cgroup_id: 1,
            sock_key: 0,
            inode: None,
            start_boottime_ns: None,
            netns: None,
            ppid: None,
            kthread: false,
            v6only: false,
            untracked: false,
            urgent: false,
            udplite: false,
            implicit: false,
            transport: crate::kernel::ring::Transport::Tcp,
            addr: std::net::Ipv4Addr::UNSPECIFIED.into(),
            port: 1,
            comm: comm.to_vec(),
        }
    }

    #[test]
    fn process_cache_is_bounded_by_bytes_and_drops_exited() {
        let mut e = Enricher::new(PathBuf::from("/nonexistent"), "m", "b");
        // Entries of ~8 KiB estimated each: far fewer than PROC_CACHE_MAX fit.
        for pid in 0..4000 {
            e.cache_proc(&record(pid, b"comm"), 1, owner_with_args(2048));
            assert!(e.procs_bytes <= PROC_CACHE_BYTES, "{}", e.procs_bytes);
        }
        let sum: usize = e.procs.values().map(|c| c.bytes).sum();
        assert_eq!(sum, e.procs_bytes, "the byte count follows the entries");
        // Replacing an entry does not count it twice.
        let before = e.procs_bytes;
        let pid = *e.procs.keys().next().unwrap();
        e.cache_proc(&record(pid, b"comm"), 2, owner_with_args(2048));
        assert_eq!(e.procs_bytes, before);
        // Exited processes go.
        e.prune_exited(|pid| pid % 2 == 0);
        assert!(e.procs.keys().all(|p| p % 2 == 0));
        let sum: usize = e.procs.values().map(|c| c.bytes).sum();
        assert_eq!(sum, e.procs_bytes);
    }

    /// This test's own process, as the kernel would have recorded it.
    fn me() -> (Record, Process) {
        let pid = std::process::id();
        let st = procfs::read_stat(pid).unwrap();
        let mut r = record(pid, st.comm.as_bytes());
        r.uid = procfs::read_ids(pid).unwrap().0;
        let p = Process {
            pid,
            name: Some(st.comm),
            executable: Some("/bin/x".into()),
            command_line: Some("x --y".into()),
            args: Some(vec!["x".into(), "--y".into()]),
            ..Process::default()
        };
        (r, p)
    }

    #[test]
    fn agreeing_proc_changes_nothing() {
        let (r, mut p) = me();
        let comm = procfs::escape_bytes(&r.comm);
        let cgroup = procfs::read_cgroup(r.pid).ok();
        assert_eq!(drift(&r, &comm, cgroup.as_deref(), &mut p), None);
        assert_eq!(p.executable.as_deref(), Some("/bin/x"));
    }

    #[test]
    fn a_rename_or_exec_keeps_the_kernels_name_and_moves_procs_program_aside() {
        let (mut r, mut p) = me();
        r.comm = b"python3".to_vec();
        let now = p.name.clone();
        let cgroup = procfs::read_cgroup(r.pid).ok();
        let c = drift(&r, "python3", cgroup.as_deref(), &mut p).expect("drift");
        assert_eq!(c.reasons, ["renamed"]);
        assert_eq!(c.name, now);
        assert_eq!(c.executable.as_deref(), Some("/bin/x"));
        assert_eq!(c.command_line.as_deref(), Some("x --y"));
        assert_eq!(p.name.as_deref(), Some("python3"));
        assert_eq!((p.executable.as_ref(), p.args.as_ref()), (None, None));
    }

    #[test]
    fn a_cgroup_move_and_a_uid_change_are_named() {
        let (mut r, mut p) = me();
        r.uid = r.uid.wrapping_add(1);
        let comm = procfs::escape_bytes(&r.comm);
        let c = drift(
            &r,
            &comm,
            Some("/system.slice/redis-server.service"),
            &mut p,
        )
        .expect("drift");
        assert_eq!(c.reasons, ["cgroup-moved", "uid-changed"]);
        assert_eq!(c.uid, Some(r.uid.wrapping_sub(1)));
        assert_eq!(c.cgroup, procfs::read_cgroup(r.pid).ok());
        assert_eq!(p.executable.as_deref(), Some("/bin/x"), "not a rename");
    }
}
