//! A bounded queue on disk for one network destination: every event rendered for the
//! destination is appended here, and the destination's sender reads it back and advances
//! an acknowledgement cursor once the destination has the event (a RELP `rsp 200`, or
//! the bytes accepted by the socket for plain streams). What is not acknowledged when the
//! agent stops or dies is replayed, in order, at the next start.
//!
//! Layout of a spool directory (one per destination):
//! - `lock`: held with `flock` while an agent uses the spool;
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segments, oldest first by number; an agent appends only to
//!   a segment it created, so a segment left by an earlier run is never written again;
//! - `cursor`: `SEG OFFSET INDEX` of the first unacknowledged record.
//!
//! A record is `"PWS1" | len: u32 | crc: u32 | seq: u64 | payload`, little endian, with
//! the CRC-32 over `len | seq | payload`. A record whose magic, length or CRC does not
//! check out (a write torn by a crash or a power cut) is skipped: the reader looks for
//! the next valid record after it, and counts one torn record per damaged stretch.
//!
//! fsync policy: appends go to the page cache at once (they survive the agent being
//! killed), and segment data and the cursor are synced to disk at most once a second
//! and at a clean stop. A power cut can lose the last second of appended events, and can
//! make the last second of acknowledged events be sent again (duplicates carry the same
//! `event.sequence`).
//!
//! When the spool is full, the oldest segment is deleted; its unacknowledged records are
//! counted as lost (`spool-full`).

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const MAGIC: [u8; 4] = *b"PWS1";
/// magic, len, crc, seq.
pub const HEADER: usize = 4 + 4 + 4 + 8;
/// Largest payload taken (an event is a few KiB at most; a rendered event never nears it).
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Default bound of one destination's spool on disk.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Smallest bound accepted: a few segments of a few records.
pub const MIN_MAX_BYTES: u64 = 1 << 20;
/// How often data and cursor are synced to disk, at most.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Where a record ends: the position of the next one. Ordered by segment, then offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub seg: u64,
    pub off: u64,
    /// Records before `off` in the segment (to count what a dropped segment held).
    pub idx: u64,
}

/// One record read back.
#[derive(Debug)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
    /// Position after this record: acknowledge it with [`Spool::ack`].
    pub end: Pos,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "cannot use spool directory {}: {source}; create it writable by root, or pick \
         another with --spool-dir",
        dir.display()
    )]
    Dir { dir: PathBuf, source: io::Error },
    #[error(
        "spool directory {} is in use by another portwatch; give each agent its own \
         --spool-dir",
        .0.display()
    )]
    Locked(PathBuf),
}

#[derive(Debug)]
struct Seg {
    id: u64,
    /// Bytes of the segment that hold records (the file size for an earlier run's
    /// segment, what was appended for ours).
    bytes: u64,
    /// Valid records in it.
    records: u64,
}

pub struct Spool {
    dir: PathBuf,
    _lock: File,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; the last is the one appended to, created by this run.
    segs: VecDeque<Seg>,
    out: File,
    /// First unacknowledged record.
    acked: Pos,
    /// Sequence of the newest record in the spool (0: none ever).
    last_seq: u64,
    /// Data appended since the last sync.
    unsynced: bool,
    last_sync: Instant,
    cursor_saved: Pos,
    /// Records dropped because the spool was full, not yet taken by [`Spool::take_full`].
    full_dropped: u64,
    /// Damaged stretches skipped by the reader, not yet taken.
    torn: u64,
    buf: Vec<u8>,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

/// The record at the start of `data`, if it is whole and valid: (seq, payload, length).
pub fn parse_record(data: &[u8]) -> Option<(u64, &[u8], usize)> {
    let head = data.get(..HEADER)?;
    if head[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
    if len > MAX_PAYLOAD {
        return None;
    }
    let crc = u32::from_le_bytes(head[8..12].try_into().ok()?);
    let seq = u64::from_le_bytes(head[12..20].try_into().ok()?);
    let payload = data.get(HEADER..HEADER + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[4..8]);
    h.update(&head[12..20]);
    h.update(payload);
    (h.finalize() == crc).then_some((seq, payload, HEADER + len))
}

/// Append one encoded record to `out`.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let seq_b = seq.to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(&seq_b);
    h.update(payload);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&seq_b);
    out.extend_from_slice(payload);
}

