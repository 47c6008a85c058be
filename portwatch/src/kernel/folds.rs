//! Reading the kernel's folds (see portwatch-ebpf/src/deliver.rs) into reports.
//!
//! The kernel only adds to a fold; this side remembers what it reported of each one and
//! turns the differences into `listeners-folded` events: at most one per fold per tick
//! (one second), and a final one once the process stops churning or is gone. A fold whose
//! process has been gone for two reports in a row is deleted from the kernel map after its
//! final report (the grace catches a last end counted just as the process was reaped):
//! nothing can
//! add to it any more, so no count is lost by the delete.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use portwatch_common::{
    FOLD_BY_PROCESS, FOLD_BY_USER, FOLD_PORT_WORDS, Fold, FoldKey, SCOPE_LOOPBACK, SCOPE_WILDCARD,
};

/// A fold that has not grown for this long is reported as final.
pub const FOLD_QUIET: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Seen {
    started: u64,
    ended: u64,
    changed: Option<Instant>,
    final_sent: bool,
    /// Reports in a row that found the process gone.
    gone_seen: u8,
}

/// One `listeners-folded` report to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: FoldKey,
    pub started: u64,
    pub ended: u64,
    pub started_total: u64,
    pub ended_total: u64,
    pub final_: bool,
}

/// What was reported of each fold.
#[derive(Default)]
pub struct Folds {
    seen: HashMap<FoldKey, Seen>,
}

impl Folds {
    /// Compare the kernel's folds with what was reported. `alive` tells whether the fold's
    /// process still runs; `last` makes every report final (the agent stops). Returns the
    /// reports to write, then the folds to delete from the kernel once they are written
    /// (process gone, final report made: nothing can add to them any more).
    pub fn reports(
        &mut self,
        kernel: &[(FoldKey, &Fold)],
        now: Instant,
        last: bool,
        mut alive: impl FnMut(&FoldKey) -> bool,
    ) -> (Vec<Report>, Vec<FoldKey>) {
        let mut out = Vec::new();
        let mut delete = Vec::new();
        for (key, fold) in kernel {
            let seen = self.seen.entry(*key).or_default();
            let changed = fold.started != seen.started || fold.ended != seen.ended;
            if changed {
                seen.changed = Some(now);
                seen.final_sent = false;
            }
            let gone = !alive(key);
            seen.gone_seen = if gone {
                seen.gone_seen.saturating_add(1)
            } else {
                0
            };
            let quiet = seen
                .changed
                .is_none_or(|t| now.duration_since(t) >= FOLD_QUIET);
            let final_ = last || gone || (quiet && !changed);
            if changed || (final_ && !seen.final_sent) {
                out.push(Report {
                    key: *key,
                    started: fold.started - seen.started.min(fold.started),
                    ended: fold.ended - seen.ended.min(fold.ended),
                    started_total: fold.started,
                    ended_total: fold.ended,
                    final_,
                });
                seen.started = fold.started;
                seen.ended = fold.ended;
                seen.final_sent = final_;
            }
            if seen.gone_seen >= 2 && seen.final_sent && !changed {
                delete.push(*key);
            }
        }
        // Folds the kernel no longer has. One about to be deleted is forgotten once the
        // kernel no longer lists it: a delete that fails is retried next time, and the
        // fold is not reported again as if it were new.
        self.seen
            .retain(|k, _| kernel.iter().any(|(key, _)| key == k));
        (out, delete)
    }
}

/// Every start of `key`'s process that was folded: its folds' starts, added up (the
/// kernel counts a folded start only in its fold).
pub fn process_folded(kernel: &[(FoldKey, &Fold)], key: &FoldKey) -> u64 {
    kernel
        .iter()
        .filter(|(k, _)| k.tgid == key.tgid && k.start_boottime_ns == key.start_boottime_ns)
        .map(|(_, f)| f.started)
        .sum()
}

pub fn scope_name(scope: u16) -> &'static str {
    match scope {
        SCOPE_LOOPBACK => "loopback",
        SCOPE_WILDCARD => "wildcard",
        _ => "address",
    }
}

pub fn budget_names(reason: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    if reason & FOLD_BY_PROCESS != 0 {
        v.push("process");
    }
    if reason & FOLD_BY_USER != 0 {
        v.push("user");
    }
    v
}

/// The ports whose bit is set, in order.
pub fn ports(bits: &[u64; FOLD_PORT_WORDS]) -> impl Iterator<Item = u16> + '_ {
    bits.iter().enumerate().flat_map(|(w, &word)| {
        (0..64u32)
            .filter(move |b| word & (1u64 << b) != 0)
            .map(move |b| (w as u32 * 64 + b) as u16)
    })
}

