//! Alert folding: a service restarting in a loop must not flood people.
//!
//! Alerts are keyed by (rule id, executable-or-process-name, transport,
//! address, port). The first alert for a key is emitted and opens a window
//! (default 60 s); repeats inside the window are suppressed and counted; the
//! first alert after the window is emitted again and carries `repeats`, the
//! number folded since the previous emitted one. The pid is deliberately not in
//! the key: a restarting daemon gets a new pid each time. The transport is, so
//! memcached's TCP and UDP alerts stay separate.
//!
//! Memory is bounded by `capacity` keys (default [`Folder::DEFAULT_CAPACITY`],
//! a few hundred KiB at most). When full, expired keys are evicted first, then
//! the key whose window opened earliest; repeats pending on an evicted key are
//! added to [`Folder::lost_repeats`] so the loss is visible. Call
//! [`Folder::flush`] periodically to report repeats of keys that went quiet
//! (otherwise they would only show on the key's next alert) and to free them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Listener, Transport, Verdict};

/// Identity of an alert for folding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct FoldKey {
    /// Catalogue / `[[risky]]` id, or deny rule label.
    pub rule: String,
    /// Executable path, else process name, else empty.
    pub process: String,
    /// TCP or UDP.
    pub transport: Transport,
    /// Bound address (canonical).
    pub addr: IpAddr,
    /// Bound port.
    pub port: u16,
}

impl FoldKey {
    /// Key for `l` alerting under `rule_id`.
    pub fn new(rule_id: &str, l: &Listener<'_>) -> Self {
        FoldKey {
            rule: rule_id.to_owned(),
            process: l.executable.or(l.process_name).unwrap_or("").to_owned(),
            transport: l.transport,
            addr: l.addr.to_canonical(),
            port: l.port,
        }
    }

    /// Key for an alerting verdict; `None` if the verdict names no rule.
    pub fn for_verdict(l: &Listener<'_>, v: &Verdict<'_>) -> Option<Self> {
        v.rule_id().map(|id| FoldKey::new(id, l))
    }
}

/// What to do with an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "action")]
pub enum FoldDecision {
    /// Send it; `repeats` alerts for this key were folded since the last one sent.
    Emit {
        /// Folded alerts since the previous emitted one.
        repeats: u64,
    },
    /// Drop it; `folded` is the running count in the current window.
    Suppress {
        /// Alerts folded so far in this window (including this one).
        folded: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When the last emitted alert opened the current window.
    opened: Instant,
    /// Alerts suppressed since then.
    folded: u64,
}

/// Folds repeated alerts. See the module docs.
#[derive(Debug)]
pub struct Folder {
    window: Duration,
    capacity: usize,
    slots: HashMap<FoldKey, Slot>,
    lost: u64,
}

impl Default for Folder {
    fn default() -> Self {
        Folder::new(Folder::DEFAULT_WINDOW, Folder::DEFAULT_CAPACITY)
    }
}

impl Folder {
    /// Default folding window.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
    /// Default bound on tracked keys.
    pub const DEFAULT_CAPACITY: usize = 4096;

    /// A folder with the given window and key bound (at least 1).
    pub fn new(window: Duration, capacity: usize) -> Self {
        Folder {
            window,
            capacity: capacity.max(1),
            slots: HashMap::new(),
            lost: 0,
        }
    }

    /// Decides whether the alert for `key` at time `now` is emitted or folded.
    pub fn offer(&mut self, key: FoldKey, now: Instant) -> FoldDecision {
        let window = self.window;
        if let Some(slot) = self.slots.get_mut(&key) {
            if now.saturating_duration_since(slot.opened) < window {
                slot.folded += 1;
                return FoldDecision::Suppress {
                    folded: slot.folded,
                };
            }
            let repeats = slot.folded;
            *slot = Slot {
                opened: now,
                folded: 0,
            };
            return FoldDecision::Emit { repeats };
        }
        if self.slots.len() >= self.capacity {
            self.evict_expired(now);
        }
        if self.slots.len() >= self.capacity {
            let oldest = self
                .slots
                .iter()
                .min_by_key(|(_, s)| s.opened)
                .map(|(k, _)| k.clone());
            if let Some(s) = oldest.and_then(|k| self.slots.remove(&k)) {
                self.lost += s.folded;
            }
        }
        self.slots.insert(
            key,
            Slot {
                opened: now,
                folded: 0,
            },
        );
        FoldDecision::Emit { repeats: 0 }
    }

    fn evict_expired(&mut self, now: Instant) {
        let window = self.window;
        let mut lost = 0;
        self.slots.retain(|_, s| {
            let keep = now.saturating_duration_since(s.opened) < window;
            if !keep {
                lost += s.folded;
            }
            keep
        });
        self.lost += lost;
    }

