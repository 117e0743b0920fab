//! The delivery cursor: per stream (sender, session), the lowest seq not yet delivered to the
//! TUN. It makes delivery exactly-once across restarts of the receiver: the ingress records a
//! bundle in the cursor and persists the cursor *before* writing the bundle's packets, so a
//! restarted agent (even after kill -9) reads every object below the cursor as already
//! delivered and only deletes it. See docs/DESIGN.md "Exactly once across restarts".
//!
//! The in-memory `Cursor` is sans-IO (time is passed in as unix seconds); `CursorFile` is the
//! small I/O edge that loads it and replaces the file atomically (write, fsync, rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::node_addr::NodeId;
use crate::tunnel::reorder::StreamId;

/// First line of the file; the format is versioned like everything else we parse.
const MAGIC: &str = "hoshino-cursor v1";
/// Streams remembered; beyond it the least recently advanced one is forgotten. Far above the
/// senders x restarts an inbox sees within the bucket's lifecycle expiry.
pub const MAX_STREAMS: usize = 4096;
/// A stream not advanced for this long is forgotten: its objects have long been deleted or
/// expired by the bucket's lifecycle rule (days), so nothing below its cursor can come back.
pub const FORGET_AFTER_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("cursor file {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("cursor file {path}:{line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    next: u64,
    updated: u64,
}

/// Lowest undelivered seq per stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cursor {
    streams: HashMap<StreamId, Entry>,
    dirty: bool,
}

impl Cursor {
    /// The lowest seq of `stream` not yet delivered (0 for a stream never seen).
    pub fn next(&self, stream: StreamId) -> u64 {
        self.streams.get(&stream).map_or(0, |e| e.next)
    }

    /// Whether `stream` has a recorded position.
    pub fn knows(&self, stream: StreamId) -> bool {
        self.streams.contains_key(&stream)
    }

    /// Whether bundle `seq` of `stream` was delivered already.
    pub fn delivered(&self, stream: StreamId, seq: u64) -> bool {
        seq < self.next(stream)
    }

    /// Records that `seq` (and everything below it) of `stream` is delivered, at `now_unix`.
    pub fn advance(&mut self, stream: StreamId, seq: u64, now_unix: u64) {
        let next = seq.saturating_add(1);
        let e = self.streams.entry(stream).or_insert(Entry {
            next: 0,
            updated: now_unix,
        });
        if next > e.next {
            e.next = next;
            e.updated = now_unix;
            self.dirty = true;
        }
        if self.streams.len() > MAX_STREAMS {
            self.evict_oldest();
        }
    }

    /// Forgets streams not advanced within `FORGET_AFTER_SECS` of `now_unix`.
    pub fn prune(&mut self, now_unix: u64) {
        let before = self.streams.len();
        self.streams
            .retain(|_, e| now_unix.saturating_sub(e.updated) < FORGET_AFTER_SECS);
        self.dirty |= self.streams.len() != before;
    }