/// The set as ranges, `"1-3,7,9-10"`, and how many ports it holds.
pub fn ranges(bits: &[u64; FOLD_PORT_WORDS]) -> (String, u32) {
    let mut out = String::new();
    let mut count = 0u32;
    let mut run: Option<(u16, u16)> = None;
    let flush = |out: &mut String, (lo, hi): (u16, u16)| {
        if !out.is_empty() {
            out.push(',');
        }
        if lo == hi {
            out.push_str(&lo.to_string());
        } else {
            out.push_str(&format!("{lo}-{hi}"));
        }
    };
    for p in ports(bits) {
        count += 1;
        run = match run {
            Some((lo, hi)) if u32::from(hi) + 1 == u32::from(p) => Some((lo, p)),
            Some(r) => {
                flush(&mut out, r);
                Some((p, p))
            }
            None => Some((p, p)),
        };
    }
    if let Some(r) = run {
        flush(&mut out, r);
    }
    (out, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(started: u64, ended: u64) -> Fold {
        Fold {
            started,
            ended,
            first_ns: 1,
            last_ns: 2,
            reason: FOLD_BY_PROCESS,
            ..Fold::FREE
        }
    }

    fn key(tgid: u32) -> FoldKey {
        FoldKey {
            tgid,
            protocol: 6,
            family: 2,
            scope: SCOPE_LOOPBACK,
            _pad: 0,
            _pad2: 0,
            start_boottime_ns: 7,
        }
    }

    #[test]
    fn a_process_folded_total_adds_its_folds_and_no_one_elses() {
        let udp = FoldKey {
            protocol: 17,
            ..key(10)
        };
        let reused = FoldKey {
            start_boottime_ns: 8,
            ..key(10)
        };
        let (a, b, c, d) = (fold(5, 5), fold(7, 6), fold(100, 0), fold(1000, 0));
        let kernel = [(key(10), &a), (udp, &b), (reused, &c), (key(11), &d)];
        assert_eq!(process_folded(&kernel, &key(10)), 12);
        assert_eq!(process_folded(&kernel, &udp), 12);
        assert_eq!(process_folded(&kernel, &reused), 100);
        assert_eq!(process_folded(&kernel, &key(12)), 0);
    }

    #[test]
    fn ranges_read_as_ranges() {
        let mut bits = [0u64; FOLD_PORT_WORDS];
        for p in [1u16, 2, 3, 7, 63, 64, 65, 11211, 65535] {
            bits[usize::from(p) / 64] |= 1 << (p % 64);
        }
        assert_eq!(ranges(&bits), ("1-3,7,63-65,11211,65535".into(), 9));
        assert_eq!(ranges(&[0; FOLD_PORT_WORDS]), (String::new(), 0));
    }

    #[test]
    fn differences_then_one_final_report_then_delete_when_gone() {
        let mut f = Folds::default();
        let t0 = Instant::now();
        let k = key(10);
        let a = fold(100, 90);
        let (r, _) = f.reports(&[(k, &a)], t0, false, |_| true);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].started, r[0].ended, r[0].final_), (100, 90, false));
        // Grew: the difference only.
        let b = fold(250, 240);
        let (r, _) = f.reports(&[(k, &b)], t0 + Duration::from_secs(1), false, |_| true);
        assert_eq!(
            (r[0].started, r[0].ended, r[0].started_total),
            (150, 150, 250)
        );
        assert!(!r[0].final_);
        // Quiet for a tick: one final report with nothing new, then silence.
        let (r, d) = f.reports(&[(k, &b)], t0 + Duration::from_secs(2), false, |_| true);
        assert_eq!((r[0].started, r[0].final_), (0, true));
        assert!(d.is_empty(), "alive: kept");
        let (r, _) = f.reports(&[(k, &b)], t0 + Duration::from_secs(3), false, |_| true);
        assert!(r.is_empty());
        // Churning again: reported again.
        let c = fold(260, 250);
        let (r, _) = f.reports(&[(k, &c)], t0 + Duration::from_secs(4), false, |_| true);
        assert_eq!((r[0].started, r[0].final_), (10, false));
        // Gone: final, and deletable, with whatever it added last.
        let d = fold(261, 261);
        let (r, del) = f.reports(&[(k, &d)], t0 + Duration::from_secs(4), false, |_| false);
        assert_eq!((r[0].started, r[0].ended, r[0].final_), (1, 11, true));
        assert!(
            del.is_empty(),
            "kept one more report: a last end may still arrive"
        );
        // A last end counted just as the process went: reported, then deleted.
        let e = fold(261, 262);
        let (r, del) = f.reports(&[(k, &e)], t0 + Duration::from_secs(5), false, |_| false);
        assert_eq!((r[0].started, r[0].ended, r[0].final_), (0, 1, true));
        assert!(del.is_empty());
        let (r, del) = f.reports(&[(k, &e)], t0 + Duration::from_secs(6), false, |_| false);
        assert!(r.is_empty());
        assert_eq!(del, vec![k]);
        // Deleted by the caller: nothing more, and a new fold of that key starts afresh.
        let (r, _) = f.reports(&[], t0 + Duration::from_secs(5), false, |_| false);
        assert!(r.is_empty());
    }

    #[test]
    fn the_last_report_is_final_for_every_fold() {
        let mut f = Folds::default();
        let t0 = Instant::now();
        let (a, b) = (fold(5, 0), fold(7, 7));
        let (r, d) = f.reports(&[(key(1), &a), (key(2), &b)], t0, true, |_| true);
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|r| r.final_) && d.is_empty());
    }

    #[test]
    fn a_gone_process_already_reported_final_is_deleted_without_a_second_report() {
        let mut f = Folds::default();
        let t0 = Instant::now();
        let a = fold(5, 5);
        f.reports(&[(key(1), &a)], t0, false, |_| true);
        let (r, _) = f.reports(&[(key(1), &a)], t0 + FOLD_QUIET, false, |_| true);
        assert!(r[0].final_);
        let (r, d) = f.reports(&[(key(1), &a)], t0 + 2 * FOLD_QUIET, false, |_| false);
        assert!(r.is_empty(), "{r:?}");
        assert!(d.is_empty(), "gone once: kept");
        let (r, d) = f.reports(&[(key(1), &a)], t0 + 3 * FOLD_QUIET, false, |_| false);
        assert!(r.is_empty(), "{r:?}");
        assert_eq!(d, vec![key(1)]);
    }
}
