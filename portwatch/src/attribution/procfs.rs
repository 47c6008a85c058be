//! Process attribution from /proc and the cgroup filesystem.
//!
//! Everything read here is untrusted text: process names, command lines and cgroup
//! names are chosen by whoever runs the process, so parsers return `None` or an error
//! on anything unexpected and never panic.

use std::{
    collections::HashMap,
    ffi::OsString,
    fs,
    io::{self, Read as _},
    os::unix::{
        ffi::{OsStrExt as _, OsStringExt as _},
        fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

/// Why a /proc file could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text has no `(` opening the command name.
    #[error("{file}: no '(' opening the command name")]
    NoCommStart {
        /// The file kind, e.g. "stat".
        file: &'static str,
    },
    /// The text has no `)` closing the command name.
    #[error("{file}: no ')' closing the command name")]
    NoCommEnd {
        /// The file kind, e.g. "stat".
        file: &'static str,
    },
    /// A field the caller needs is not there (the text ends early).
    #[error("{file}: field {field} is missing")]
    MissingField {
        /// The file kind, e.g. "stat".
        file: &'static str,
        /// Which field, e.g. "starttime (22)".
        field: &'static str,
    },
    /// A field is there but does not hold what it should.
    #[error("{file}: field {field} is malformed: {value:?}")]
    BadField {
        /// The file kind, e.g. "stat".
        file: &'static str,
        /// Which field, e.g. "ppid (4)".
        field: &'static str,
        /// The offending text, cut to a few dozen characters.
        value: String,
    },
}

impl ParseError {
    fn bad(file: &'static str, field: &'static str, value: &str) -> Self {
        // The value ends up in log lines; a hostile process must not be able to make
        // them arbitrarily long.
        ParseError::BadField {
            file,
            field,
            value: value.chars().take(48).collect(),
        }
    }
}

fn invalid_data(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

fn proc_file(pid: u32, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

/// Reads at most `cap` bytes: /proc and /etc files are small unless someone is hostile.
fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path)?.take(cap).read_to_end(&mut buf)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------------------
// /proc/<pid>/stat, status, exe, cmdline, cgroup
// ---------------------------------------------------------------------------------------

/// Parsed `/proc/<pid>/stat`. `comm` may contain spaces and ')' : find the LAST ')'
/// (kernel fs/proc/array.c).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 1: the process (thread group) id.
    pub pid: u32,
    /// Field 2 without its parentheses: the task's command name, lossily decoded. Set by
    /// the process itself (prctl, writes to /proc/self/comm), so anything goes; 15 bytes
    /// at most for user tasks, longer for some kernel threads ("kworker/u8:2-events").
    pub comm: String,
    /// Field 3: the state letter (R, S, D, Z, T, t, X, I, ...).
    pub state: char,
    /// Field 4: parent pid (0 for init and kthreadd).
    pub ppid: u32,
    /// Field 22: start time in clock ticks since boot (see [`clock_ticks_per_sec`]).
    pub start_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat`.
///
/// The command name sits between the first `(` and the *last* `)`: the kernel prints it
/// unescaped, and every field after it is numeric or a state letter, so the last `)` is
/// the only one that cannot belong to the name.
pub fn parse_stat(text: &str) -> Result<ProcStat, ParseError> {
    const F: &str = "stat";
    let open = text.find('(').ok_or(ParseError::NoCommStart { file: F })?;
    let close = text.rfind(')').ok_or(ParseError::NoCommEnd { file: F })?;
    if close < open {
        return Err(ParseError::NoCommEnd { file: F });
    }
    let pid_text = text[..open].trim();
    let pid = pid_text
        .parse()
        .map_err(|_| ParseError::bad(F, "pid (1)", pid_text))?;
    let comm = text[open + 1..close].to_owned();

    // Index 0 of `rest` is field 3 (state).
    let rest: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let field = |idx: usize, name: &'static str| {
        rest.get(idx).copied().ok_or(ParseError::MissingField {
            file: F,
            field: name,
        })
    };

    let state_text = field(0, "state (3)")?;
    let mut chars = state_text.chars();
    let state = match (chars.next(), chars.next()) {
        (Some(c), None) => c,
        _ => return Err(ParseError::bad(F, "state (3)", state_text)),
    };
    let ppid_text = field(1, "ppid (4)")?;
    let ppid = ppid_text
        .parse()
        .map_err(|_| ParseError::bad(F, "ppid (4)", ppid_text))?;
    let start_text = field(19, "starttime (22)")?;
    let start_ticks = start_text
        .parse()
        .map_err(|_| ParseError::bad(F, "starttime (22)", start_text))?;

    Ok(ProcStat {
        pid,
        comm,
        state,
        ppid,
        start_ticks,
    })
}

/// Reads and parses `/proc/<pid>/stat`. A parse failure is an error of kind
/// [`io::ErrorKind::InvalidData`] wrapping the [`ParseError`].
pub fn read_stat(pid: u32) -> io::Result<ProcStat> {
    // Lossy: comm is whatever bytes the process put in prctl(PR_SET_NAME).
    let bytes = read_capped(&proc_file(pid, "stat"), 4096)?;
    parse_stat(&escape_bytes(&bytes)).map_err(invalid_data)
}

/// Parses the `Uid:` and `Gid:` lines of `/proc/<pid>/status` into (real uid, real gid).
pub fn parse_status_ids(text: &str) -> Result<(u32, u32), ParseError> {
    const F: &str = "status";
    let first_id = |key: &str, field: &'static str| -> Result<u32, ParseError> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or(ParseError::MissingField { file: F, field })?;
        // The line holds real, effective, saved and filesystem ids; the first is real.
        let first = line
            .split_ascii_whitespace()
            .next()
            .ok_or(ParseError::MissingField { file: F, field })?;
        first.parse().map_err(|_| ParseError::bad(F, field, first))
    };
    Ok((first_id("Uid:", "Uid")?, first_id("Gid:", "Gid")?))
}

/// `/proc/<pid>/status` Uid:/Gid: lines -> (real uid, real gid)
pub fn read_ids(pid: u32) -> io::Result<(u32, u32)> {
    let bytes = read_capped(&proc_file(pid, "status"), 64 * 1024)?;
    parse_status_ids(&String::from_utf8_lossy(&bytes)).map_err(invalid_data)
}

/// `/proc/<pid>/task/<tid>/comm`: the thread's name now, as [`escape_bytes`] shows it.
pub fn read_thread_comm(pid: u32, tid: u32) -> io::Result<String> {
    let mut bytes = read_capped(&proc_file(pid, &format!("task/{tid}/comm")), 64)?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    Ok(escape_bytes(&bytes))
}

/// The suffix d_path() appends to the path of an unlinked file.
const DELETED_SUFFIX: &str = " (deleted)";

/// Splits the kernel's " (deleted)" marker off a /proc link target: (path, was_deleted).
///
/// A file really named "x (deleted)" reads the same as a deleted "x"; the kernel gives no
/// way to tell them apart from the link text alone.
pub fn split_deleted(target: &str) -> (&str, bool) {
    match target.strip_suffix(DELETED_SUFFIX) {
        Some(path) if !path.is_empty() => (path, true),
        _ => (target, false),
    }
}

/// Text from kernel bytes (comm, argv, paths), which need not be UTF-8: valid UTF-8 is
/// kept as it is, and each byte of an invalid sequence becomes `\xNN`, so nothing is
/// lost or replaced by U+FFFD. (A name that literally contains `\xNN` reads the same;
/// the kernel offers no way to quote it.) Control characters stay: JSON escapes them,
/// and the text view shows them escaped.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            use std::fmt::Write as _;
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The executable of `pid` (readlink `/proc/<pid>/exe`, see [`escape_bytes`]) and whether it has
/// been deleted (or replaced, as a package upgrade does) since the process started.
/// Kernel threads have no executable: that is an error of kind NotFound.
pub fn read_exe_deleted(pid: u32) -> io::Result<(String, bool)> {
    let target = fs::read_link(proc_file(pid, "exe"))?;
    let text = escape_bytes(target.as_os_str().as_bytes());
    let (path, deleted) = split_deleted(&text);
    Ok((path.to_owned(), deleted))
}

/// The executable of `pid` with any " (deleted)" marker removed; see
/// [`read_exe_deleted`] to learn whether it was there.
pub fn read_exe(pid: u32) -> io::Result<String> {
    read_exe_deleted(pid).map(|(path, _)| path)
}

/// Upper bound on the command line bytes kept per process.
pub const CMDLINE_CAP: usize = 64 * 1024;

/// Splits the raw bytes of `/proc/<pid>/cmdline` into arguments: on NUL, dropping the one
/// trailing empty piece the final terminator makes, lossy UTF-8, at most
/// [`CMDLINE_CAP`] bytes considered.
///
/// A process that rewrote its argv (setproctitle) may have no NULs at all: its whole
/// title comes back as one argument, which is what `ps` shows too.
pub fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = &raw[..raw.len().min(CMDLINE_CAP)];
    if raw.is_empty() {
        return Vec::new();
    }
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    raw.split(|&b| b == 0).map(escape_bytes).collect()
}

/// The arguments of `pid`: split on NUL, the trailing empty dropped, lossy UTF-8, at
/// most 64 KiB in total (the last argument is cut short past that). Kernel threads and
/// zombies give an empty list.
pub fn read_cmdline(pid: u32) -> io::Result<Vec<String>> {
    let raw = read_capped(&proc_file(pid, "cmdline"), CMDLINE_CAP as u64)?;
    Ok(parse_cmdline(&raw))
}

/// Bytes of `process.command_line` and `process.args` together that an event carries
/// at most: half for each. A process chooses its own arguments, and before this cap one
/// 65,000-byte argument of 0xFF bytes (escaped to 4 bytes each) made every event of it
/// 650 KB and the agent's caches grow by as much per process.
pub const ARGV_EVENT_BUDGET: usize = 4096;

/// Raw bytes of `/proc/<pid>/cmdline` read past the budget only to count them.
const CMDLINE_COUNT_LIMIT: u64 = 16 << 20;

/// A command line cut to fit [`ARGV_EVENT_BUDGET`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CappedArgv {
    /// Arguments, their lengths summing to at most half the budget; the one that
    /// crosses it is cut (at a character boundary), the rest are dropped.
    pub args: Vec<String>,
    /// The arguments joined by spaces, cut to half the budget.
    pub command_line: String,
    /// Something was cut or dropped.
    pub truncated: bool,
    /// Bytes of the whole raw `/proc/<pid>/cmdline` (NULs included).
    pub original_len: u64,
    /// Arguments in the whole command line.
    pub original_args: u64,
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    true
}

/// Caps a command line whose first bytes are `kept` (at least [`ARGV_EVENT_BUDGET`] of
/// them when there are that many) and whose whole raw length is `original_len` bytes
/// with `original_nuls` NUL bytes, the last of them a NUL if `ends_in_nul`. `None` for
/// an empty command line (kernel threads, zombies).
pub fn cap_argv(
    kept: &[u8],
    original_len: u64,
    original_nuls: u64,
    ends_in_nul: bool,
) -> Option<CappedArgv> {
    let args = parse_cmdline(kept);
    if args.is_empty() {
        return None;
    }
    let half = ARGV_EVENT_BUDGET / 2;
    let whole = original_len <= kept.len() as u64;
    // The final NUL terminates the last argument; a setproctitle'd line may have none.
    let original_args = original_nuls + u64::from(!ends_in_nul);
    let mut truncated = !whole;
    let mut command_line = args.join(" ");
    truncated |= cut(&mut command_line, half);
    let mut kept_args = Vec::new();
    let mut used = 0usize;
    for mut a in args {
        if used >= half {
            truncated = true;
            break;
        }
        truncated |= cut(&mut a, half - used);
        used += a.len();
        kept_args.push(a);
    }
    Some(CappedArgv {
        args: kept_args,
        command_line,
        truncated,
        original_len,
        original_args,
    })
}

/// The command line of `pid` cut for an event (see [`cap_argv`]): only the first
/// [`ARGV_EVENT_BUDGET`] bytes are kept in memory, the rest is only counted.
pub fn read_cmdline_capped(pid: u32) -> io::Result<Option<CappedArgv>> {
    let mut f = fs::File::open(proc_file(pid, "cmdline"))?;
    let mut kept = Vec::with_capacity(ARGV_EVENT_BUDGET);
    let mut buf = [0u8; 16 * 1024];
    let (mut total, mut nuls, mut last) = (0u64, 0u64, 0u8);
    while total < CMDLINE_COUNT_LIMIT {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = &buf[..n];
        let room = ARGV_EVENT_BUDGET.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..room.min(n)]);
        total += n as u64;
        nuls += chunk.iter().filter(|&&b| b == 0).count() as u64;
        last = chunk[n - 1];
    }
    Ok(cap_argv(&kept, total, nuls, last == 0))
}

/// Picks the cgroup path out of the text of `/proc/<pid>/cgroup`.
///
/// The cgroup v2 line (`0::/path`) wins whenever it says more than `/`: it is the
/// hierarchy that `bpf_get_current_cgroup_id()` and [`CgroupResolver`] speak of, so
/// paths from /proc and from kernel events agree, and on hybrid hosts systemd mirrors
/// its tree into it anyway. The v1 `name=systemd` line is used only when the v2 path
/// is missing or just `/`: on legacy-mode hosts (systemd not using the v2 hierarchy,
/// or docker's cgroupfs driver writing v1 hierarchies only) every process sits in the
/// v2 root, which says nothing, while the `name=systemd` path still names the service
/// or container. Such a path may not exist under the cgroup2 mount.
///
/// Returns `None` when neither line is present (a v1-only host without systemd).
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    let mut v2 = None;
    let mut named = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2.get_or_insert(path);
        } else if controllers.split(',').any(|c| c == "name=systemd") {
            named.get_or_insert(path);
        }
    }
    match (v2, named) {
        (Some(p), _) if p != "/" => Some(p),
        (_, Some(p)) if p != "/" => Some(p),
        (v2, named) => v2.or(named),
    }
    .map(str::to_owned)
}

/// The cgroup v2 path of a pid: the "0::/path" line of `/proc/<pid>/cgroup`; on hybrid
/// hosts also the "name=systemd" line when there is no v2 path beyond "/" (see
/// [`parse_proc_cgroup`] for which wins and why). Paths are relative to the reader's
/// cgroup namespace root; from the host's namespace, as portwatch runs, that is the
/// cgroup2 mount root.
pub fn read_cgroup(pid: u32) -> io::Result<String> {
    let bytes = read_capped(&proc_file(pid, "cgroup"), 64 * 1024)?;
    parse_proc_cgroup(&String::from_utf8_lossy(&bytes))
        .ok_or_else(|| invalid_data("no cgroup v2 (0::) or name=systemd line"))
}

// ---------------------------------------------------------------------------------------
// cgroup path -> systemd unit, container
// ---------------------------------------------------------------------------------------

/// What a cgroup path says about who owns a process.
///
/// Only the part of the tree that the system manager (or a root-run container runtime)
/// makes is believed. Below a unit the tree belongs to whoever runs in that unit: a
/// service with `Delegate=yes`, a container's own init, or, under `user@N.service`, user
/// N's manager, where user N can `mkdir` any name (`.../user@1000.service/app.slice/
/// ssh.service` is what `systemd-run --user --unit=ssh` makes). So:
///
/// - `systemd_unit` is the *outermost* unit-shaped component (`.service`, `.scope`,
///   `.socket`, `.mount`, `.swap`): the one the system manager runs. Under
///   `user@N.service` it is the first unit below it, and `user_manager` is `Some(N)`:
///   user N's manager runs it, and a `systemctl stop` of that name on the system manager
///   would act on a different, system unit.
/// - Container fields come only from a runtime's own shape at a place the runtime
///   creates (see [`container_component`]): never below a unit, so never inside a user's
///   delegated subtree, and never from inside another container (docker-in-docker and
///   kind nodes nest runtimes whose ids mean nothing on the host). A container's own
///   scope (`docker-<id>.scope`, ...) is reported as the unit; units inside the
///   container are its own manager's, not the host's, and are not reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The unit that owns the process, e.g. "memcached.service", "session-3.scope",
    /// `docker-<id>.scope`; a user unit when `user_manager` is set.
    pub systemd_unit: Option<String>,
    /// Innermost slice above the unit, e.g. "system.slice", "user-1000.slice" (or under
    /// a user manager, the user's "app.slice").
    pub systemd_slice: Option<String>,
    /// The uid N of `user@N.service` whose manager runs `systemd_unit`.
    pub user_manager: Option<u32>,
    /// Container id: 64 lowercase hex for docker, containerd, cri-o and podman; the
    /// container name for lxc and systemd-nspawn.
    pub container_id: Option<String>,
    /// One of "docker", "containerd", "cri-o", "podman", "lxc", "systemd-nspawn";
    /// `None` when the shape does not say (kubelet's cgroupfs layout
    /// `/kubepods/.../pod<uid>/<id>` is shared by containerd and dockershim).
    pub container_runtime: Option<&'static str>,
    /// Kubernetes pod uid, dashed ("1a2b3c4d-5e6f-..."; systemd slices spell the dashes
    /// as '_'), or the 32-hex uid of a static pod.
    pub pod_uid: Option<String>,
}