    /// Whether there are changes not yet persisted; clears the flag.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .streams
            .iter()
            .min_by_key(|(_, e)| e.updated)
            .map(|(id, _)| *id)
        {
            self.streams.remove(&oldest);
        }
    }

    /// One line per stream: `<sender:16hex> <session:16hex> <next:16hex> <updated:unix secs>`.
    pub fn encode(&self) -> String {
        let mut lines: Vec<String> = self
            .streams
            .iter()
            .map(|(id, e)| {
                format!(
                    "{} {:016x} {:016x} {}",
                    id.sender, id.session, e.next, e.updated
                )
            })
            .collect();
        lines.sort();
        let mut out = String::with_capacity(MAGIC.len() + 1 + lines.len() * 70);
        out.push_str(MAGIC);
        out.push('\n');
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }

    /// Parses `encode`'s output; `Err((line, reason))` on anything else.
    pub fn decode(text: &str) -> Result<Cursor, (usize, String)> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, MAGIC)) => {}
            other => {
                return Err((
                    1,
                    format!(
                        "expected `{MAGIC}`, found `{}`",
                        other.map_or("", |(_, l)| l)
                    ),
                ));
            }
        }
        let mut cursor = Cursor::default();
        for (i, line) in lines {
            let fields: Vec<&str> = line.split(' ').collect();
            let hex = |s: &str| {
                (s.len() == 16)
                    .then(|| u64::from_str_radix(s, 16).ok())
                    .flatten()
            };
            let parsed = match fields.as_slice() {
                [sender, session, next, updated] => {
                    match (hex(sender), hex(session), hex(next), updated.parse::<u64>()) {
                        (Some(sender), Some(session), Some(next), Ok(updated)) => {
                            Some((sender, session, next, updated))
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            let Some((sender, session, next, updated)) = parsed else {
                return Err((
                    i + 1,
                    format!(
                        "expected `<sender:16hex> <session:16hex> <next:16hex> <unix secs>`, found `{line}`"
                    ),
                ));
            };
            cursor.streams.insert(
                StreamId {
                    sender: NodeId(sender),
                    session,
                },
                Entry { next, updated },
            );
        }
        Ok(cursor)
    }
}

/// Where a node's cursor lives: `<state-dir>/cursor-<node id>`.
#[derive(Debug, Clone)]
pub struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    pub fn new(state_dir: &Path, node: NodeId) -> CursorFile {
        CursorFile {
            path: state_dir.join(format!("cursor-{node}")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, e: std::io::Error) -> CursorError {
        CursorError::Io {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// The stored cursor; an empty one if the file does not exist yet. Creates the directory.
    pub fn load(&self) -> Result<Cursor, CursorError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io_error(e))?;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursor::default()),
            Err(e) => return Err(self.io_error(e)),
        };
        Cursor::decode(&text).map_err(|(line, reason)| CursorError::Parse {
            path: self.path.clone(),
            line,
            reason,
        })
    }

    /// Replaces the file atomically: a crash leaves the old or the new cursor, never a torn one.
    pub fn store(&self, cursor: &Cursor) -> Result<(), CursorError> {
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(cursor.encode().as_bytes())?;
            // The data must be on disk before the rename makes it the cursor.
            f.sync_data()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| self.io_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(sender: u64, session: u64) -> StreamId {
        StreamId {
            sender: NodeId(sender),
            session,
        }
    }

    #[test]
    fn a_new_stream_has_delivered_nothing() {
        let c = Cursor::default();
        assert_eq!(c.next(stream(1, 1)), 0);
        assert!(!c.delivered(stream(1, 1), 0));
    }

    #[test]
    fn advancing_marks_that_seq_and_everything_below_delivered() {
        let mut c = Cursor::default();
        c.advance(stream(1, 7), 4, 100);
        assert!(c.delivered(stream(1, 7), 0));
        assert!(c.delivered(stream(1, 7), 4));
        assert!(!c.delivered(stream(1, 7), 5));
        assert!(!c.delivered(stream(1, 8), 0), "other sessions are separate");
        assert!(c.take_dirty());
        assert!(!c.take_dirty());
    }

    #[test]
    fn the_cursor_never_moves_back() {
        let mut c = Cursor::default();
        c.advance(stream(1, 1), 9, 100);
        c.take_dirty();
        c.advance(stream(1, 1), 3, 200);
        assert_eq!(c.next(stream(1, 1)), 10);
        assert!(!c.take_dirty(), "nothing changed");
    }

    #[test]
    fn encoding_round_trips() {
        let mut c = Cursor::default();
        c.advance(stream(0xab, 0xcd), 41, 1_700_000_000);
        c.advance(stream(2, u64::MAX), 0, 5);
        let text = c.encode();
        assert!(text.starts_with("hoshino-cursor v1\n"), "{text}");
        let mut back = Cursor::decode(&text).unwrap();
        back.dirty = c.dirty;
        assert_eq!(back, c);
    }

    #[test]
    fn a_malformed_file_is_an_error_naming_the_line() {
        assert_eq!(Cursor::decode("nonsense\n").unwrap_err().0, 1);
        let text =
            "hoshino-cursor v1\n00000000000000ab 00000000000000cd 0000000000000001 5\nbad line\n";
        assert_eq!(Cursor::decode(text).unwrap_err().0, 3);
        let short = "hoshino-cursor v1\nab cd 1 5\n";
        assert_eq!(Cursor::decode(short).unwrap_err().0, 2);
    }

    #[test]
    fn old_streams_are_pruned_and_the_map_is_bounded() {
        let mut c = Cursor::default();
        c.advance(stream(1, 1), 0, 0);
        c.advance(stream(1, 2), 0, FORGET_AFTER_SECS);
        c.prune(FORGET_AFTER_SECS);
        assert!(!c.knows(stream(1, 1)));
        assert!(c.knows(stream(1, 2)));
        for i in 0..(MAX_STREAMS as u64 + 10) {
            c.advance(stream(2, i), 0, FORGET_AFTER_SECS + i);
        }
        assert_eq!(c.len(), MAX_STREAMS);
        assert!(c.knows(stream(2, MAX_STREAMS as u64 + 9)), "newest kept");
    }

    #[test]
    fn the_file_is_replaced_atomically_and_read_back() {
        let dir = std::env::temp_dir().join(format!("hoshino-cursor-{}", std::process::id()));
        let file = CursorFile::new(&dir.join("state"), NodeId(0x42));
        assert!(
            file.load().unwrap().is_empty(),
            "missing file: empty cursor"
        );
        let mut c = Cursor::default();
        c.advance(stream(1, 1), 99, 10);
        file.store(&c).unwrap();
        assert_eq!(file.load().unwrap().next(stream(1, 1)), 100);
        assert!(
            file.path()
                .to_string_lossy()
                .ends_with("cursor-0000000000000042")
        );
        assert!(!file.path().with_extension("tmp").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
