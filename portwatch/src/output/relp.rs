//! RELP, the Reliable Event Logging Protocol (rsyslog's imrelp; syslog-ng has it only in
//! its Premium Edition), client side and sans I/O: frames out, frames in. The sender in
//! `output::sinks` moves the bytes and decides what an acknowledgement means for the
//! spool.
//!
//! From the protocol's specification (librelp `doc/relp.html`):
//! `FRAME = TXNR SP COMMAND SP DATALEN [SP DATA] LF`, TXNR and DATALEN at most 9
//! digits, COMMAND 1 to 32 letters, DATA present only when DATALEN is not 0. The client
//! opens with `open` (txnr 1) offering `relp_version=0` and `commands=syslog`; each
//! `syslog` frame is answered by a `rsp` frame with the same txnr whose data starts with
//! a 3-digit code (`200 OK`). The server may end the session with `serverclose` (txnr 0).
//! Transaction numbers run from 1 to 999,999,999 and then wrap to 1.

/// Largest frame data accepted from the relay: responses are a few bytes; anything
/// larger is a broken or hostile peer.
pub const MAX_RESPONSE_DATA: usize = 64 * 1024;
const MAX_TXNR: u32 = 999_999_999;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub txnr: u32,
    pub command: String,
    pub data: Vec<u8>,
}

/// What the relay said to one transaction.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    /// The human-readable text after the code, on one line.
    pub text: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("RELP frame from the relay has a bad transaction number")]
    Txnr,
    #[error("RELP frame from the relay has a bad command")]
    Command,
    #[error("RELP frame from the relay has a bad data length")]
    DataLen,
    #[error("RELP frame from the relay is larger than {MAX_RESPONSE_DATA} bytes")]
    TooLarge,
    #[error("RELP frame from the relay does not end with a line feed")]
    Trailer,
    #[error("RELP response from the relay has no 3-digit status code")]
    Code,
}

/// The next transaction number after `t`.
pub fn next_txnr(t: u32) -> u32 {
    if t >= MAX_TXNR { 1 } else { t + 1 }
}

/// Append one frame to `out`.
pub fn encode(out: &mut Vec<u8>, txnr: u32, command: &str, data: &[u8]) {
    use std::io::Write as _;
    let _ = write!(out, "{txnr} {command} {}", data.len());
    if !data.is_empty() {
        out.push(b' ');
        out.extend_from_slice(data);
    }
    out.push(b'\n');
}

/// The `open` offer: protocol version 0, the `syslog` command.
pub fn open_offer() -> Vec<u8> {
    format!(
        "relp_version=0\nrelp_software=portwatch,{},-\ncommands=syslog",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// The number of at most 9 digits at the start of `buf` and how many digits it has;
/// Ok(None) when `buf` ends before anything follows the digits.
fn number(buf: &[u8], bad: ParseError) -> Result<Option<(u32, usize)>, ParseError> {
    let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits > 9 || (digits == 0 && !buf.is_empty()) {
        return Err(bad);
    }
    if digits == buf.len() {
        return Ok(None);
    }
    let n = buf[..digits]
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    Ok(Some((n, digits)))
}

/// Parse the frame at the start of `buf`: Ok(None) when it is not complete yet, else the
/// frame and how many bytes it took.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ParseError> {
    let Some((txnr, digits)) = number(buf, ParseError::Txnr)? else {
        return Ok(None);
    };
    if buf[digits] != b' ' {
        return Err(ParseError::Txnr);
    }
    let mut at = digits + 1;
    let rest = &buf[at..];
    let letters = rest.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    if letters > 32 {
        return Err(ParseError::Command);
    }
    match rest.get(letters) {
        None => return Ok(None),
        Some(b' ') if letters > 0 => {}
        Some(_) => return Err(ParseError::Command),
    }
    let command = String::from_utf8_lossy(&rest[..letters]).into_owned();
    at += letters + 1;
    let Some((len, digits)) = number(&buf[at..], ParseError::DataLen)? else {
        return Ok(None);
    };
    let len = len as usize;
    if len > MAX_RESPONSE_DATA {
        return Err(ParseError::TooLarge);
    }
    at += digits;
    match (buf[at], len) {
        (b'\n', 0) => {
            return Ok(Some((
                Frame {
                    txnr,
                    command,
                    data: Vec::new(),
                },
                at + 1,
            )));
        }
        // `DATALEN SP LF` for empty data is tolerated.
        (b' ', _) => at += 1,
        _ => return Err(ParseError::DataLen),
    }
    let Some(data) = buf.get(at..at + len) else {
        return Ok(None);
    };
    match buf.get(at + len) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((
            Frame {
                txnr,
                command,
                data: data.to_vec(),
            },
            at + len + 1,
        ))),
        Some(_) => Err(ParseError::Trailer),
    }
}