    /// Removes keys whose window has ended and returns those that had folded
    /// alerts, with the count, so the caller can send "N more" summaries.
    pub fn flush(&mut self, now: Instant) -> Vec<(FoldKey, u64)> {
        let window = self.window;
        let mut out = Vec::new();
        let expired: Vec<FoldKey> = self
            .slots
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.opened) >= window)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(s) = self.slots.remove(&k)
                && s.folded > 0
            {
                out.push((k, s.folded));
            }
        }
        out
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Folded alerts whose counts were dropped by capacity eviction.
    pub fn lost_repeats(&self) -> u64 {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FoldKey {
        let mut l = Listener::new(Transport::Udp, "0.0.0.0".parse().expect("ip"), port);
        l.executable = Some("/usr/bin/memcached");
        l.process_name = Some("memcached");
        FoldKey::new("memcached", &l)
    }

    #[test]
    fn restart_loop_is_folded() {
        let t0 = Instant::now();
        let mut f = Folder::default();
        assert_eq!(f.offer(key(11211), t0), FoldDecision::Emit { repeats: 0 });
        for i in 1..=5u64 {
            let d = f.offer(key(11211), t0 + Duration::from_secs(i * 10));
            assert_eq!(d, FoldDecision::Suppress { folded: i });
        }
        // Window over: emitted with the folded count, new window opens.
        assert_eq!(
            f.offer(key(11211), t0 + Duration::from_secs(60)),
            FoldDecision::Emit { repeats: 5 }
        );
        assert_eq!(
            f.offer(key(11211), t0 + Duration::from_secs(61)),
            FoldDecision::Suppress { folded: 1 }
        );
        assert_eq!(
            f.offer(key(11211), t0 + Duration::from_secs(200)),
            FoldDecision::Emit { repeats: 1 }
        );
        assert_eq!(
            f.offer(key(11211), t0 + Duration::from_secs(300)),
            FoldDecision::Emit { repeats: 0 }
        );
    }

    #[test]
    fn keys_are_separate() {
        let t0 = Instant::now();
        let mut f = Folder::default();
        assert_eq!(f.offer(key(11211), t0), FoldDecision::Emit { repeats: 0 });
        assert_eq!(f.offer(key(11212), t0), FoldDecision::Emit { repeats: 0 });
        let mut tcp = key(11211);
        tcp.transport = Transport::Tcp;
        assert_eq!(f.offer(tcp, t0), FoldDecision::Emit { repeats: 0 });
        // pid changes do not matter; v4-mapped equals IPv4.
        let mut l = Listener::new(Transport::Udp, "::ffff:0.0.0.0".parse().expect("ip"), 11211);
        l.executable = Some("/usr/bin/memcached");
        l.pid = Some(99);
        assert_eq!(
            f.offer(FoldKey::new("memcached", &l), t0),
            FoldDecision::Suppress { folded: 1 }
        );
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn bounded_with_eviction_and_flush() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_secs(60), 3);
        for p in 1..=3 {
            f.offer(key(p), t0 + Duration::from_secs(u64::from(p)));
        }
        f.offer(key(1), t0 + Duration::from_secs(10)); // folded on key 1
        // Full, nothing expired: the oldest (key 1) goes, its count is lost.
        assert_eq!(
            f.offer(key(4), t0 + Duration::from_secs(20)),
            FoldDecision::Emit { repeats: 0 }
        );
        assert_eq!(f.len(), 3);
        assert_eq!(f.lost_repeats(), 1);
        // Later, expired keys are evicted before anything live.
        f.offer(key(4), t0 + Duration::from_secs(30));
        assert_eq!(
            f.offer(key(5), t0 + Duration::from_secs(70)),
            FoldDecision::Emit { repeats: 0 }
        );
        assert!(f.len() <= 3);
        // Flush reports and frees expired keys with pending repeats.
        let mut f = Folder::default();
        f.offer(key(1), t0);
        f.offer(key(1), t0 + Duration::from_secs(1));
        f.offer(key(2), t0);
        assert!(f.flush(t0 + Duration::from_secs(30)).is_empty());
        let out = f.flush(t0 + Duration::from_secs(60));
        assert_eq!(out, vec![(key(1), 1)]);
        assert!(f.is_empty());
    }

    #[test]
    fn verdict_keys() {
        let c = super::super::Classifier::new(None);
        let l = Listener::new(Transport::Tcp, "0.0.0.0".parse().expect("ip"), 6379);
        let e = super::super::Exposure::new(l.addr, None, None);
        let v = c.classify(&l, &e);
        let k = FoldKey::for_verdict(&l, &v).expect("key");
        assert_eq!(k.rule, "redis");
        assert_eq!(k.process, "");
        let l = Listener::new(Transport::Tcp, "0.0.0.0".parse().expect("ip"), 443);
        let v = c.classify(&l, &e);
        assert!(FoldKey::for_verdict(&l, &v).is_none());
    }
}