const UNIT_SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];

fn is_unit(comp: &str) -> bool {
    UNIT_SUFFIXES
        .iter()
        .any(|s| comp.strip_suffix(s).is_some_and(|stem| !stem.is_empty()))
}

fn is_slice(comp: &str) -> bool {
    comp.strip_suffix(".slice")
        .is_some_and(|stem| !stem.is_empty())
}

/// A 64-hex container id, lowercased; `None` for anything else.
fn hex64(s: &str) -> Option<String> {
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

/// A pod uid as kubelet writes it into cgroup names: a dashed UUID, or 32 hex for static
/// pods (a hash of the manifest). `_` stands for `-` in systemd slice names.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-").to_ascii_lowercase();
    let is_hex = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    let uuid =
        groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| is_hex(g));
    let static_pod = uid.len() == 32 && is_hex(&uid);
    (uuid || static_pod).then_some(uid)
}

/// The pod uid a kubelet cgroup component names, if it is one.
fn pod_component(parts: &[&str], i: usize) -> Option<String> {
    let comp = parts.get(i)?;
    if let Some(stem) = comp.strip_suffix(".slice") {
        // systemd driver: kubepods[-<qos>]-pod<uid_with_underscores>.slice
        if !stem.starts_with("kubepods-") {
            return None;
        }
        let (_, last) = stem.rsplit_once('-')?;
        return pod_uid(last.strip_prefix("pod")?);
    }
    // cgroupfs driver: .../kubepods[/<qos>]/pod<uid>
    let under_kubepods = match i.checked_sub(1).and_then(|p| parts.get(p)) {
        Some(&"kubepods") => true,
        Some(&"burstable" | &"besteffort") => {
            i.checked_sub(2).and_then(|p| parts.get(p)) == Some(&"kubepods")
        }
        _ => false,
    };
    if !under_kubepods {
        return None;
    }
    pod_uid(comp.strip_prefix("pod")?)
}