/// The status of a `rsp` frame's data: `CODE [SP TEXT] [LF ...]`.
pub fn response(data: &[u8]) -> Result<Response, ParseError> {
    let code = data.get(..3).ok_or(ParseError::Code)?;
    if !code.iter().all(u8::is_ascii_digit) || data.get(3).is_some_and(|&b| b != b' ' && b != b'\n')
    {
        return Err(ParseError::Code);
    }
    let code = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let text_bytes = data.get(4..).unwrap_or_default();
    let line = text_bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let text: String = String::from_utf8_lossy(line)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    Ok(Response { code, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        encode(&mut out, 7, "syslog", b"<30>1 - - - - - - hi");
        encode(&mut out, 8, "close", b"");
        assert_eq!(out, b"7 syslog 20 <30>1 - - - - - - hi\n8 close 0\n");
        let (f, n) = parse_frame(&out).unwrap().unwrap();
        assert_eq!(
            (f.txnr, f.command.as_str(), f.data.as_slice()),
            (7, "syslog", &b"<30>1 - - - - - - hi"[..])
        );
        let (f, m) = parse_frame(&out[n..]).unwrap().unwrap();
        assert_eq!((f.txnr, f.command.as_str(), f.data.len()), (8, "close", 0));
        assert_eq!(n + m, out.len());
    }

    #[test]
    fn responses_from_rsyslog_parse() {
        let buf = b"1 rsp 93 200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog\n";
        let (f, n) = parse_frame(buf).unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(f.command, "rsp");
        assert_eq!(
            response(&f.data).unwrap(),
            Response {
                code: 200,
                text: "OK".into()
            }
        );
        let (f, _) = parse_frame(b"2 rsp 6 200 OK\n").unwrap().unwrap();
        assert_eq!(response(&f.data).unwrap().code, 200);
        let (f, _) = parse_frame(b"0 serverclose 0\n").unwrap().unwrap();
        assert_eq!((f.txnr, f.command.as_str()), (0, "serverclose"));
        let (f, _) = parse_frame(b"5 rsp 26 500 not accepting messages\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            response(&f.data).unwrap(),
            Response {
                code: 500,
                text: "not accepting messages".into()
            }
        );
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let full = b"12 rsp 6 200 OK\n";
        for cut in 0..full.len() {
            assert_eq!(parse_frame(&full[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert_eq!(parse_frame(b"x rsp 6 200 OK\n"), Err(ParseError::Txnr));
        assert_eq!(parse_frame(b"1234567890 rsp 0\n"), Err(ParseError::Txnr));
        assert_eq!(parse_frame(b"1 r$p 0\n"), Err(ParseError::Command));
        assert_eq!(parse_frame(b"1 rsp 99999999 "), Err(ParseError::TooLarge));
        assert_eq!(parse_frame(b"1 rsp 2 OKX"), Err(ParseError::Trailer));
        assert_eq!(parse_frame(b"1 rsp 2x"), Err(ParseError::DataLen));
        assert_eq!(response(b"OK"), Err(ParseError::Code));
        assert_eq!(response(b"20"), Err(ParseError::Code));
    }

    #[test]
    fn transaction_numbers_wrap_to_one() {
        assert_eq!(next_txnr(1), 2);
        assert_eq!(next_txnr(999_999_999), 1);
    }
}