/// How long the record at the start of `data` says it is (its header alone when the
/// header is not all there); 0 when it is not the start of a record at all.
fn claimed_len(data: &[u8]) -> usize {
    if data.len() < HEADER {
        return if MAGIC.starts_with(&data[..data.len().min(4)]) {
            HEADER
        } else {
            0
        };
    }
    if data[..4] != MAGIC {
        return 0;
    }
    let len = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
    if len > MAX_PAYLOAD { 0 } else { HEADER + len }
}

/// Walk the records of a segment's bytes: (valid records, last seq, damaged stretches).
fn scan(data: &[u8]) -> (u64, Option<u64>, u64) {
    let (mut records, mut last, mut torn) = (0, None, 0);
    let mut off = 0;
    while off < data.len() {
        match parse_record(&data[off..]) {
            Some((seq, _, n)) => {
                records += 1;
                last = Some(seq);
                off += n;
            }
            None => {
                torn += 1;
                off = resync(data, off + 1, false);
            }
        }
    }
    (records, last, torn)
}

/// Offset of the next valid record at or after `from`, or the end. With `more` (the
/// file goes on past `data`), a record that starts in `data` but claims to end past it
/// counts as a candidate too: the caller reads on from it.
fn resync(data: &[u8], from: usize, more: bool) -> usize {
    let mut at = from;
    while at < data.len() {
        match data[at..].windows(4).position(|w| w == MAGIC) {
            Some(i) => {
                at += i;
                if parse_record(&data[at..]).is_some()
                    || (more && claimed_len(&data[at..]) > data.len() - at)
                {
                    return at;
                }
                at += 1;
            }
            None => {
                // A magic cut by the end of `data` may start a record.
                let tail = data.len().saturating_sub(3).max(at);
                return if more {
                    (tail..data.len())
                        .find(|&t| MAGIC.starts_with(&data[t..]))
                        .unwrap_or(data.len())
                } else {
                    data.len()
                };
            }
        }
    }
    data.len()
}