/// A container or machine name as LXC, Incus and machined accept them: 1-64 of ASCII
/// letters, digits, '-', '_' and '.', not starting with '.' or '-'.
fn machine_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// `N` of a `user@N.service` component: the unit of user N's manager.
fn user_manager_uid(comp: &str) -> Option<u32> {
    let n = comp.strip_prefix("user@")?.strip_suffix(".service")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// The container a component names, if it has one of the known shapes.
/// `pod_at` is the index of the kubelet pod component, if one was seen.
fn container_component(
    parts: &[&str],
    i: usize,
    pod_at: Option<usize>,
) -> Option<(Option<&'static str>, String)> {
    let comp = *parts.get(i)?;
    let prev = i.checked_sub(1).and_then(|p| parts.get(p)).copied();

    // systemd drivers: <prefix><64hex>.scope. The conmon scopes of podman and cri-o
    // ("libpod-conmon-<id>.scope", "crio-conmon-<id>.scope") fail the hex test.
    const SCOPES: [(&str, &str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("nerdctl-", "containerd"),
    ];
    if let Some(stem) = comp.strip_suffix(".scope") {
        for (prefix, runtime) in SCOPES {
            if let Some(id) = stem.strip_prefix(prefix).and_then(hex64) {
                return Some((Some(runtime), id));
            }
        }
        // systemd-nspawn (and machined's other guests): /machine.slice/machine-<name>.scope,
        // with '-' in the name escaped as "\x2d".
        if i == 1
            && prev == Some("machine.slice")
            && let Some(name) = stem.strip_prefix("machine-")
        {
            let name = name.replace("\\x2d", "-");
            return machine_name(&name).then_some((Some("systemd-nspawn"), name));
        }
        return None;
    }
    // cgroupfs drivers of cri-o ("crio-<id>") and podman ("libpod-<id>" under
    // libpod_parent) keep the prefix but drop ".scope".
    for (prefix, runtime) in [("crio-", "cri-o"), ("libpod-", "podman")] {
        if let Some(id) = comp.strip_prefix(prefix).and_then(hex64) {
            return Some((Some(runtime), id));
        }
    }
    // podman's cgroupfs driver keeps "libpod-<id>" under /libpod_parent; cri-o's under
    // the kubelet's pod directory (both handled above by prefix and hex shape).
    // docker's cgroupfs driver: /docker/<64hex>
    if i == 1
        && prev == Some("docker")
        && let Some(id) = hex64(comp)
    {
        return Some((Some("docker"), id));
    }
    // kubelet's cgroupfs driver: .../pod<uid>/<64hex>, runtime not spelled out.
    if pod_at.is_some_and(|p| p + 1 == i)
        && let Some(id) = hex64(comp)
    {
        return Some((None, id));
    }
    // LXC >= 4: /lxc.payload.<name>; before that /lxc/<name>. "lxc.monitor.<name>" holds
    // the monitor process, not the container. The name is the only id here that is not
    // hex: one with control characters is not taken for a name, so it can never carry a
    // terminal escape into a text line (found by the `emit` fuzz target).
    // Names are checked against what LXC/Incus accept (hostname-like, and '_' for
    // Incus projects), so a control character or anything exotic is never taken.
    let lxc_name = |name: &str| machine_name(name).then(|| (Some("lxc"), name.to_owned()));
    if i == 0
        && let Some(name) = comp.strip_prefix("lxc.payload.")
    {
        return lxc_name(name);
    }
    if i == 1 && prev == Some("lxc") {
        return lxc_name(comp);
    }
    None
}

/// Reads systemd and container ownership out of a cgroup path (either `/proc/<pid>/cgroup`'s
/// or [`CgroupResolver`]'s). Unknown shapes give empty fields, never a guessed id; see
/// [`CgroupInfo`] for which parts of the path are believed.
pub fn parse_cgroup_path(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut pod_at = None;
    for (i, comp) in parts.iter().enumerate() {
        if is_slice(comp) {
            info.systemd_slice = Some((*comp).to_owned());
        }
        if info.pod_uid.is_none()
            && let Some(uid) = pod_component(&parts, i)
        {
            info.pod_uid = Some(uid);
            pod_at = Some(i);
            continue;
        }
        if let Some((runtime, id)) = container_component(&parts, i, pod_at) {
            info.container_runtime = runtime;
            info.container_id = Some(id);
            // Below here is the container's own tree.
            if is_unit(comp) {
                info.systemd_unit = Some((*comp).to_owned());
            }
            break;
        }
        if !is_unit(comp) {
            continue;
        }
        // The outermost unit: the system manager's. Below it, the unit's own tree.
        info.systemd_unit = Some((*comp).to_owned());
        if let Some(uid) = user_manager_uid(comp) {
            // user@N.service delegates its subtree to user N's manager: the first unit
            // there is a user unit (whatever name user N gave it).
            for inner in &parts[i + 1..] {
                if is_slice(inner) {
                    info.systemd_slice = Some((*inner).to_owned());
                } else if is_unit(inner) {
                    info.systemd_unit = Some((*inner).to_owned());
                    info.user_manager = Some(uid);
                    break;
                }
            }
        }
        break;
    }
    info
}

// ---------------------------------------------------------------------------------------
// socket units
// ---------------------------------------------------------------------------------------

/// Where systemd reads unit files, most precedent first (systemd.unit(5)).
const UNIT_DIRS: [&str; 6] = [
    "/etc/systemd/system",
    "/run/systemd/transient",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// Whether the text of a `.socket` unit file listens on `port`: `ListenStream=` for TCP,
/// `ListenDatagram=` for UDP, with a value `PORT`, `ADDR:PORT` or `[ADDR]:PORT`.
pub fn socket_unit_listens(text: &str, port: u16, udp: bool) -> bool {
    let key = if udp {
        "ListenDatagram"
    } else {
        "ListenStream"
    };
    text.lines().any(|line| {
        let Some((k, v)) = line.trim().split_once('=') else {
            return false;
        };
        if k.trim() != key {
            return false;
        }
        let v = v.trim();
        if v.starts_with('/') || v.starts_with('@') || v.starts_with("vsock:") {
            return false;
        }
        let p = v.rsplit_once(':').map_or(v, |(_, p)| p);
        p.parse::<u16>() == Ok(port)
    })
}

/// The `.socket` unit whose file listens on `port` (for a socket pid 1 holds), from the
/// unit files; the first in systemd's precedence order, and an earlier directory's file
/// hides a later one of the same name. Drop-ins are not read.
pub fn find_socket_unit(port: u16, udp: bool) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    for dir in UNIT_DIRS {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".socket"))
            .collect();
        names.sort();
        for name in names {
            if !seen.insert(name.clone()) {
                continue;
            }
            let Ok(text) = read_capped(&Path::new(dir).join(&name), 64 * 1024) else {
                continue;
            };
            if socket_unit_listens(&String::from_utf8_lossy(&text), port, udp) {
                return Some(name);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// cgroup id -> path
// ---------------------------------------------------------------------------------------

/// cgroup v2 id (what bpf_get_current_cgroup_id() returns: the inode number of the cgroup's
/// directory in the cgroup2 mount) -> path relative to the mount ("/system.slice/x.service").
///
/// The cache holds at most [`CgroupResolver::DEFAULT_CAPACITY`] (4096) entries and
/// [`CgroupResolver::MAX_PATH_BYTES`] bytes of paths (a user can make deep trees of
/// 255-byte names in a delegated subtree, so entries alone do not bound memory). It is
/// filled by walking the cgroup2 tree on a miss, at most once per second (misses inside
/// that window return `None` without walking). Each walk *replaces* the cache with what it
/// saw, which both drops deleted cgroups and is the "clear on overflow": a tree larger
/// than the capacity keeps the id asked for plus the first others found, and the rest
/// miss until a later walk.
///
/// The walk reads directory entries without following symlinks and skips any directory
/// on another device, so it never leaves the cgroup2 mount; it visits at most
/// [`CgroupResolver::MAX_WALK_DIRS`] directories. On 64-bit kernels (>= 5.5, and all
/// portwatch supports) the cgroup id is the kernfs inode number, so an lstat() of each
/// directory gives its id.
#[derive(Debug)]
pub struct CgroupResolver {
    mount: PathBuf,
    capacity: usize,
    min_walk_interval: Duration,
    cache: HashMap<u64, String>,
    last_walk: Option<Instant>,
}

impl CgroupResolver {
    /// Cache entries kept by [`CgroupResolver::new`].
    pub const DEFAULT_CAPACITY: usize = 4096;
    /// Shortest time between two walks for [`CgroupResolver::new`].
    pub const DEFAULT_WALK_INTERVAL: Duration = Duration::from_secs(1);
    /// Directories one walk visits at most, so a runaway tree costs bounded time.
    pub const MAX_WALK_DIRS: usize = 65_536;
    /// Bytes of cached paths at most (the wanted one is let in past it).
    pub const MAX_PATH_BYTES: usize = 1 << 20;

    /// A resolver for the cgroup2 filesystem mounted at `mount` (see [`cgroup2_mount`]).
    pub fn new(mount: PathBuf) -> Self {
        Self::with_limits(mount, Self::DEFAULT_CAPACITY, Self::DEFAULT_WALK_INTERVAL)
    }

    /// Like [`CgroupResolver::new`] with another cache capacity (at least 1) and walk
    /// interval.
    pub fn with_limits(mount: PathBuf, capacity: usize, min_walk_interval: Duration) -> Self {
        CgroupResolver {
            mount,
            capacity: capacity.max(1),
            min_walk_interval,
            cache: HashMap::new(),
            last_walk: None,
        }
    }

    /// The path of cgroup `id` relative to the mount ("/" for the root), or `None` when it
    /// is not (yet) known: gone, created after the last walk within the interval, or past
    /// the walk bound.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cache.get(&id) {
            return Some(p.clone());
        }
        if self
            .last_walk
            .is_some_and(|t| t.elapsed() < self.min_walk_interval)
        {
            return None;
        }
        self.last_walk = Some(Instant::now());
        self.walk(id);
        self.cache.get(&id).cloned()
    }

    fn walk(&mut self, wanted: u64) {
        let mut cache = HashMap::new();
        let Ok(root) = fs::metadata(&self.mount) else {
            self.cache = cache;
            return;
        };
        let dev = root.dev();
        cache.insert(root.ino(), "/".to_owned());
        let mut bytes = 1usize;

        // Depth-first with an explicit stack: cgroup trees can be deep, and recursion
        // depth would be up to whoever creates cgroups.
        let mut stack: Vec<(PathBuf, String)> = vec![(self.mount.clone(), String::new())];
        let mut visited = 0usize;
        while let Some((dir, rel)) = stack.pop() {
            visited += 1;
            if visited > Self::MAX_WALK_DIRS {
                break;
            }
            // Cgroups vanish all the time; an unreadable directory is simply skipped.
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // d_type, not stat: symlinks report as symlinks and are never followed.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let full = entry.path();
                // lstat, not the readdir inode: a mount point's d_ino is the directory
                // underneath, while lstat sees the mounted root and its other device.
                let Ok(meta) = fs::symlink_metadata(&full) else {
                    continue;
                };
                if meta.dev() != dev || !meta.is_dir() {
                    continue;
                }
                let name = entry.file_name();
                let child = format!("{rel}/{}", String::from_utf8_lossy(name.as_bytes()));
                let ino = meta.ino();
                if ino == wanted
                    || (cache.len() < self.capacity && bytes + child.len() <= Self::MAX_PATH_BYTES)
                {
                    bytes += child.len();
                    cache.insert(ino, child.clone());
                }
                stack.push((full, child));
            }
        }
        if cache.len() > self.capacity {
            // The wanted id was let in past the bound (by one at most): make room.
            if let Some(&other) = cache.keys().find(|&&ino| ino != wanted) {
                cache.remove(&other);
            }
        }
        self.cache = cache;
    }
}

/// Decodes the octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash) the kernel writes into mountinfo paths. A backslash not followed by three
/// octal digits stays as it is.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(&[a, b, c]) = field.get(i + 1..i + 4)
            && [a, b, c].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = u32::from(a - b'0') * 64 + u32::from(b - b'0') * 8 + u32::from(c - b'0');
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn cgroup2_mount_from(mountinfo: &[u8]) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.split(|&b| b == b'\n') {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if sep < 6 || fields.get(sep + 1) != Some(&&b"cgroup2"[..]) {
            continue;
        }
        let (root, mount_point) = (fields[3], fields[4]);
        let path = PathBuf::from(OsString::from_vec(unescape_mountinfo(mount_point)));
        // A mount of a sub-tree (root other than "/", as inside a container without
        // cgroup namespaces) would make paths relative to the wrong directory; use one
        // only when nothing better is mounted.
        if root == b"/" {
            return Some(path);
        }
        fallback.get_or_insert(path);
    }
    fallback
}

