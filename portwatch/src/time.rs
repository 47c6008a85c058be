//! Time for events: kernel timestamps (monotonic and boot time) turned into wall-clock
//! time, and the RFC 3339 text every destination writes.

use std::cell::Cell;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Converts kernel clocks to wall-clock time. Refreshed periodically so NTP steps are
/// followed; the offsets are sampled back to back, so their error is well under 1 µs.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    /// realtime - monotonic, ns.
    mono_to_wall: i128,
    /// realtime - boottime, ns: wall time of boot.
    boot_wall_ns: i128,
}

impl Clocks {
    pub fn now() -> Clocks {
        let real = clock_ns(libc::CLOCK_REALTIME) as i128;
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as i128;
        let boot = clock_ns(libc::CLOCK_BOOTTIME) as i128;
        Clocks {
            mono_to_wall: real - mono,
            boot_wall_ns: real - boot,
        }
    }

    /// Wall-clock ns since the epoch for a `bpf_ktime_get_ns()` value.
    pub fn wall_from_ktime(&self, ktime_ns: u64) -> i128 {
        ktime_ns as i128 + self.mono_to_wall
    }

    /// Wall-clock ns since the epoch for a time since boot (e.g. a task's start).
    pub fn wall_from_boottime(&self, boot_ns: u64) -> i128 {
        boot_ns as i128 + self.boot_wall_ns
    }
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-26T23:05:59.123456789Z`.
pub fn rfc3339(wall_ns: i128) -> String {
    match fast_rfc3339(wall_ns) {
        Some(b) => b.iter().map(|&c| char::from(c)).collect(),
        None => rfc3339_slow(wall_ns),
    }
}

/// [`rfc3339`], appended to `out` (the JSON writer's path: no allocation).
pub fn write_rfc3339(out: &mut Vec<u8>, wall_ns: i128) {
    match fast_rfc3339(wall_ns) {
        Some(b) => out.extend_from_slice(&b),
        None => out.extend_from_slice(rfc3339_slow(wall_ns).as_bytes()),
    }
}

/// The common case (years 0-9999), ASCII.
fn fast_rfc3339(wall_ns: i128) -> Option<[u8; 30]> {
    // Two per event on the hot path: `format!` took a fifth of the agent's CPU at full
    // listener churn (perf). The date and time of day change once a second, so they are
    // kept per thread; the nanoseconds are written digit by digit.
    thread_local! {
        static SECOND: Cell<(i64, Option<[u8; 19]>)> = const { Cell::new((i64::MIN, None)) };
    }
    let ns = i64::try_from(wall_ns).ok()?;
    let secs = ns.div_euclid(1_000_000_000);
    let prefix = SECOND.with(|c| match c.get() {
        (s, p) if s == secs => p,
        _ => {
            let p = second_prefix(secs);
            c.set((secs, p));
            p
        }
    })?;
    let mut b = *b"0000-00-00T00:00:00.000000000Z";
    b[..19].copy_from_slice(&prefix);
    put_digits(&mut b[20..29], ns.rem_euclid(1_000_000_000) as u64);
    Some(b)
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since the epoch; `None` outside years 0-9999.
fn second_prefix(secs: i64) -> Option<[u8; 19]> {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    if !(0..=9999).contains(&y) {
        return None;
    }
    let sod = secs.rem_euclid(86_400);
    let mut b = *b"0000-00-00T00:00:00";
    put_digits(&mut b[0..4], y as u64);
    put_digits(&mut b[5..7], u64::from(m));
    put_digits(&mut b[8..10], u64::from(d));
    put_digits(&mut b[11..13], (sod / 3600) as u64);
    put_digits(&mut b[14..16], (sod / 60 % 60) as u64);
    put_digits(&mut b[17..19], (sod % 60) as u64);
    Some(b)
}

/// `v` in decimal, right-aligned and zero-padded to fill `out`.
fn put_digits(out: &mut [u8], mut v: u64) {
    for c in out.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Any instant, years past 9999 and before 0 included.
fn rfc3339_slow(wall_ns: i128) -> String {
    let secs = wall_ns.div_euclid(1_000_000_000) as i64;
    let nanos = wall_ns.rem_euclid(1_000_000_000);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian, days since 1970-01-01).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_digit_writer_matches_format() {
        let slow = rfc3339_slow;
        // A spread of instants from 1970 to past 9999 (the format! fallback) and before.
        let mut t: i128 = 1;
        while t < 300_000_000_000_000_000_000 {
            for v in [t, -t] {
                assert_eq!(rfc3339(v), slow(v), "{v}");
            }
            t = t * 3 / 2 + 987_654_321_987;
        }
        // Within one second (the cached date and time), and across its edges.
        let base: i128 = 1_795_734_359_000_000_000;
        for v in [
            base - 1,
            base,
            base + 1,
            base + 999_999_999,
            base + 1_000_000_000,
        ] {
            assert_eq!(rfc3339(v), slow(v), "{v}");
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (leap day) 12:34:56.000000789
        assert_eq!(
            rfc3339(951_827_696_000_000_789),
            "2000-02-29T12:34:56.000000789Z"
        );
        assert_eq!(
            rfc3339(1_795_734_359_123_456_789),
            "2026-11-26T23:05:59.123456789Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn clocks_map_now_to_now() {
        let c = Clocks::now();
        let wall = c.wall_from_ktime(monotonic_ns());
        let real = clock_ns(libc::CLOCK_REALTIME) as i128;
        assert!(
            (real - wall).abs() < 50_000_000,
            "offset off by {} ns",
            real - wall
        );
    }
}
