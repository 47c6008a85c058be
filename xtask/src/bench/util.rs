//! Clocks, /proc readings, BPF program statistics, percentiles, RFC 3339 parsing.

use std::{collections::BTreeSet, fs, path::Path};

use serde::Serialize;

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Run the calling thread at nice -5, the priority the agent gives itself by default: the
/// bench's readers of the tools' output must not be starved by the load generators, or
/// their own scheduling delay would be counted as the tool's latency.
pub fn reader_priority() {
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -5);
    }
}

pub fn realtime_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// Same clock as bpf_ktime_get_ns() (bpftrace's `nsecs`).
pub fn monotonic_ns() -> i64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces or ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck())
}

/// Peak resident set size (VmHWM), KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Ids of the BPF programs a process holds (program fds and bpf_link fds).
pub fn bpf_prog_ids(pid: u32) -> Vec<u32> {
    let mut ids = BTreeSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    for e in dir.flatten() {
        let Ok(s) = fs::read_to_string(e.path()) else {
            continue;
        };
        for l in s.lines() {
            if let Some(v) = l.strip_prefix("prog_id:")
                && let Ok(id) = v.trim().parse()
            {
                ids.insert(id);
            }
        }
    }
    ids.into_iter().collect()
}

/// How many bpf_link file descriptors a process holds (attached programs).
pub fn bpf_link_count(pid: u32) -> usize {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    dir.flatten()
        .filter(|e| fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf_link"))
        .count()
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgSample {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Run statistics of the given programs (kernel.bpf_stats_enabled must be on for them
/// to move).
pub fn prog_samples(ids: &[u32]) -> Vec<ProgSample> {
    let mut out = Vec::new();
    if ids.is_empty() {
        return out;
    }
    for info in aya::programs::loaded_programs().flatten() {
        if !ids.contains(&info.id()) {
            continue;
        }
        out.push(ProgSample {
            id: info.id(),
            name: String::from_utf8_lossy(info.name()).into_owned(),
            run_time_ns: info.run_time().as_nanos() as u64,
            run_cnt: info.run_count(),
        });
    }
    out
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgCost {
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
    pub ns_per_run: Option<f64>,
}

pub fn prog_costs(before: &[ProgSample], after: &[ProgSample]) -> Vec<ProgCost> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            let runs = a.run_cnt - b.map_or(0, |b| b.run_cnt);
            let t = a.run_time_ns - b.map_or(0, |b| b.run_time_ns);
            ProgCost {
                name: a.name.clone(),
                runs,
                run_time_ns: t,
                ns_per_run: (runs > 0).then(|| t as f64 / runs as f64),
            }
        })
        .collect()
}

/// Keeps BPF run-time statistics on while alive. Uses BPF_ENABLE_STATS (the same switch
/// as the sysctl kernel.bpf_stats_enabled, reverted by the kernel when the fd closes,
/// even if the bench dies); falls back to writing the sysctl and restoring it.
pub enum StatsGuard {
    Fd(#[allow(dead_code)] std::os::fd::OwnedFd),
    Sysctl(String),
}

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl StatsGuard {
    pub fn enable() -> anyhow::Result<StatsGuard> {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Ok(StatsGuard::Fd(fd)),
            Err(e) => {
                let old = fs::read_to_string(STATS_SYSCTL)
                    .map_err(|e2| anyhow::anyhow!("BPF_ENABLE_STATS: {e}; {STATS_SYSCTL}: {e2}"))?;
                fs::write(STATS_SYSCTL, "1")?;
                Ok(StatsGuard::Sysctl(old.trim().to_string()))
            }
        }
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let StatsGuard::Sysctl(old) = self {
            let _ = fs::write(STATS_SYSCTL, old.as_bytes());
        }
    }
}

/// Latency percentiles, microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Pcts {
    pub n: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Nearest-rank percentiles of nanosecond samples (sorts in place).
pub fn pcts(v: &mut [i64]) -> Option<Pcts> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    let at = |p: f64| {
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
        v[rank - 1] as f64 / 1e3
    };
    Some(Pcts {
        n: n as u64,
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: v[n - 1] as f64 / 1e3,
    })
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` to nanoseconds since the epoch.
pub fn parse_rfc3339_ns(s: &[u8]) -> Option<i64> {
    fn num(s: &[u8]) -> Option<i64> {
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0i64, |a, c| a * 10 + i64::from(c - b'0')))
    }
    if s.len() < 20 || s[4] != b'-' || s[7] != b'-' || !matches!(s[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(&s[0..4])?, num(&s[5..7])?, num(&s[8..10])?);
    let (h, mi, se) = (num(&s[11..13])?, num(&s[14..16])?, num(&s[17..19])?);
    let mut i = 19;
    let mut frac_ns = 0i64;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        let mut scale = 100_000_000i64;
        for c in digits.iter().take(9) {
            frac_ns += i64::from(c - b'0') * scale;
            scale /= 10;
        }
    }
    let offset_s = match s.get(i)? {
        b'Z' | b'z' => 0,
        c @ (b'+' | b'-') => {
            let t = s.get(i + 1..i + 6)?;
            let off = num(&t[0..2])? * 3600 + num(&t[3..5])? * 60;
            if *c == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    Some(secs * 1_000_000_000 + frac_ns)
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn read_tail(path: &Path, max: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ns(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns(b"1970-01-01T00:00:01.5Z"),
            Some(1_500_000_000)
        );
        assert_eq!(
            parse_rfc3339_ns(b"2026-11-26T23:21:35.123456789Z"),
            Some(1_795_735_295_123_456_789)
        );
        assert_eq!(
            parse_rfc3339_ns(b"2026-11-27T00:21:35.123456789+01:00"),
            Some(1_795_735_295_123_456_789)
        );
        assert_eq!(parse_rfc3339_ns(b"garbage"), None);
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<i64> = (1..=1000).map(|x| x * 1000).collect();
        let p = pcts(&mut v).unwrap();
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p999_us, 999.0);
        assert_eq!(p.max_us, 1000.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