/// Find the cgroup2 mount point from /proc/self/mountinfo (fstype "cgroup2"); on this machine
/// it is /sys/fs/cgroup/unified (hybrid), elsewhere /sys/fs/cgroup. Parse mountinfo properly
/// (the " - " separator, octal escapes like \040 in paths).
///
/// The first cgroup2 mount of the whole hierarchy (mount root "/") wins; a mount of a
/// sub-tree is returned only when there is no such mount.
#[allow(
    dead_code,
    reason = "part of the module's API; cgroup2_mount() parses bytes to keep non-UTF-8 paths"
)]
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    cgroup2_mount_from(mountinfo.as_bytes())
}

/// The cgroup2 mount point of this mount namespace, from /proc/self/mountinfo (read as
/// bytes, so non-UTF-8 mount points survive). `Ok(None)`: no cgroup2 is mounted.
pub fn cgroup2_mount() -> io::Result<Option<PathBuf>> {
    let text = read_capped(Path::new("/proc/self/mountinfo"), 16 * 1024 * 1024)?;
    Ok(cgroup2_mount_from(&text))
}

// ---------------------------------------------------------------------------------------
// Users and groups
// ---------------------------------------------------------------------------------------

/// Parses /etc/passwd (or /etc/group: both are `name:x:id:...`) into id -> name.
///
/// Comments, blank lines, NIS compat entries (`+`/`-`) and lines without a numeric id
/// are skipped; when an id appears twice the first line wins, as with getpwuid().
pub fn parse_passwd(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines() {
        if line.starts_with(['#', '+', '-']) {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let name = name.trim();
        let Ok(id) = id.trim().parse::<u32>() else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        names.entry(id).or_insert_with(|| name.to_owned());
    }
    names
}

/// What identifies a version of a file: an editor's rename changes the inode, an
/// in-place write the mtime or size.
type FileStamp = (u64, u64, Option<SystemTime>);

#[derive(Debug)]
struct NameTable {
    path: PathBuf,
    names: HashMap<u32, String>,
    stamp: Option<FileStamp>,
    checked: Option<Instant>,
}

impl NameTable {
    /// Files are read whole; anything bigger than this is not a real passwd file.
    const MAX_BYTES: u64 = 32 * 1024 * 1024;

    fn new(path: PathBuf) -> Self {
        NameTable {
            path,
            names: HashMap::new(),
            stamp: None,
            checked: None,
        }
    }

    fn lookup(&mut self, id: u32) -> Option<String> {
        if self.checked.is_none_or(|t| t.elapsed() >= Users::RECHECK) {
            self.checked = Some(Instant::now());
            self.refresh();
        }
        self.names.get(&id).cloned()
    }

    fn refresh(&mut self) {
        let stamp = fs::metadata(&self.path)
            .ok()
            .map(|m| (m.ino(), m.len(), m.modified().ok()));
        if stamp.is_some() && stamp == self.stamp {
            return;
        }
        self.stamp = stamp;
        // A missing or unreadable file means no names, not a stale table.
        self.names = read_capped(&self.path, Self::MAX_BYTES)
            .map(|bytes| parse_passwd(&String::from_utf8_lossy(&bytes)))
            .unwrap_or_default();
    }
}

/// uid/gid -> names from /etc/passwd and /etc/group, loaded once, reloaded when the file
/// changes (its inode, size or mtime; looked at most once per 5 s). Memory is bounded by
/// the files themselves, each read up to 32 MiB.
///
/// Only the files are consulted, never NSS: an LDAP or sssd lookup can block for
/// seconds, and the sensor must not. Users known only to such services have no name.
#[derive(Debug)]
pub struct Users {
    passwd: NameTable,
    group: NameTable,
}

impl Users {
    /// How long a loaded file is trusted before its stamp is looked at again.
    pub const RECHECK: Duration = Duration::from_secs(5);

    /// Names from /etc/passwd and /etc/group; nothing is read until the first lookup.
    pub fn new() -> Self {
        Self::with_paths(PathBuf::from("/etc/passwd"), PathBuf::from("/etc/group"))
    }

    /// Names from other files laid out like /etc/passwd and /etc/group.
    pub fn with_paths(passwd: PathBuf, group: PathBuf) -> Self {
        Users {
            passwd: NameTable::new(passwd),
            group: NameTable::new(group),
        }
    }

    /// The login name of `uid`, if the passwd file has one.
    pub fn user_name(&mut self, uid: u32) -> Option<String> {
        self.passwd.lookup(uid)
    }

    /// The name of group `gid`, if the group file has one.
    pub fn group_name(&mut self, gid: u32) -> Option<String> {
        self.group.lookup(gid)
    }
}

impl Default for Users {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------
// Host identity
// ---------------------------------------------------------------------------------------

/// Clock ticks per second, the unit of [`ProcStat::start_ticks`]: sysconf(_SC_CLK_TCK),
/// or 100 (the value on every Linux architecture) if sysconf fails.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn read_trimmed(path: &str) -> io::Result<String> {
    let bytes = read_capped(Path::new(path), 4096)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}

/// This boot's random id, /proc/sys/kernel/random/boot_id trimmed.
pub fn boot_id() -> io::Result<String> {
    read_trimmed("/proc/sys/kernel/random/boot_id")
}

/// The machine id: /etc/machine-id, else /var/lib/dbus/machine-id, trimmed. An empty
/// file or systemd's "uninitialized" placeholder (first boot) counts as absent.
pub fn machine_id() -> io::Result<String> {
    let mut last_err = None;
    for path in ["/etc/machine-id", "/var/lib/dbus/machine-id"] {
        match read_trimmed(path) {
            Ok(id) if !id.is_empty() && id != "uninitialized" => return Ok(id),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "machine id is not set up")))
}