impl Spool {
    /// Open (or create) the spool in `dir`, bounded to `max_bytes` on disk.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let err = |source| SpoolError::Dir {
            dir: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(err)?;
        // SAFETY: flock on an fd we own.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(SpoolError::Locked(dir.to_owned()));
        }
        let mut ids: Vec<u64> = fs::read_dir(dir)
            .map_err(err)?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut segs = VecDeque::new();
        let mut last_seq = 0;
        for id in ids {
            let data = fs::read(seg_path(dir, id)).map_err(err)?;
            let (records, last, _) = scan(&data);
            if let Some(s) = last {
                last_seq = s;
            }
            segs.push_back(Seg {
                id,
                bytes: data.len() as u64,
                records,
            });
        }
        let oldest = segs.front().map_or(1, |s| s.id);
        let acked = read_cursor(dir)
            .filter(|c| segs.iter().any(|s| s.id == c.seg && c.off <= s.bytes))
            .unwrap_or(Pos {
                seg: oldest,
                off: 0,
                idx: 0,
            });
        let new_id = segs.back().map_or(1, |s| s.id + 1);
        let out = create_segment(dir, new_id).map_err(err)?;
        segs.push_back(Seg {
            id: new_id,
            bytes: 0,
            records: 0,
        });
        let segment_bytes = (max_bytes / 8).clamp(64 << 10, 16 << 20);
        let mut spool = Spool {
            dir: dir.to_owned(),
            _lock: lock,
            max_bytes,
            segment_bytes,
            segs,
            out,
            acked,
            last_seq,
            unsynced: false,
            last_sync: Instant::now(),
            cursor_saved: acked,
            full_dropped: 0,
            torn: 0,
            buf: Vec::new(),
        };
        // Segments wholly acknowledged before the last stop.
        spool.ack(acked);
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence of the newest record ever appended here (0: none); numbering continues
    /// after it across restarts, so a consumer can de-duplicate replayed events.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.bytes).sum()
    }

    /// Records not yet acknowledged.
    pub fn unacked(&self) -> u64 {
        self.segs
            .iter()
            .map(|s| {
                if s.id < self.acked.seg {
                    0
                } else if s.id == self.acked.seg {
                    s.records.saturating_sub(self.acked.idx)
                } else {
                    s.records
                }
            })
            .sum()
    }

    /// The first unacknowledged record's position: where a sender resumes after a
    /// reconnect.
    pub fn acked(&self) -> Pos {
        self.acked
    }

    /// Records lost because the spool was full, since the last call.
    pub fn take_full(&mut self) -> u64 {
        std::mem::take(&mut self.full_dropped)
    }

    /// Damaged stretches skipped, since the last call.
    pub fn take_torn(&mut self) -> u64 {
        std::mem::take(&mut self.torn)
    }

    /// Append records in order. Makes room by deleting the oldest segments first (their
    /// unacknowledged records are counted in `take_full`). On an error nothing of the
    /// batch is in the spool.
    pub fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> io::Result<()> {
        self.buf.clear();
        let mut n = 0u64;
        let mut last = None;
        for (seq, payload) in records {
            if payload.len() > MAX_PAYLOAD {
                // Cannot happen for a rendered event; counted rather than written.
                self.full_dropped += 1;
                continue;
            }
            encode_record(&mut self.buf, seq, payload);
            n += 1;
            last = Some(seq);
        }
        if n == 0 {
            return Ok(());
        }
        let size = self.buf.len() as u64;
        if self
            .segs
            .back()
            .is_some_and(|s| s.bytes > 0 && s.bytes + size > self.segment_bytes)
        {
            self.rotate()?;
        }
        while self.bytes() + size > self.max_bytes && self.segs.len() > 1 {
            self.drop_oldest();
        }
        if self.bytes() + size > self.max_bytes {
            // Larger than the whole spool: nothing of it can be kept.
            self.full_dropped += n;
            return Ok(());
        }
        let cur = self.segs.back_mut().expect("a current segment");
        if let Err(e) = self.out.write_all(&self.buf) {
            // Cut back what may have been written, so the segment stays whole records.
            let _ = self.out.set_len(cur.bytes);
            let _ = self.out.seek(SeekFrom::Start(cur.bytes));
            return Err(e);
        }
        cur.bytes += size;
        cur.records += n;
        if let Some(s) = last {
            self.last_seq = s;
        }
        self.unsynced = true;
        self.maybe_sync();
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let _ = self.out.sync_data();
        let id = self.segs.back().map_or(1, |s| s.id + 1);
        self.out = create_segment(&self.dir, id)?;
        self.segs.push_back(Seg {
            id,
            bytes: 0,
            records: 0,
        });
        Ok(())
    }

    fn drop_oldest(&mut self) {
        let Some(seg) = self.segs.pop_front() else {
            return;
        };
        let lost = if seg.id > self.acked.seg {
            seg.records
        } else if seg.id == self.acked.seg {
            seg.records.saturating_sub(self.acked.idx)
        } else {
            0
        };
        self.full_dropped += lost;
        let _ = fs::remove_file(seg_path(&self.dir, seg.id));
        if let Some(next) = self.segs.front()
            && self.acked.seg < next.id
        {
            self.acked = Pos {
                seg: next.id,
                off: 0,
                idx: 0,
            };
        }
    }

    /// Read up to `max` records (and about `max_bytes`) starting at `from`. A position in
    /// a segment that was dropped moves to the oldest one kept. Returns the records and
    /// the position after the last one read (where to read next).
    pub fn read(
        &mut self,
        from: Pos,
        max: usize,
        max_bytes: usize,
    ) -> io::Result<(Vec<Record>, Pos)> {
        let mut pos = from;
        let mut out = Vec::new();
        let mut bytes = 0;
        if let Some(first) = self.segs.front()
            && pos.seg < first.id
        {
            pos = Pos {
                seg: first.id,
                off: 0,
                idx: 0,
            };
        }
        // Bytes to read at once; grown for a record longer than the window.
        let mut window = max_bytes.max(HEADER);
        let mut damaged = false;
        while out.len() < max && bytes < max_bytes {
            let Some(i) = self.segs.iter().position(|s| s.id == pos.seg) else {
                break;
            };
            let (seg_bytes, is_last) = (self.segs[i].bytes, i + 1 == self.segs.len());
            if pos.off >= seg_bytes {
                if is_last {
                    break;
                }
                let next = self.segs[i + 1].id;
                pos = Pos {
                    seg: next,
                    off: 0,
                    idx: 0,
                };
                continue;
            }
            let left = seg_bytes - pos.off;
            let want = (left as usize).min(window);
            let mut data = vec![0u8; want];
            let mut f = File::open(seg_path(&self.dir, pos.seg))?;
            f.seek(SeekFrom::Start(pos.off))?;
            let got = read_full(&mut f, &mut data)?;
            data.truncate(got);
            if got < want {
                // The file is shorter than it was (cut under us): it ends where it ends.
                self.segs[i].bytes = pos.off + got as u64;
                if got == 0 {
                    continue;
                }
            }
            let seg_bytes = self.segs[i].bytes;
            let mut at = 0;
            while at < data.len() && out.len() < max && bytes < max_bytes {
                if let Some((seq, payload, n)) = parse_record(&data[at..]) {
                    damaged = false;
                    at += n;
                    bytes += n;
                    pos.off += n as u64;
                    pos.idx += 1;
                    out.push(Record {
                        seq,
                        payload: payload.to_vec(),
                        end: pos,
                    });
                    continue;
                }
                let need = claimed_len(&data[at..]);
                let in_file = seg_bytes - pos.off;
                if need > data.len() - at && need as u64 <= in_file {
                    // Cut by the read window, not damaged: read again from here.
                    window = window.max(need);
                    break;
                }
                // Damaged: skip to the next valid record in this segment. One damaged
                // stretch is counted once, even when it spans read windows.
                if !damaged {
                    self.torn += 1;
                    damaged = true;
                }
                let more = pos.off + ((data.len() - at) as u64) < seg_bytes;
                let next = resync(&data, at + 1, more);
                pos.off += (next - at) as u64;
                at = next;
            }
        }
        Ok((out, pos))
    }

    /// Everything before `to` is acknowledged: delete segments wholly behind it, and
    /// persist the cursor (at most once a second).
    pub fn ack(&mut self, to: Pos) {
        if to > self.acked {
            self.acked = to;
        }
        while self.segs.len() > 1 && self.segs.front().is_some_and(|s| s.id < self.acked.seg) {
            if let Some(s) = self.segs.pop_front() {
                let _ = fs::remove_file(seg_path(&self.dir, s.id));
            }
        }
        // A finished older segment wholly acknowledged: move the cursor to the next.
        if self.segs.len() > 1
            && let Some(s) = self.segs.front()
            && s.id == self.acked.seg
            && self.acked.off >= s.bytes
        {
            let next = self.segs[1].id;
            self.acked = Pos {
                seg: next,
                off: 0,
                idx: 0,
            };
            if let Some(s) = self.segs.pop_front() {
                let _ = fs::remove_file(seg_path(&self.dir, s.id));
            }
        }
        self.maybe_sync();
    }

    fn maybe_sync(&mut self) {
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync();
        }
    }

    /// Sync appended data and the cursor to disk now.
    pub fn sync(&mut self) {
        if self.unsynced {
            let _ = self.out.sync_data();
            self.unsynced = false;
        }
        if self.cursor_saved != self.acked {
            if let Err(e) = write_cursor(&self.dir, self.acked) {
                log::warn!(
                    "saving the spool cursor in {}: {e}; events may be sent twice after a restart",
                    self.dir.display()
                );
            } else {
                self.cursor_saved = self.acked;
            }
        }
        self.last_sync = Instant::now();
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.sync();
        // An empty segment of ours is of no use to the next run.
        if let Some(last) = self.segs.back()
            && last.bytes == 0
        {
            let _ = fs::remove_file(seg_path(&self.dir, last.id));
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn create_segment(dir: &Path, id: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(seg_path(dir, id))
}

fn read_cursor(dir: &Path) -> Option<Pos> {
    let text = fs::read_to_string(dir.join("cursor")).ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(seg)), Some(Ok(off)), Some(Ok(idx))) = (it.next(), it.next(), it.next()) else {
        return None;
    };
    Some(Pos { seg, off, idx })
}

