//! RFC 5424 syslog headers for events: `<PRI>1 TIMESTAMP HOSTNAME portwatch PROCID MSGID
//! [portwatch@32473 ...] ` followed (by the caller) by the event's JSON as MSG.
//!
//! The structured data repeats the fields a syslog-only pipeline filters on (action,
//! transport, address, port, process, rule, severity, sequence) so that rsyslog or
//! syslog-ng can route without parsing the JSON. 32473 is the private enterprise number
//! RFC 5612 reserves for documentation and examples; a site with its own number can
//! map the SD-ID in its collector.

use std::fmt::Write as _;

use crate::output::event::{Event, Level};

/// Facility `daemon` (3): portwatch is a system daemon reporting on services.
const FACILITY: u8 = 3;
pub const SD_ID: &str = "portwatch@32473";

/// RFC 5424 severity from the event's `log.level` (alerts and losses carry one).
fn severity(ev: &Event) -> u8 {
    match ev.log.as_ref().map(|l| l.level) {
        Some(Level::Critical) => 2,
        Some(Level::Error) => 3,
        Some(Level::Warning) => 4,
        Some(Level::Notice) => 5,
        None => 6, // informational
    }
}

/// Append the header (through the space before MSG) for `ev` to `out`.
pub fn header(ev: &Event, out: &mut Vec<u8>) {
    let mut h = String::with_capacity(256);
    let pri = FACILITY * 8 + severity(ev);
    let _ = write!(
        h,
        "<{pri}>1 {} {} portwatch {} {} ",
        timestamp(&crate::time::rfc3339(ev.time_ns)),
        token(&ev.host.name, 255),
        std::process::id(),
        token(ev.event.action.as_str(), 32),
    );
    h.push('[');
    h.push_str(SD_ID);
    param(&mut h, "kind", ev.event.kind.as_str());
    param(&mut h, "action", ev.event.action.as_str());
    param(&mut h, "sequence", &ev.event.sequence.to_string());
    if let Some(n) = &ev.network {
        param(&mut h, "transport", n.transport.as_str());
    }
    if let Some(s) = &ev.server {
        param(&mut h, "ip", &s.ip.to_string());
        param(&mut h, "port", &s.port.to_string());
    }
    if let Some(p) = &ev.process {
        param(&mut h, "pid", &p.pid.to_string());
        if let Some(name) = &p.name {
            param(&mut h, "process", name);
        }
    }
    if let Some(r) = &ev.rule {
        param(&mut h, "rule", &r.id);
    }
    if let Some(s) = ev.event.severity {
        param(&mut h, "severity", &s.to_string());
    }
    h.push_str("] ");
    out.extend_from_slice(h.as_bytes());
}

/// RFC 5424 TIMESTAMP: at most 6 fractional digits (ours has 9).
fn timestamp(rfc3339: &str) -> String {
    match rfc3339.split_once('.') {
        Some((secs, frac)) => {
            let digits: String = frac
                .chars()
                .take_while(char::is_ascii_digit)
                .take(6)
                .collect();
            let zone = frac.trim_start_matches(|c: char| c.is_ascii_digit());
            if digits.is_empty() {
                format!("{secs}{zone}")
            } else {
                format!("{secs}.{digits}{zone}")
            }
        }
        None if rfc3339.is_empty() => "-".to_owned(),
        None => rfc3339.to_owned(),
    }
}

/// A header field: printable US-ASCII without spaces, at most `max` long; `-` if empty.
fn token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if t.is_empty() { "-".to_owned() } else { t }
}

/// ` name="value"` with `"`, `\` and `]` escaped (RFC 5424 6.3.3) and control
/// characters shown as `\xNN`.
fn param(out: &mut String, name: &str, value: &str) {
    out.push(' ');
    out.push_str(name);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_at_most_microseconds() {
        assert_eq!(
            timestamp("2026-11-27T03:09:09.465250907Z"),
            "2026-11-27T03:09:09.465250Z"
        );
        assert_eq!(timestamp("2026-11-27T03:09:09Z"), "2026-11-27T03:09:09Z");
        assert_eq!(timestamp(""), "-");
    }

    #[test]
    fn header_fields_cannot_break_the_frame() {
        assert_eq!(token("my host\n", 255), "my_host_");
        assert_eq!(token("", 255), "-");
        let mut s = String::new();
        param(&mut s, "process", "a\"b]c\\d\ne");
        assert_eq!(s, r#" process="a\"b\]c\\d\x0ae""#);
    }
}