/// The host name (gethostname(2), lossy UTF-8); /proc/sys/kernel/hostname if that fails,
/// and an empty string if both do.
pub fn hostname() -> String {
    // HOST_NAME_MAX is 64 on Linux; the spare room guarantees a terminating NUL.
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc == 0 {
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        return String::from_utf8_lossy(&buf[..len]).into_owned();
    }
    read_trimmed("/proc/sys/kernel/hostname").unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- stat ---------------------------------------------------------------------------

    /// A real `/proc/<pid>/stat` line with `comm` swapped in.
    fn stat_line(comm: &str) -> String {
        format!(
            "1234 ({comm}) S 1 1234 1234 0 -1 4194560 1200 0 0 0 10 5 0 0 20 0 1 0 \
             987654 12345678 900 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 \
             0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    #[test]
    fn stat_plain() {
        let st = parse_stat(&stat_line("memcached")).unwrap();
        assert_eq!(
            st,
            ProcStat {
                pid: 1234,
                comm: "memcached".into(),
                state: 'S',
                ppid: 1,
                start_ticks: 987654
            }
        );
    }

    #[test]
    fn stat_comm_with_spaces_and_parens() {
        let st = parse_stat(&stat_line("a) b (c)")).unwrap();
        assert_eq!(st.comm, "a) b (c)");
        assert_eq!(
            (st.pid, st.state, st.ppid, st.start_ticks),
            (1234, 'S', 1, 987654)
        );

        // A name that mimics the fields after it must not shift them.
        let st = parse_stat(&stat_line("x) Z 99 99 99")).unwrap();
        assert_eq!(
            (st.comm.as_str(), st.state, st.ppid),
            ("x) Z 99 99 99", 'S', 1)
        );

        assert_eq!(parse_stat(&stat_line("")).unwrap().comm, "");
        assert_eq!(parse_stat(&stat_line("(((")).unwrap().comm, "(((");
        assert_eq!(parse_stat(&stat_line(")))")).unwrap().comm, ")))");
        assert_eq!(
            parse_stat(&stat_line("kworker/0:1 H")).unwrap().comm,
            "kworker/0:1 H"
        );
    }

    #[test]
    fn stat_errors() {
        assert_eq!(
            parse_stat(""),
            Err(ParseError::NoCommStart { file: "stat" })
        );
        assert_eq!(
            parse_stat("1 (x S 1"),
            Err(ParseError::NoCommEnd { file: "stat" })
        );
        assert_eq!(
            parse_stat("1 )x( S 1"),
            Err(ParseError::NoCommEnd { file: "stat" })
        );
        assert!(matches!(
            parse_stat("abc (x) S 1"),
            Err(ParseError::BadField { .. })
        ));
        assert!(matches!(
            parse_stat("-1 (x) S 1"),
            Err(ParseError::BadField { .. })
        ));
        assert!(matches!(
            parse_stat("1 (x)"),
            Err(ParseError::MissingField {
                field: "state (3)",
                ..
            })
        ));
        assert!(matches!(
            parse_stat("1 (x) SS 1"),
            Err(ParseError::BadField { .. })
        ));
        assert!(matches!(
            parse_stat("1 (x) S"),
            Err(ParseError::MissingField {
                field: "ppid (4)",
                ..
            })
        ));
        assert!(matches!(
            parse_stat("1 (x) S 1 2 3"),
            Err(ParseError::MissingField {
                field: "starttime (22)",
                ..
            })
        ));
        let bad_start = stat_line("x").replace("987654", "98x");
        assert!(matches!(
            parse_stat(&bad_start),
            Err(ParseError::BadField { .. })
        ));
        let long = format!("{} (x) S 1", "9".repeat(10_000));
        let err = parse_stat(&long).unwrap_err().to_string();
        assert!(err.len() < 200, "{err}");
    }

    #[test]
    fn status_ids() {
        let text = "Name:\tsshd\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t1\n\
                    Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nGroups:\t4 24\n";
        assert_eq!(parse_status_ids(text), Ok((1000, 100)));
        assert!(parse_status_ids("Name:\tx\n").is_err());
        assert!(parse_status_ids("Uid:\t0\t0\t0\t0\n").is_err());
        assert!(parse_status_ids("Uid:\t\nGid:\t0\n").is_err());
        assert!(parse_status_ids("Uid:\tx\nGid:\t0\n").is_err());
    }

    // --- exe, cmdline, cgroup file --------------------------------------------------------

    #[test]
    fn deleted_suffix() {
        assert_eq!(
            split_deleted("/usr/bin/foo (deleted)"),
            ("/usr/bin/foo", true)
        );
        assert_eq!(split_deleted("/usr/bin/foo"), ("/usr/bin/foo", false));
        assert_eq!(split_deleted(" (deleted)"), (" (deleted)", false));
        assert_eq!(split_deleted("/a (deleted) b"), ("/a (deleted) b", false));
    }

    #[test]
    fn invalid_utf8_is_escaped_not_replaced() {
        assert_eq!(escape_bytes(b"nginx"), "nginx");
        assert_eq!(escape_bytes("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(escape_bytes(b"a\xffb\xc3"), "a\\xffb\\xc3");
        assert_eq!(escape_bytes(b"new\nline\x1b[31m"), "new\nline\x1b[31m");
        assert_eq!(parse_cmdline(b"x\0\xfe\0"), ["x", "\\xfe"]);
    }

    #[test]
    fn argv_is_capped_for_events() {
        // Ordinary: nothing cut.
        let raw = b"/bin/sh\0-c\0echo hi\0";
        let c = cap_argv(raw, raw.len() as u64, 3, true).unwrap();
        assert_eq!(c.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.command_line, "/bin/sh -c echo hi");
        assert!(!c.truncated);
        assert_eq!((c.original_len, c.original_args), (raw.len() as u64, 3));
        // setproctitle: no NUL at all, one argument.
        let c = cap_argv(b"nginx: worker", 13, 0, false).unwrap();
        assert_eq!((c.original_args, c.truncated), (1, false));
        assert_eq!(cap_argv(b"", 0, 0, false), None);

        // The hostile case: one 65,000-byte argument of 0xFF (each escaped to 4 bytes).
        let mut raw = b"python3\0".to_vec();
        raw.extend(std::iter::repeat_n(0xFF, 65_000));
        raw.push(0);
        let total = raw.len() as u64;
        let c = cap_argv(&raw[..ARGV_EVENT_BUDGET], total, 2, true).unwrap();
        assert!(c.truncated);
        assert_eq!((c.original_len, c.original_args), (total, 2));
        let args_bytes: usize = c.args.iter().map(String::len).sum();
        assert!(args_bytes <= ARGV_EVENT_BUDGET / 2, "{args_bytes}");
        assert!(c.command_line.len() <= ARGV_EVENT_BUDGET / 2);
        assert!(args_bytes + c.command_line.len() <= ARGV_EVENT_BUDGET);
        assert_eq!(c.args[0], "python3");
        assert!(c.args[1].starts_with("\\xff\\xff"));

        // Cuts fall on character boundaries, never inside a multi-byte character.
        let long = "é".repeat(3000);
        let c = cap_argv(long.as_bytes(), long.len() as u64, 0, false).unwrap();
        assert!(c.truncated);
        assert!(c.command_line.chars().all(|ch| ch == 'é'));
        // Many small arguments: the ones past the budget are dropped.
        let many: Vec<u8> = (0..2000).flat_map(|_| *b"ab\0").collect();
        let c = cap_argv(&many, many.len() as u64, 2000, true).unwrap();
        assert!(c.truncated);
        assert_eq!(c.original_args, 2000);
        assert!(c.args.len() < 2000);
    }

    #[test]
    fn cmdline_split() {
        assert_eq!(parse_cmdline(b""), Vec::<String>::new());
        assert_eq!(parse_cmdline(b"\0"), vec![""]);
        assert_eq!(
            parse_cmdline(b"/bin/sh\0-c\0echo hi\0"),
            vec!["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(parse_cmdline(b"a\0\0b\0"), vec!["a", "", "b"]);
        assert_eq!(parse_cmdline(b"a\0\0"), vec!["a", ""]);
        // setproctitle: no terminator at all.
        assert_eq!(
            parse_cmdline(b"nginx: worker process"),
            vec!["nginx: worker process"]
        );
        assert_eq!(parse_cmdline(b"x\xff\0"), vec!["x\\xff"]);
        let huge = vec![b'a'; CMDLINE_CAP * 2];
        let args = parse_cmdline(&huge);
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].len(), CMDLINE_CAP);
    }

    #[test]
    fn proc_cgroup_lines() {
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/a.service\n").as_deref(),
            Some("/system.slice/a.service")
        );
        let hybrid = "12:pids:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n\
                      0::/system.slice/a.service\n";
        assert_eq!(
            parse_proc_cgroup(hybrid).as_deref(),
            Some("/system.slice/a.service")
        );
        // Legacy mode: v2 says "/", name=systemd knows better.
        let legacy = "9:name=systemd:/docker/abc\n4:memory:/docker/abc\n0::/\n";
        assert_eq!(parse_proc_cgroup(legacy).as_deref(), Some("/docker/abc"));
        // Both disagree and both say something: v2 wins.
        let both = "1:name=systemd:/user.slice/x.scope\n0::/system.slice/y.service\n";
        assert_eq!(
            parse_proc_cgroup(both).as_deref(),
            Some("/system.slice/y.service")
        );
        assert_eq!(
            parse_proc_cgroup("9:name=systemd:/\n0::/\n").as_deref(),
            Some("/")
        );
        assert_eq!(
            parse_proc_cgroup("1:name=systemd:/init.scope\n").as_deref(),
            Some("/init.scope")
        );
        // Paths keep their colons.
        assert_eq!(parse_proc_cgroup("0::/a:b\n").as_deref(), Some("/a:b"));
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
        assert_eq!(parse_proc_cgroup(""), None);
        assert_eq!(parse_proc_cgroup("garbage\n"), None);
    }

    // --- cgroup paths ---------------------------------------------------------------------

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const POD: &str = "1a2b3c4d-5e6f-7a8b-9c0d-112233445566";

    fn info(unit: Option<&str>, slice: Option<&str>) -> CgroupInfo {
        CgroupInfo {
            systemd_unit: unit.map(Into::into),
            systemd_slice: slice.map(Into::into),
            ..CgroupInfo::default()
        }
    }

    fn container(
        unit: Option<&str>,
        slice: Option<&str>,
        runtime: Option<&'static str>,
        id: &str,
        pod: Option<&str>,
    ) -> CgroupInfo {
        CgroupInfo {
            container_id: Some(id.into()),
            container_runtime: runtime,
            pod_uid: pod.map(Into::into),
            ..info(unit, slice)
        }
    }

    #[test]
    fn cgroup_systemd_services() {
        let p = parse_cgroup_path;
        assert_eq!(
            p("/system.slice/memcached.service"),
            info(Some("memcached.service"), Some("system.slice"))
        );
        assert_eq!(
            p("/system.slice/system-getty.slice/getty@tty1.service"),
            info(Some("getty@tty1.service"), Some("system-getty.slice"))
        );
        assert_eq!(
            p("/user.slice/user-1000.slice/session-3.scope"),
            info(Some("session-3.scope"), Some("user-1000.slice"))
        );
        // Units under user@N.service are user N's manager's, not the system's.
        assert_eq!(
            p("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"),
            CgroupInfo {
                user_manager: Some(1000),
                ..info(Some("foo.service"), Some("app.slice"))
            }
        );
        assert_eq!(
            p("/user.slice/user-1000.slice/user@1000.service/init.scope"),
            CgroupInfo {
                user_manager: Some(1000),
                ..info(Some("init.scope"), Some("user-1000.slice"))
            }
        );
        // The manager itself, with nothing below: a system unit.
        assert_eq!(
            p("/user.slice/user-1000.slice/user@1000.service"),
            info(Some("user@1000.service"), Some("user-1000.slice"))
        );
        assert_eq!(p("/init.scope"), info(Some("init.scope"), None));
        assert_eq!(p("/system.slice"), info(None, Some("system.slice")));
        assert_eq!(
            p("/system.slice/nfs.mount"),
            info(Some("nfs.mount"), Some("system.slice"))
        );
        assert_eq!(
            p("/system.slice/foo.socket"),
            info(Some("foo.socket"), Some("system.slice"))
        );
        // Delegated sub-cgroups below a service keep the service.
        assert_eq!(
            p("/system.slice/foo.service/payload/x"),
            info(Some("foo.service"), Some("system.slice"))
        );
        // Escaped unit names stay as systemd spells them.
        assert_eq!(
            p("/system.slice/system-systemd\\x2dfsck.slice/systemd-fsck@dev-sda1.service"),
            info(
                Some("systemd-fsck@dev-sda1.service"),
                Some("system-systemd\\x2dfsck.slice")
            )
        );
    }

    #[test]
    fn cgroup_edge_cases() {
        let p = parse_cgroup_path;
        assert_eq!(p(""), CgroupInfo::default());
        assert_eq!(p("/"), CgroupInfo::default());
        assert_eq!(p("//"), CgroupInfo::default());
        assert_eq!(p("garbage"), CgroupInfo::default());
        assert_eq!(p("/a/b/c"), CgroupInfo::default());
        assert_eq!(p("/.slice/.service/.scope"), CgroupInfo::default());
        assert_eq!(p("/\u{0}\u{ffff}/\\x/../."), CgroupInfo::default());
        assert_eq!(
            p("/system.slice/memcached.service/"),
            info(Some("memcached.service"), Some("system.slice"))
        );
        assert_eq!(
            p("system.slice//memcached.service//"),
            info(Some("memcached.service"), Some("system.slice"))
        );
        assert_eq!(
            p(&format!("/system.slice/docker-{ID}.scope/")),
            container(
                Some(&format!("docker-{ID}.scope")),
                Some("system.slice"),
                Some("docker"),
                ID,
                None
            )
        );
    }

    #[test]
    fn cgroup_docker() {
        let p = parse_cgroup_path;
        let scope = format!("docker-{ID}.scope");
        assert_eq!(
            p(&format!("/system.slice/{scope}")),
            container(Some(&scope), Some("system.slice"), Some("docker"), ID, None)
        );
        assert_eq!(
            p(&format!("/docker/{ID}")),
            container(None, None, Some("docker"), ID, None)
        );
        assert_eq!(
            p(&format!("/docker/{ID}/")),
            container(None, None, Some("docker"), ID, None)
        );
        // Sub-cgroups of the container, including a systemd running inside it: its
        // units are the container's manager's, never taken for the host's.
        assert_eq!(
            p(&format!("/docker/{ID}/init.scope")),
            container(None, None, Some("docker"), ID, None)
        );
        assert_eq!(
            p(&format!("/system.slice/{scope}/system.slice/nginx.service")),
            container(Some(&scope), Some("system.slice"), Some("docker"), ID, None)
        );
        // Docker in docker: the outer (host-known) container wins.
        let inner = "f".repeat(64);
        assert_eq!(
            p(&format!("/docker/{ID}/docker/{inner}")),
            container(None, None, Some("docker"), ID, None)
        );
        // Upper-case ids come back lower-case.
        assert_eq!(
            p(&format!("/docker/{}", ID.to_uppercase())),
            container(None, None, Some("docker"), ID, None)
        );
    }

    #[test]
    fn cgroup_docker_non_matching_shapes() {
        let p = parse_cgroup_path;
        // Wrong length, not hex, no "docker" parent, wrong suffix: no id.
        assert_eq!(p(&format!("/docker/{}", &ID[..63])), CgroupInfo::default());
        assert_eq!(p(&format!("/docker/{ID}0")), CgroupInfo::default());
        assert_eq!(p(&format!("/docker/{}g", &ID[..63])), CgroupInfo::default());
        assert_eq!(p(&format!("/{ID}")), CgroupInfo::default());
        assert_eq!(p(&format!("/other/{ID}")), CgroupInfo::default());
        assert_eq!(p("/docker"), CgroupInfo::default());
        assert_eq!(
            p(&format!("/system.slice/docker-{}.scope", &ID[..12])),
            info(
                Some(&format!("docker-{}.scope", &ID[..12])),
                Some("system.slice")
            )
        );
        assert_eq!(
            p("/system.slice/docker.service"),
            info(Some("docker.service"), Some("system.slice"))
        );
        assert_eq!(
            p(&format!("/system.slice/docker-{ID}.slice")).container_id,
            None
        );
        assert_eq!(p(&format!("/system.slice/docker-{ID}")).container_id, None);
        assert_eq!(
            p(&format!("/system.slice/xdocker-{ID}.scope")).container_id,
            None
        );
    }

    #[test]
    fn cgroup_kubernetes_systemd() {
        let p = parse_cgroup_path;
        let pod_slice = POD.replace('-', "_");
        for (qos, runtime_prefix, runtime) in [
            ("burstable", "cri-containerd", "containerd"),
            ("besteffort", "cri-containerd", "containerd"),
            ("burstable", "crio", "cri-o"),
            ("besteffort", "docker", "docker"),
        ] {
            let pod_comp = format!("kubepods-{qos}-pod{pod_slice}.slice");
            let scope = format!("{runtime_prefix}-{ID}.scope");
            let path = format!("/kubepods.slice/kubepods-{qos}.slice/{pod_comp}/{scope}");
            assert_eq!(
                p(&path),
                container(Some(&scope), Some(&pod_comp), Some(runtime), ID, Some(POD)),
                "{path}"
            );
        }
        // Guaranteed QoS has no QoS slice.
        let path =
            format!("/kubepods.slice/kubepods-pod{pod_slice}.slice/cri-containerd-{ID}.scope");
        assert_eq!(p(&path).pod_uid.as_deref(), Some(POD));
        assert_eq!(p(&path).container_id.as_deref(), Some(ID));
        // The pod slice alone (no container yet): pod uid, no container.
        let pod_only = p(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_slice}.slice"
        ));
        assert_eq!(pod_only.pod_uid.as_deref(), Some(POD));
        assert_eq!(pod_only.container_id, None);
        // The conmon of cri-o is not the container.
        let conmon = p(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_slice}.slice/crio-conmon-{ID}.scope"
        ));
        assert_eq!(conmon.container_id, None);
        assert_eq!(conmon.pod_uid.as_deref(), Some(POD));
        assert_eq!(conmon.systemd_unit, Some(format!("crio-conmon-{ID}.scope")));
        // Static pods have a 32-hex uid.
        let static_uid = "6d4d3b0c7ba04a54a3d8c0b9d1e0b4d1";
        let st = p(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{static_uid}.slice/cri-containerd-{ID}.scope"
        ));
        assert_eq!(st.pod_uid.as_deref(), Some(static_uid));
        // Not a uid: no pod.
        assert_eq!(
            p("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podxyz.slice").pod_uid,
            None
        );
        assert_eq!(p("/kubepods.slice/kubepods-burstable.slice").pod_uid, None);
    }

    #[test]
    fn cgroup_kubernetes_cgroupfs() {
        let p = parse_cgroup_path;
        for qos in ["burstable/", "besteffort/", ""] {
            let path = format!("/kubepods/{qos}pod{POD}/{ID}");
            assert_eq!(
                p(&path),
                container(None, None, None, ID, Some(POD)),
                "{path}"
            );
        }
        assert_eq!(
            p(&format!("/kubepods/burstable/pod{POD}/crio-{ID}")),
            container(None, None, Some("cri-o"), ID, Some(POD))
        );
        assert_eq!(
            p(&format!("/kubepods/burstable/pod{POD}/crio-conmon-{ID}")).container_id,
            None
        );
        // A pod-looking or id-looking component elsewhere is nothing.
        assert_eq!(
            p(&format!("/pods/burstable/pod{POD}/{ID}")),
            CgroupInfo::default()
        );
        assert_eq!(
            p(&format!("/kubepods/burstable/x/pod{POD}/{ID}")),
            CgroupInfo::default()
        );
        assert_eq!(
            p(&format!("/kubepods/burstable/pod{POD}/sub/{ID}")),
            CgroupInfo {
                pod_uid: Some(POD.into()),
                ..CgroupInfo::default()
            }
        );
        assert_eq!(
            p(&format!("/kubepods/burstable/podnotauid/{ID}")),
            CgroupInfo::default()
        );
    }

    #[test]
    fn cgroup_podman() {
        let p = parse_cgroup_path;
        let scope = format!("libpod-{ID}.scope");
        assert_eq!(
            p(&format!("/machine.slice/{scope}")),
            container(
                Some(&scope),
                Some("machine.slice"),
                Some("podman"),
                ID,
                None
            )
        );
        assert_eq!(
            p(&format!("/machine.slice/{scope}/container")),
            container(
                Some(&scope),
                Some("machine.slice"),
                Some("podman"),
                ID,
                None
            )
        );
        // Rootless podman lives in user 1000's delegated tree, where user 1000 can make
        // a "libpod-<hex>.scope" of any name: a user unit, not a container id.
        assert_eq!(
            p(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/{scope}"
            )),
            CgroupInfo {
                user_manager: Some(1000),
                ..info(Some(&scope), Some("user.slice"))
            }
        );
        let conmon = format!("libpod-conmon-{ID}.scope");
        assert_eq!(
            p(&format!("/machine.slice/{conmon}")),
            info(Some(&conmon), Some("machine.slice"))
        );
        assert_eq!(
            p(&format!("/libpod_parent/libpod-{ID}")),
            container(None, None, Some("podman"), ID, None)
        );
        assert_eq!(
            p(&format!("/libpod_parent/libpod-conmon-{ID}")),
            CgroupInfo::default()
        );
    }

    #[test]
    fn cgroup_names_a_user_makes_are_not_system_units_or_containers() {
        let p = parse_cgroup_path;
        let user = "/user.slice/user-1000.slice/user@1000.service";
        // systemd-run --user --unit=ssh: a user unit called ssh.service.
        let ssh = p(&format!("{user}/app.slice/ssh.service"));
        assert_eq!(ssh.systemd_unit.as_deref(), Some("ssh.service"));
        assert_eq!(ssh.user_manager, Some(1000));
        // Deeper names under the user's unit do not replace it.
        let deep = p(&format!("{user}/app.slice/a.service/redis-server.service"));
        assert_eq!(deep.systemd_unit.as_deref(), Some("a.service"));
        assert_eq!(deep.user_manager, Some(1000));
        // Container shapes a user made: no container.
        for fake in [
            format!("{user}/lxc.payload.web"),
            format!("{user}/app.slice/lxc.payload.web"),
            format!("{user}/docker-{ID}.scope"),
            format!("{user}/docker/{ID}"),
            format!("{user}/machine.slice/machine-web.scope"),
            format!("{user}/kubepods/pod0123abcd-0123-4567-89ab-0123456789ab/{ID}"),
            "/system.slice/foo.service/lxc.payload.web".to_owned(),
            format!("/system.slice/foo.service/docker-{ID}.scope"),
            "/x/lxc.payload.web".to_owned(),
            format!("/x/docker/{ID}"),
        ] {
            let i = p(&fake);
            assert_eq!(i.container_id, None, "{fake}");
            assert_eq!(i.container_runtime, None, "{fake}");
        }
        // Below a system service (Delegate=yes): the service owns the process.
        let delegated = p("/system.slice/app.service/payload/ssh.service");
        assert_eq!(delegated.systemd_unit.as_deref(), Some("app.service"));
        assert_eq!(delegated.user_manager, None);
        // "user@" that is not a uid is just a system unit name.
        assert_eq!(
            p("/system.slice/user@x.service/a.service").user_manager,
            None
        );
        // systemd-nspawn, under machined's own slice, with its name escaping.
        let m = p("/machine.slice/machine-web\\x2d1.scope/payload/system.slice/x.service");
        assert_eq!(m.container_id.as_deref(), Some("web-1"));
        assert_eq!(m.container_runtime, Some("systemd-nspawn"));
        assert_eq!(m.systemd_unit.as_deref(), Some("machine-web\\x2d1.scope"));
        assert_eq!(p("/machine.slice/machine-a\x1b.scope").container_id, None);
        // LXC names in LXC's own format only.
        assert_eq!(
            p("/lxc.payload.web_1.x").container_id.as_deref(),
            Some("web_1.x")
        );
        assert_eq!(p("/lxc.payload.-x").container_id, None);
        assert_eq!(p("/lxc.payload.a b").container_id, None);
        assert_eq!(
            p(&format!("/lxc.payload.{}", "a".repeat(65))).container_id,
            None
        );
    }

    #[test]
    fn socket_unit_files() {
        let rpcbind = "[Socket]\nListenStream=/run/rpcbind.sock\nListenStream=0.0.0.0:111\n\
                       ListenDatagram=0.0.0.0:111\nListenStream=[::]:111\n";
        assert!(socket_unit_listens(rpcbind, 111, false));
        assert!(socket_unit_listens(rpcbind, 111, true));
        assert!(!socket_unit_listens(rpcbind, 11, false));
        assert!(socket_unit_listens(" ListenStream = 22 \n", 22, false));
        assert!(!socket_unit_listens("ListenStream=22\n", 22, true));
        assert!(!socket_unit_listens("ListenStream=/run/22\n", 22, false));
        assert!(!socket_unit_listens("ListenStream=vsock:2:22\n", 22, false));
        assert!(!socket_unit_listens("# ListenStream=22\n", 22, false));
    }

    #[test]
    fn cgroup_cri_o_and_lxc() {
        let p = parse_cgroup_path;
        let scope = format!("crio-{ID}.scope");
        assert_eq!(
            p(&format!("/system.slice/{scope}")),
            container(Some(&scope), Some("system.slice"), Some("cri-o"), ID, None)
        );
        assert_eq!(
            p(&format!("/system.slice/nerdctl-{ID}.scope")).container_runtime,
            Some("containerd")
        );
        assert_eq!(
            p("/lxc.payload.web1"),
            container(None, None, Some("lxc"), "web1", None)
        );
        assert_eq!(
            p("/lxc.payload.web1/system.slice/nginx.service"),
            container(None, None, Some("lxc"), "web1", None)
        );
        assert_eq!(
            p("/lxc/web1/init.scope"),
            container(None, None, Some("lxc"), "web1", None)
        );
        assert_eq!(p("/lxc.monitor.web1"), CgroupInfo::default());
        assert_eq!(p("/lxc.payload."), CgroupInfo::default());
        assert_eq!(p("/lxc.payload.a\x1b[2J"), CgroupInfo::default());
        assert_eq!(p("/lxc/\n"), CgroupInfo::default());
        assert_eq!(p("/x/lxc/web1"), CgroupInfo::default());
    }

    // --- mountinfo ------------------------------------------------------------------------

    const HYBRID: &str = "\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