/// Written aside, synced and renamed over: a crash leaves the old cursor or the new one.
fn write_cursor(dir: &Path, pos: Pos) -> io::Result<()> {
    let tmp = dir.join("cursor.tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{} {} {}", pos.seg, pos.off, pos.idx)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join("cursor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(seq: u64) -> Vec<u8> {
        format!(
            "{{\"event\":{{\"sequence\":{seq}}},\"pad\":\"{}\"}}\n",
            "x".repeat(200)
        )
        .into_bytes()
    }

    fn fill(s: &mut Spool, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            let p = payload(seq);
            s.append([(seq, p.as_slice())]).unwrap();
        }
    }

    fn read_all(s: &mut Spool) -> Vec<Record> {
        let mut pos = s.acked();
        let mut all = Vec::new();
        loop {
            let (recs, next) = s.read(pos, 1000, 1 << 20).unwrap();
            if recs.is_empty() {
                return all;
            }
            pos = next;
            all.extend(recs);
        }
    }

    #[test]
    fn records_come_back_in_order_and_acks_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
            fill(&mut s, 1..=100);
            let recs = read_all(&mut s);
            assert_eq!(
                recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
                (1..=100).collect::<Vec<_>>()
            );
            assert_eq!(recs[4].payload, payload(5));
            s.ack(recs[39].end);
            assert_eq!(s.unacked(), 60);
        }
        // Restart: replay starts after the last acknowledged record, numbering goes on.
        let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(s.last_seq(), 100);
        assert_eq!(s.unacked(), 60);
        fill(&mut s, 101..=110);
        let seqs: Vec<u64> = read_all(&mut s).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (41..=110).collect::<Vec<_>>());
        assert_eq!(s.take_torn(), 0);
    }

    #[test]
    fn a_torn_tail_is_skipped_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
            fill(&mut s, 1..=10);
        }
        // A crash in the middle of a write: half a record at the end of the segment.
        let seg = seg_path(dir.path(), 1);
        let mut rec = Vec::new();
        encode_record(&mut rec, 11, &payload(11));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&rec[..rec.len() / 2]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
        assert_eq!(s.last_seq(), 10, "the torn record is not the newest");
        fill(&mut s, 11..=12);
        let seqs: Vec<u64> = read_all(&mut s).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
        assert_eq!(s.take_torn(), 1);
        assert_eq!(s.take_torn(), 0);
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
            fill(&mut s, 1..=10);
        }
        let seg = seg_path(dir.path(), 1);
        let mut data = fs::read(&seg).unwrap();
        let one = HEADER + payload(1).len();
        data[4 * one + HEADER + 3] ^= 0xff; // a payload byte of record 5
        fs::write(&seg, &data).unwrap();
        let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
        let seqs: Vec<u64> = read_all(&mut s).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(s.take_torn(), 1);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), MIN_MAX_BYTES).unwrap();
        let n = 20_000; // ~5 MB of records into 1 MiB
        fill(&mut s, 1..=n);
        assert!(s.bytes() <= MIN_MAX_BYTES, "{} bytes on disk", s.bytes());
        let dropped = s.take_full();
        let recs = read_all(&mut s);
        assert_eq!(
            dropped + recs.len() as u64,
            n,
            "every record kept or counted"
        );
        // What is kept is the newest, in order, without gaps.
        let first = recs[0].seq;
        assert_eq!(first, dropped + 1);
        assert!(recs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(recs.last().unwrap().seq, n);
        let on_disk: u64 = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(on_disk <= MIN_MAX_BYTES, "{on_disk} bytes of segments");
    }

    #[test]
    fn acknowledged_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), MIN_MAX_BYTES).unwrap();
        fill(&mut s, 1..=2000);
        let recs = read_all(&mut s);
        s.ack(recs.last().unwrap().end);
        assert_eq!(s.unacked(), 0);
        assert!(s.bytes() < 128 << 10, "{} bytes kept", s.bytes());
    }

    #[test]
    fn a_second_agent_cannot_take_the_same_spool() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Spool::open(dir.path(), MIN_MAX_BYTES).unwrap();
        let e = Spool::open(dir.path(), MIN_MAX_BYTES)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("in use") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn records_longer_than_the_read_window_are_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 8 << 20).unwrap();
        fill(&mut s, 1..=5);
        let (recs, _) = s.read(s.acked(), 1000, 50).unwrap();
        assert_eq!(
            recs.len(),
            1,
            "at least one record, however small the window"
        );
        assert_eq!(recs[0].payload, payload(1));
        let mut pos = s.acked();
        let mut seqs = Vec::new();
        loop {
            let (recs, next) = s.read(pos, 2, 300).unwrap();
            if recs.is_empty() {
                break;
            }
            seqs.extend(recs.iter().map(|r| r.seq));
            pos = next;
        }
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(s.take_torn(), 0);
    }

    #[test]
    fn garbage_never_panics_the_scanner() {
        let mut data = Vec::new();
        encode_record(&mut data, 1, b"abc");
        data.extend_from_slice(b"PWS1\xff\xff\xff\xff");
        encode_record(&mut data, 2, b"def");
        data.extend_from_slice(b"PWS");
        let (records, last, torn) = scan(&data);
        assert_eq!((records, last, torn), (2, Some(2), 2));
    }
}