";

    const PURE_V2: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
26 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
30 26 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn mountinfo_hybrid_and_v2() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // No optional fields at all.
        assert_eq!(
            parse_cgroup2_mount(
                "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
            ),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // Several optional fields.
        assert_eq!(
            parse_cgroup2_mount(
                "41 31 0:38 / /cg rw shared:1 master:2 propagate_from:3 - cgroup2 none rw"
            ),
            Some(PathBuf::from("/cg"))
        );
    }

    #[test]
    fn mountinfo_escapes_and_edges() {
        let escaped = "50 22 0:40 / /mnt/my\\040cgroup\\011x\\134y rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cgroup\tx\\y"))
        );
        // Not an escape: kept as is.
        assert_eq!(
            parse_cgroup2_mount("50 22 0:40 / /mnt/a\\9b\\04 rw - cgroup2 cgroup2 rw"),
            Some(PathBuf::from("/mnt/a\\9b\\04"))
        );
        // A sub-tree mount is used only without a full one.
        let sub = "60 22 0:40 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(sub),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let both = format!("{sub}61 22 0:40 / /host/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(
            parse_cgroup2_mount(&both),
            Some(PathBuf::from("/host/cgroup"))
        );
        // v1 only, "cgroup2" in the wrong column, garbage.
        assert_eq!(
            parse_cgroup2_mount(&HYBRID.replace("cgroup2 cgroup2", "cgroup cgroup")),
            None
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / /cgroup2 rw - tmpfs cgroup2 rw"),
            None
        );
        assert_eq!(parse_cgroup2_mount("- cgroup2"), None);
        assert_eq!(parse_cgroup2_mount("1 2 3 - cgroup2 x y"), None);
        assert_eq!(parse_cgroup2_mount(""), None);
        assert_eq!(parse_cgroup2_mount("\n\n \\\\ - - -"), None);
    }

    #[test]
    fn unescape_octal() {
        assert_eq!(unescape_mountinfo(b"a\\040b"), b"a b");
        assert_eq!(unescape_mountinfo(b"\\012"), b"\n");
        assert_eq!(unescape_mountinfo(b"\\777"), b"\\777");
        assert_eq!(unescape_mountinfo(b"end\\"), b"end\\");
        assert_eq!(unescape_mountinfo(b"\\\\040"), b"\\ ");
    }

    // --- passwd ---------------------------------------------------------------------------

    #[test]
    fn passwd_and_group() {
        let passwd = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin

memcache:x:104:110:Memcached,,,:/nonexistent:/bin/false
dup:x:104:110::/:/bin/false
+nisuser::::::
-baduser:x:5:5::/:
:x:7:7::/:
broken:x:notanumber:1::/:
short:x
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
big:x:4294967295:1::/:
";
        let m = parse_passwd(passwd);
        assert_eq!(m.get(&0).map(String::as_str), Some("root"));
        assert_eq!(m.get(&1).map(String::as_str), Some("daemon"));
        assert_eq!(m.get(&104).map(String::as_str), Some("memcache"));
        assert_eq!(m.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(m.get(&u32::MAX).map(String::as_str), Some("big"));
        assert_eq!(m.get(&5), None);
        assert_eq!(m.get(&7), None);
        assert_eq!(m.len(), 5);

        let group = "root:x:0:\nsudo:x:27:alice,bob\nusers:x:100:\n";
        let g = parse_passwd(group);
        assert_eq!(g.get(&27).map(String::as_str), Some("sudo"));
        assert_eq!(g.len(), 3);
        assert!(parse_passwd("").is_empty());
        assert!(parse_passwd("\u{0}:::\n::::").is_empty());
    }

    /// A scratch directory removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("pw-procfs-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn users_reload_on_change() {
        let dir = TempDir::new("users");
        let passwd = dir.0.join("passwd");
        let group = dir.0.join("group");
        fs::write(&passwd, "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(&group, "wheel:x:10:\n").unwrap();
        let mut users = Users::with_paths(passwd.clone(), group.clone());
        assert_eq!(users.user_name(0).as_deref(), Some("root"));
        assert_eq!(users.user_name(1000), None);
        assert_eq!(users.group_name(10).as_deref(), Some("wheel"));

        // A change inside the 5 s window is not seen yet...
        let tmp = dir.0.join("passwd.new");
        fs::write(
            &tmp,
            "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        fs::rename(&tmp, &passwd).unwrap();
        assert_eq!(users.user_name(1000), None);
        // ...and is once the window is over.
        users.passwd.checked = Instant::now().checked_sub(Users::RECHECK);
        assert_eq!(users.user_name(1000).as_deref(), Some("alice"));

        // A vanished file empties the table.
        fs::remove_file(&group).unwrap();
        users.group.checked = Instant::now().checked_sub(Users::RECHECK);
        assert_eq!(users.group_name(10), None);

        let mut none = Users::with_paths(dir.0.join("nope"), dir.0.join("nope2"));
        assert_eq!(none.user_name(0), None);
    }

    // --- resolver on a plain directory tree -------------------------------------------------

    fn ino(path: &Path) -> u64 {
        fs::symlink_metadata(path).unwrap().ino()
    }

    #[test]
    fn resolver_walks_without_following_symlinks() {
        let outside = TempDir::new("outside");
        fs::create_dir_all(outside.0.join("secret")).unwrap();
        let tree = TempDir::new("tree");
        fs::create_dir_all(tree.0.join("system.slice/a.service/sub")).unwrap();
        fs::create_dir_all(tree.0.join("user.slice")).unwrap();
        fs::write(tree.0.join("system.slice/cgroup.procs"), "").unwrap();
        std::os::unix::fs::symlink(&outside.0, tree.0.join("link")).unwrap();
        std::os::unix::fs::symlink(tree.0.join("system.slice"), tree.0.join("loop")).unwrap();

        let mut r = CgroupResolver::with_limits(tree.0.clone(), 100, Duration::ZERO);
        assert_eq!(r.path(ino(&tree.0)).as_deref(), Some("/"));
        assert_eq!(
            r.path(ino(&tree.0.join("system.slice/a.service/sub")))
                .as_deref(),
            Some("/system.slice/a.service/sub")
        );
        assert_eq!(
            r.path(ino(&tree.0.join("user.slice"))).as_deref(),
            Some("/user.slice")
        );
        assert_eq!(r.path(ino(&outside.0.join("secret"))), None);
        assert_eq!(r.path(ino(&outside.0)), None);
        assert_eq!(r.path(ino(&tree.0.join("system.slice/cgroup.procs"))), None);
        assert_eq!(r.cache.len(), 5);

        // Deleted directories drop out on the next walk.
        fs::remove_dir(tree.0.join("user.slice")).unwrap();
        assert_eq!(r.path(u64::MAX), None);
        assert_eq!(r.cache.len(), 4);

        // A missing mount resolves nothing.
        let mut gone = CgroupResolver::new(tree.0.join("does-not-exist"));
        assert_eq!(gone.path(1), None);
    }

    #[test]
    fn resolver_capacity_and_rate_limit() {
        let tree = TempDir::new("cap");
        for i in 0..20 {
            fs::create_dir_all(tree.0.join(format!("d{i}"))).unwrap();
        }
        let last = tree.0.join("d19");
        let mut r = CgroupResolver::with_limits(tree.0.clone(), 5, Duration::from_secs(3600));
        // Whatever order the walk finds them in, the one asked for is kept.
        assert_eq!(r.path(ino(&last)).as_deref(), Some("/d19"));
        assert_eq!(r.cache.len(), 5);

        // Inside the interval a miss does not walk: a new directory stays unknown.
        fs::create_dir(tree.0.join("new")).unwrap();
        assert_eq!(r.path(ino(&tree.0.join("new"))), None);
        // Hits are still served.
        assert_eq!(r.path(ino(&last)).as_deref(), Some("/d19"));
        r.last_walk = Instant::now().checked_sub(Duration::from_secs(3600));
        assert_eq!(r.path(ino(&tree.0.join("new"))).as_deref(), Some("/new"));

        let mut tiny = CgroupResolver::with_limits(tree.0.clone(), 1, Duration::ZERO);
        assert_eq!(tiny.path(ino(&last)).as_deref(), Some("/d19"));
        assert_eq!(tiny.cache.len(), 1);
    }

    // --- live, on this machine --------------------------------------------------------------

    #[test]
    fn live_self_stat_exe_cmdline_ids() {
        let pid = std::process::id();
        let st = read_stat(pid).unwrap();
        assert_eq!(st.pid, pid);
        assert!(!st.comm.is_empty());
        assert!(st.start_ticks > 0);
        // SAFETY: getppid has no preconditions.
        assert_eq!(st.ppid, u32::try_from(unsafe { libc::getppid() }).unwrap());

        let exe = read_exe(pid).unwrap();
        let me = std::env::current_exe().unwrap();
        assert_eq!(exe, me.to_string_lossy());
        assert_eq!(read_exe_deleted(pid).unwrap(), (exe, false));

        let args = read_cmdline(pid).unwrap();
        let expected: Vec<String> = std::env::args().collect();
        assert_eq!(args, expected);

        // SAFETY: getuid and getgid have no preconditions.
        let ids = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(read_ids(pid).unwrap(), ids);

        assert!(read_stat(u32::MAX).is_err());
    }

    #[test]
    fn live_kernel_thread() {
        // kthreadd (pid 2) has no executable and an empty command line, when it is
        // visible at all (not in a pid namespace).
        let Ok(st) = read_stat(2) else { return };
        if st.comm != "kthreadd" {
            return;
        }
        assert!(read_exe(2).is_err());
        assert_eq!(read_cmdline(2).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn live_cgroup_resolver_finds_own_cgroup() {
        let mount = cgroup2_mount()
            .unwrap()
            .expect("a cgroup2 mount on this machine");
        let own = read_cgroup(std::process::id()).unwrap();
        let dir = mount.join(own.trim_start_matches('/'));
        let id = ino(&dir);
        let mut r = CgroupResolver::new(mount.clone());
        assert_eq!(r.path(id).as_deref(), Some(own.as_str()));
        assert_eq!(parse_cgroup_path(&own).container_id, None);
    }

    #[test]
    fn live_cgroup_resolver_finds_new_child() {
        // Creating a cgroup needs root and a writable cgroup2 mount; skip quietly
        // elsewhere rather than fail.
        let Ok(Some(mount)) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let name = format!("pw-procfs-test-{}", std::process::id());
        let dir = mount.join(&name);
        if let Err(e) = fs::create_dir(&dir) {
            eprintln!("skipped: cannot create {}: {e}", dir.display());
            return;
        }
        struct Rmdir(PathBuf);
        impl Drop for Rmdir {
            fn drop(&mut self) {
                let _ = fs::remove_dir(&self.0);
            }
        }
        let _guard = Rmdir(dir.clone());
        let mut r = CgroupResolver::new(mount);
        assert_eq!(r.path(ino(&dir)), Some(format!("/{name}")));
    }

    #[test]
    fn live_host_identity() {
        assert!(clock_ticks_per_sec() > 0);
        let boot = boot_id().unwrap();
        assert_eq!(boot.len(), 36, "{boot}");
        if let Ok(id) = machine_id() {
            assert!(!id.is_empty());
            assert_eq!(id.trim(), id);
        }
        let host = hostname();
        assert!(!host.is_empty());
        assert_eq!(host, read_trimmed("/proc/sys/kernel/hostname").unwrap());
    }
}
