//! Durable storage of one Raft member: its log, hard state and latest snapshot, on disk.
//!
//! [`DiskStorage`] implements raft-rs's [`Storage`] for a member whose Ready loop owns it through
//! `RawNode<DiskStorage>`. Reads are answered from memory; every change ([`DiskStorage::append`],
//! [`DiskStorage::set_hard_state`], [`DiskStorage::set_commit`], [`DiskStorage::apply_snapshot`],
//! [`DiskStorage::compact`]) is on disk and fsynced before it returns, so the member may acknowledge
//! it to its peers as soon as the call returns; the one exception is a change of the commit index
//! alone ([`DiskStorage::set_commit`], or [`DiskStorage::persist`] without `sync`), which is
//! written but not fsynced (see there).
//!
//! # Files
//!
//! The member's directory holds two files:
//!
//! - `log`: an 8-byte magic (`keelrlg1`), then records appended one after another. A record is a
//!   12-byte header — the body's length (u32 LE), the body's CRC-32 (u32 LE), and the CRC-32 of
//!   those first 8 header bytes (u32 LE) — and the body: one kind byte, then a prost-encoded
//!   message: an `Entry`, a `HardState` or a `ConfState`. Entries, hard states and the commit index
//!   are all appended here, so each change costs one write and one `fdatasync`, not a file
//!   replacement (two fsyncs and a rename) per Ready.
//! - `snapshot`: an 8-byte magic (`keelrsn1`), then one record of the same framing whose body is
//!   the prost-encoded `Snapshot` (metadata and the state machine's bytes). Absent until the first
//!   [`DiskStorage::compact`] or [`DiskStorage::apply_snapshot`].
//!
//! Both are only ever created or replaced whole by writing `<name>.tmp`, fsyncing it, renaming it
//! over `<name>` and fsyncing the directory, so they are never seen half-written; `log` is then
//! only appended to. Leftover `.tmp` files are removed on open.
//!
//! # Replaying the log
//!
//! On open, records are read in order: the last `HardState` and `ConfState` records win, and an
//! entry with index `i` first drops every entry from `i` on, then is pushed. Raft's overwrite of a
//! conflicting suffix is therefore a plain append, and a crash part-way through a multi-entry
//! append leaves a prefix of that append, which is a state raft could have been in.
//!
//! A record that does not check out (short header, header CRC, body past the end of the file,
//! body CRC) is a *torn tail* if no valid record header appears anywhere after it: the crash hit
//! the last write, which was never acknowledged; the file is truncated there. If a valid header
//! does follow, the damage is in the middle of the log: opening fails with an error naming the
//! file and the offset, rather than silently dropping acknowledged records. The header CRC is what
//! makes this distinction possible: without it, a damaged length in the middle would look exactly
//! like a tail cut short. (A torn tail whose bytes happen to contain a valid header — a chance of
//! about 2^-32 per byte — is reported as corruption: the safe side.)
//!
//! # Snapshots and compaction
//!
//! Compaction and snapshot installation write the new `snapshot` first and then rewrite `log`
//! with the conf state, the hard state and the entries after the snapshot, so disk use stays
//! bounded. A crash between the two steps leaves the new snapshot beside the old log. Open
//! reconciles them with the rule [`DiskStorage::apply_snapshot`] uses: log entries up to the
//! snapshot's index are dropped if the log holds that index with the snapshot's term, and all
//! of them are dropped otherwise; the hard state's term and commit are raised to the snapshot's.
//! That yields exactly the state the interrupted call would have left, so at every moment the
//! directory recovers to either the old or the new state.
//!
//! # Invariants
//!
//! - The in-memory entries are contiguous and start at the snapshot's index + 1 (index 1 without a
//!   snapshot): `first_index` is always `snapshot index + 1`, and `term(snapshot index)` is
//!   answered from the snapshot's metadata.
//! - The hard state's commit index never exceeds the last index; changes that would break this are
//!   refused, and a directory that breaks it does not open (raft-rs would panic on it).
//! - The conf state is the snapshot's if there is a snapshot, else the one written when the
//!   directory was created. Membership changes outside snapshots are not recorded: this storage
//!   has no `set_conf_state` (reconfiguration is not supported yet).
//! - After a failed write or fsync the storage refuses every further change: after a failed fsync
//!   the page cache no longer says what is on disk. Reads still work; the member must reopen the
//!   directory, which recovers whatever did reach the disk.
//!
//! Bytes read from disk are never trusted: every length and index from a file is checked before
//! use, and damage is an `InvalidData` error, never a panic.
//!
//! This is written here rather than taken from a crate: raft-rs ships only `MemStorage`, and the
//! maintained raft log engines (tikv's `raft-engine`) are far larger than three small files need,
//! with dependency trees to match. The framing reuses `crc32fast` and raft-proto's prost messages.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use prost011::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Name of the log file in the member's directory.
const LOG_FILE: &str = "log";
/// Name of the snapshot file in the member's directory.
const SNAPSHOT_FILE: &str = "snapshot";
/// Name under which the log is written before it replaces `log`.
const LOG_TMP: &str = "log.tmp";
/// Name under which a snapshot is written before it replaces `snapshot`.
const SNAPSHOT_TMP: &str = "snapshot.tmp";

/// The first bytes of a log file (the last one is the format version).
const LOG_MAGIC: &[u8; 8] = b"keelrlg1";
/// The first bytes of a snapshot file (the last one is the format version).
const SNAPSHOT_MAGIC: &[u8; 8] = b"keelrsn1";

/// Length of a record header: body length, body CRC, header CRC.
const HEADER_LEN: usize = 12;

/// Record kind: a log entry.
const KIND_ENTRY: u8 = 1;
/// Record kind: the hard state.
const KIND_HARD_STATE: u8 = 2;
/// Record kind: the conf state.
const KIND_CONF_STATE: u8 = 3;
/// Record kind: a whole snapshot (only in the snapshot file).
const KIND_SNAPSHOT: u8 = 4;

/// Raft storage of one member, durable under a directory. See the module documentation.
pub struct DiskStorage {
    dir: PathBuf,
    /// The log file, open for appending.
    log: File,
    /// Length of the log file up to the end of its last complete record.
    log_len: u64,
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot, if any.
    snapshot: Option<Snapshot>,
    /// Index and term of the latest snapshot ((0, 0) without one).
    snapshot_index: u64,
    snapshot_term: u64,
    /// The entries after the snapshot: `entries[i].index == snapshot_index + 1 + i`.
    entries: Vec<Entry>,
    /// Set after a failed write: every later change is refused.
    failed: bool,
}

impl fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskStorage")
            .field("dir", &self.dir)
            .field("snapshot_index", &self.snapshot_index)
            .field("first_index", &self.first())
            .field("last_index", &self.last())
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .field("failed", &self.failed)
            .finish()
    }
}

impl DiskStorage {
    /// Opens the storage in `dir` (created if missing). An empty dir starts a member whose
    /// ConfState has `voters` and whose log is empty (all members start alike, as raft-rs's examples
    /// do with `MemStorage::new_with_conf_state`). A dir with data recovers the latest snapshot, the
    /// hard state, the conf state and the log entries after the snapshot; `voters` is then ignored.
    /// A torn last log record (a crash in the middle of an append) is dropped and the file
    /// truncated there; damage elsewhere is an `InvalidData` error naming the file and offset.
    pub fn open(dir: &Path, voters: &[u64]) -> io::Result<DiskStorage> {
        fs::create_dir_all(dir)?;
        for tmp in [LOG_TMP, SNAPSHOT_TMP] {
            match fs::remove_file(dir.join(tmp)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let log_path = dir.join(LOG_FILE);
        let snapshot = read_snapshot(&dir.join(SNAPSHOT_FILE))?;
        let log_bytes = match fs::read(&log_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let Some(log_bytes) = log_bytes else {
            if snapshot.is_some() {
                return Err(invalid_data(format!(
                    "{}: a snapshot without a log file",
                    dir.join(SNAPSHOT_FILE).display()
                )));
            }
            return DiskStorage::create(dir, voters);
        };

        let replayed = replay_log(&log_path, &log_bytes)?;
        let (snapshot_index, snapshot_term) =
            snapshot.as_ref().map_or((0, 0), |s| (s.get_metadata().index, s.get_metadata().term));
        let entries =
            reconcile(&log_path, replayed.first_index, replayed.entries, snapshot_index, snapshot_term)?;
        let mut hard_state = replayed.hard_state;
        hard_state.term = hard_state.term.max(snapshot_term);
        hard_state.commit = hard_state.commit.max(snapshot_index);
        let last = entries.last().map_or(snapshot_index, |e| e.index);
        if hard_state.commit > last {
            return Err(invalid_data(format!(
                "{}: commit index {} is beyond the last log index {last}",
                log_path.display(),
                hard_state.commit
            )));
        }
        let conf_state = match (&snapshot, replayed.conf_state) {
            (Some(s), _) => s.get_metadata().get_conf_state().clone(),
            (None, Some(cs)) => cs,
            (None, None) => {
                return Err(invalid_data(format!("{}: no conf state record", log_path.display())));
            }
        };

        let file_len = u64::try_from(log_bytes.len()).map_err(io::Error::other)?;
        let log = OpenOptions::new().append(true).open(&log_path)?;
        if replayed.valid_len < file_len {
            log.set_len(replayed.valid_len)?;
            log.sync_all()?;
        }
        Ok(DiskStorage {
            dir: dir.to_path_buf(),
            log,
            log_len: replayed.valid_len,
            hard_state,
            conf_state,
            snapshot,
            snapshot_index,
            snapshot_term,
            entries,
            failed: false,
        })
    }

    /// Starts an empty member in `dir`: a log holding the conf state and an empty hard state.
    fn create(dir: &Path, voters: &[u64]) -> io::Result<DiskStorage> {
        let conf_state = ConfState { voters: voters.to_vec(), ..ConfState::default() };
        let hard_state = HardState::default();
        let log_len = write_log(dir, &conf_state, &hard_state, &[])?;
        // The directory itself may be new: make its own entry durable.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        let log = OpenOptions::new().append(true).open(dir.join(LOG_FILE))?;
        Ok(DiskStorage {
            dir: dir.to_path_buf(),
            log,
            log_len,
            hard_state,
            conf_state,
            snapshot: None,
            snapshot_index: 0,
            snapshot_term: 0,
            entries: Vec::new(),
            failed: false,
        })
    }

    /// Appends entries; they may start at or below the last index (raft overwrites a conflicting
    /// suffix: everything from the first entry's index on is replaced), but not at or below the
    /// commit index (raft-rs never rewrites committed entries), and they must be contiguous.
    /// Fsynced before it returns.
    pub fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        self.persist(entries, None, true)
    }

    /// Saves the hard state (term, vote, commit). Its commit may not exceed the last index.
    /// Fsynced before it returns.
    pub fn set_hard_state(&mut self, hs: &HardState) -> io::Result<()> {
        self.persist(&[], Some(hs), true)
    }

    /// Appends `entries` (as [`DiskStorage::append`]) and then saves `hs` (as
    /// [`DiskStorage::set_hard_state`]) in one write, fsynced once when `sync` is set: the Ready
    /// loop passes raft-rs's `Ready::must_sync`, which is false only when nothing but the commit
    /// index changed. A commit index need not be durable: a member that loses it learns it from
    /// the leader again, and applies from its snapshot on every start anyway. Either part may be
    /// empty.
    pub fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>, sync: bool) -> io::Result<()> {
        let hs = hs.filter(|h| **h != self.hard_state);
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        self.check_usable()?;
        let mut buf = Vec::new();
        let mut keep = None;
        let mut last = self.last();
        if let Some(first) = entries.first() {
            let first_index = self.first();
            if first.index < first_index || first.index > last.saturating_add(1) {
                return Err(invalid_input(format!(
                    "append at index {} outside [{first_index}, {}]",
                    first.index,
                    last.saturating_add(1)
                )));
            }
            if entries.windows(2).any(|w| matches!(w, [a, b] if b.index != a.index.saturating_add(1))) {
                return Err(invalid_input("appended entries are not contiguous".to_string()));
            }
            if first.index <= self.hard_state.commit {
                return Err(invalid_input(format!(
                    "append at index {} would overwrite committed entries (commit index {})",
                    first.index, self.hard_state.commit
                )));
            }
            for e in entries {
                push_record(&mut buf, KIND_ENTRY, e)?;
            }
            keep = Some(usize::try_from(first.index - first_index).map_err(io::Error::other)?);
            last = entries.last().map_or(last, |e| e.index);
        }
        if let Some(h) = hs {
            if h.commit > last {
                return Err(invalid_input(format!("commit index {} beyond the last index {last}", h.commit)));
            }
            push_record(&mut buf, KIND_HARD_STATE, h)?;
        }
        self.write_log(&buf, sync)?;
        if let Some(keep) = keep {
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(h) = hs {
            self.hard_state = h.clone();
        }
        Ok(())
    }

    /// Raises the stored commit index (LightReady's commit index); a lower or equal one changes
    /// nothing. Written but not fsynced (see [`DiskStorage::persist`] for why that is safe).
    pub fn set_commit(&mut self, commit: u64) -> io::Result<()> {
        if commit <= self.hard_state.commit {
            return Ok(());
        }
        self.check_usable()?;
        if commit > self.last() {
            return Err(invalid_input(format!(
                "commit index {commit} beyond the last index {}",
                self.last()
            )));
        }
        let hs = HardState { commit, ..self.hard_state.clone() };
        let mut buf = Vec::new();
        push_record(&mut buf, KIND_HARD_STATE, &hs)?;
        self.write_log(&buf, false)?;
        self.hard_state = hs;
        Ok(())
    }

    /// A snapshot received from the leader: it replaces the state; log entries up to its index are
    /// dropped (all of them if the log does not hold its index with its term); the hard state's
    /// term and commit are raised to its own. The ConfState comes from its metadata. Persisted
    /// before it returns. A snapshot older than the current one is refused.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> io::Result<()> {
        self.check_usable()?;
        let meta = snapshot.metadata.as_ref().ok_or_else(|| invalid_input("snapshot without metadata"))?;
        let (index, term) = (meta.index, meta.term);
        if index < self.snapshot_index {
            return Err(invalid_input(format!(
                "snapshot at index {index} is older than the current one at {}",
                self.snapshot_index
            )));
        }
        let keep_from = match self.term_at(index) {
            Some(t) if t == term => self.position_after(index),
            _ => self.entries.len(),
        };
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(term);
        hard_state.commit = hard_state.commit.max(index);
        let new_last = self.entries.get(keep_from..).and_then(|k| k.last()).map_or(index, |e| e.index);
        if hard_state.commit > new_last {
            return Err(invalid_input(format!(
                "snapshot at index {index} is below the commit index {} and does not match the log",
                hard_state.commit
            )));
        }
        let conf_state = meta.get_conf_state().clone();
        self.replace_snapshot(snapshot, conf_state, hard_state, keep_from)
    }

    /// Takes a snapshot at `index` (at most the commit index, and at most the applied index the
    /// caller knows; in the log or equal to the current snapshot's index) with the state machine's
    /// bytes `data`, then drops log entries up to `index` from memory and disk (the log file is
    /// rewritten, so disk use stays bounded). Crash-safe: at every moment the directory recovers to
    /// either the old or the new state.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> io::Result<()> {
        self.check_usable()?;
        if index < self.snapshot_index {
            return Err(invalid_input(format!(
                "compact at {index} below the snapshot index {}",
                self.snapshot_index
            )));
        }
        if index > self.hard_state.commit {
            return Err(invalid_input(format!(
                "compact at {index} beyond the commit index {}",
                self.hard_state.commit
            )));
        }
        let term =
            self.term_at(index).ok_or_else(|| invalid_input(format!("compact at {index}: no such entry")))?;
        let snapshot = Snapshot {
            data,
            metadata: Some(SnapshotMetadata { conf_state: Some(self.conf_state.clone()), index, term }),
        };
        let keep_from = self.position_after(index);
        self.replace_snapshot(snapshot, self.conf_state.clone(), self.hard_state.clone(), keep_from)
    }

    /// The latest snapshot (from [`DiskStorage::compact`] or [`DiskStorage::apply_snapshot`]), for
    /// restoring the state machine on open.
    pub fn latest_snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Bytes used on disk by the member's files.
    pub fn disk_usage(&self) -> io::Result<u64> {
        let mut total = 0;
        for name in [LOG_FILE, SNAPSHOT_FILE, LOG_TMP, SNAPSHOT_TMP] {
            match fs::metadata(self.dir.join(name)) {
                Ok(m) => total += m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Writes `snapshot` and then the log holding `conf_state`, `hard_state` and the entries from
    /// position `keep_from` on, and makes that the state in memory.
    fn replace_snapshot(
        &mut self,
        snapshot: Snapshot,
        conf_state: ConfState,
        hard_state: HardState,
        keep_from: usize,
    ) -> io::Result<()> {
        let kept = self.entries.get(keep_from..).unwrap_or_default();
        let written = write_snapshot(&self.dir, &snapshot)
            .and_then(|()| write_log(&self.dir, &conf_state, &hard_state, kept))
            .and_then(|len| Ok((len, OpenOptions::new().append(true).open(self.dir.join(LOG_FILE))?)));
        let (log_len, log) = match written {
            Ok(done) => done,
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        let meta = snapshot.get_metadata();
        self.snapshot_index = meta.index;
        self.snapshot_term = meta.term;
        self.entries.drain(..keep_from.min(self.entries.len()));
        self.snapshot = Some(snapshot);
        self.conf_state = conf_state;
        self.hard_state = hard_state;
        self.log = log;
        self.log_len = log_len;
        Ok(())
    }

    /// Appends `buf` to the log, fsynced when `sync`. On failure, cuts the file back to its last
    /// complete record (if it can) and refuses every later change.
    fn write_log(&mut self, buf: &[u8], sync: bool) -> io::Result<()> {
        let written = self.log.write_all(buf).and_then(|()| if sync { self.log.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.log_len += u64::try_from(buf.len()).map_err(io::Error::other)?;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                // Best effort: the next open also drops a torn tail.
                let _ = self.log.set_len(self.log_len);
                Err(e)
            }
        }
    }

    /// Refuses changes after a failed write.
    fn check_usable(&self) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(format!(
                "raft storage in {} failed an earlier write; reopen it",
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn first(&self) -> u64 {
        self.snapshot_index.saturating_add(1)
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_index, |e| e.index)
    }

    /// The term of `index` if it is the snapshot's index or in the log.
    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        let pos = usize::try_from(index.checked_sub(self.first())?).ok()?;
        self.entries.get(pos).map(|e| e.term)
    }

    /// The position in `entries` of the entry after `index` (`index` at least the snapshot index).
    fn position_after(&self, index: u64) -> usize {
        usize::try_from(index.saturating_sub(self.snapshot_index))
            .unwrap_or(usize::MAX)
            .min(self.entries.len())
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.first();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        // raft-rs never asks beyond the last index (MemStorage panics); answer Unavailable.
        if high > self.last().saturating_add(1) || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = usize::try_from(low - first).map_err(|_| raft::Error::Store(StorageError::Unavailable))?;
        let hi = usize::try_from(high - first).map_err(|_| raft::Error::Store(StorageError::Unavailable))?;
        let mut ents =
            self.entries.get(lo..hi).ok_or(raft::Error::Store(StorageError::Unavailable))?.to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index {
            return Ok(self.snapshot_term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.term_at(idx).ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The latest snapshot; `SnapshotTemporarilyUnavailable` if there is none yet or it is older
    /// than `request_index` (the next compaction makes one).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        match &self.snapshot {
            Some(s) if s.get_metadata().index >= request_index => Ok(s.clone()),
            _ => Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)),
        }
    }
}

/// What replaying a log file gives.
struct Replayed {
    /// Index of `entries[0]`, if any entry record was read.
    first_index: Option<u64>,
    entries: Vec<Entry>,
    hard_state: HardState,
    conf_state: Option<ConfState>,
    /// File length up to the end of the last complete record.
    valid_len: u64,
}

/// Replays the log file's `bytes` (see the module documentation).
fn replay_log(path: &Path, bytes: &[u8]) -> io::Result<Replayed> {
    if !bytes.starts_with(LOG_MAGIC) {
        return Err(invalid_data(format!("{}: not a raft log file (bad magic)", path.display())));
    }
    let (records, valid_end) = parse_records(path, bytes, LOG_MAGIC.len())?;
    let mut replayed = Replayed {
        first_index: None,
        entries: Vec::new(),
        hard_state: HardState::default(),
        conf_state: None,
        valid_len: u64::try_from(valid_end).map_err(io::Error::other)?,
    };
    for Record { offset, kind, msg } in records {
        let bad = |what: &dyn fmt::Display| corrupt(path, offset, what);
        match kind {
            KIND_ENTRY => {
                let e = Entry::decode(msg).map_err(|e| bad(&e))?;
                let first = *replayed.first_index.get_or_insert(e.index);
                if e.index == 0 || e.index < first {
                    return Err(bad(&format!("entry index {} below the log's first index {first}", e.index)));
                }
                let pos = usize::try_from(e.index - first).map_err(|e| bad(&e))?;
                if pos > replayed.entries.len() {
                    return Err(bad(&format!("entry index {} leaves a gap in the log", e.index)));
                }
                replayed.entries.truncate(pos);
                replayed.entries.push(e);
            }
            KIND_HARD_STATE => replayed.hard_state = HardState::decode(msg).map_err(|e| bad(&e))?,
            KIND_CONF_STATE => replayed.conf_state = Some(ConfState::decode(msg).map_err(|e| bad(&e))?),
            other => return Err(bad(&format!("unknown record kind {other}"))),
        }
    }
    Ok(replayed)
}

/// Lines up the replayed log (starting at `first_index`) with the snapshot at `(index, term)`: the
/// entries after the snapshot, by the rule of [`DiskStorage::apply_snapshot`].
fn reconcile(
    path: &Path,
    first_index: Option<u64>,
    mut entries: Vec<Entry>,
    index: u64,
    term: u64,
) -> io::Result<Vec<Entry>> {
    let Some(first) = first_index.filter(|_| !entries.is_empty()) else {
        return Ok(Vec::new());
    };
    let after_snapshot = index.checked_add(1).ok_or_else(|| invalid_data("snapshot index overflows"))?;
    if first > after_snapshot {
        return Err(invalid_data(format!(
            "{}: the log starts at index {first}, after the snapshot's index {index} + 1",
            path.display()
        )));
    }
    if first == after_snapshot {
        return Ok(entries);
    }
    let pos = usize::try_from(index - first).map_err(io::Error::other)?;
    match entries.get(pos) {
        Some(e) if e.term == term => {
            entries.drain(..=pos);
            Ok(entries)
        }
        _ => Ok(Vec::new()),
    }
}

/// Reads the snapshot file, if there is one. Any damage is an error: the file is only ever
/// replaced whole.
fn read_snapshot(path: &Path) -> io::Result<Option<Snapshot>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !bytes.starts_with(SNAPSHOT_MAGIC) {
        return Err(invalid_data(format!("{}: not a raft snapshot file (bad magic)", path.display())));
    }
    let offset = SNAPSHOT_MAGIC.len();
    let (kind, msg, end) = record_at(&bytes, offset).map_err(|what| corrupt(path, offset as u64, &what))?;
    if kind != KIND_SNAPSHOT || end != bytes.len() {
        return Err(corrupt(path, offset as u64, &"not exactly one snapshot record"));
    }
    let snapshot = Snapshot::decode(msg).map_err(|e| corrupt(path, offset as u64, &e))?;
    if snapshot.metadata.is_none() {
        return Err(corrupt(path, offset as u64, &"snapshot without metadata"));
    }
    Ok(Some(snapshot))
}

/// One record read from a file.
struct Record<'a> {
    /// Where the record starts in its file.
    offset: u64,
    kind: u8,
    /// The prost-encoded message.
    msg: &'a [u8],
}

/// The records of `bytes` from `start` on, and the offset where the complete records end. A bad
/// record is a torn tail if no valid header follows it, else an error.
fn parse_records<'a>(path: &Path, bytes: &'a [u8], start: usize) -> io::Result<(Vec<Record<'a>>, usize)> {
    let mut records = Vec::new();
    let mut pos = start;
    while pos < bytes.len() {
        match record_at(bytes, pos) {
            Ok((kind, msg, next)) => {
                records.push(Record { offset: pos as u64, kind, msg });
                pos = next;
            }
            Err(what) => {
                if let Some(later) = (pos + 1..bytes.len()).find(|&p| header_at(bytes, p).is_some()) {
                    return Err(corrupt(
                        path,
                        pos as u64,
                        &format!("{what}, and a valid record header follows at offset {later}"),
                    ));
                }
                break;
            }
        }
    }
    Ok((records, pos))
}

/// The record at `pos`: its kind, its message bytes and the offset after it.
fn record_at(bytes: &[u8], pos: usize) -> Result<(u8, &[u8], usize), &'static str> {
    let (len, body_crc) = header_at(bytes, pos).ok_or("bad record header")?;
    let start = pos.checked_add(HEADER_LEN).ok_or("bad record header")?;
    let end = usize::try_from(len).ok().and_then(|len| start.checked_add(len)).ok_or("bad record length")?;
    let body = bytes.get(start..end).ok_or("record runs past the end of the file")?;
    if crc32fast::hash(body) != body_crc {
        return Err("record checksum mismatch");
    }
    let (&kind, msg) = body.split_first().ok_or("empty record")?;
    Ok((kind, msg, end))
}

/// The body length and body CRC of the header at `pos`, if there is a whole header there and its
/// own CRC matches.
fn header_at(bytes: &[u8], pos: usize) -> Option<(u32, u32)> {
    let header: [u8; HEADER_LEN] = bytes.get(pos..pos.checked_add(HEADER_LEN)?)?.try_into().ok()?;
    let [l0, l1, l2, l3, c0, c1, c2, c3, h0, h1, h2, h3] = header;
    if crc32fast::hash(&[l0, l1, l2, l3, c0, c1, c2, c3]) != u32::from_le_bytes([h0, h1, h2, h3]) {
        return None;
    }
    Some((u32::from_le_bytes([l0, l1, l2, l3]), u32::from_le_bytes([c0, c1, c2, c3])))
}

/// Appends one record of `kind` holding `msg` to `buf`.
fn push_record(buf: &mut Vec<u8>, kind: u8, msg: &impl prost011::Message) -> io::Result<()> {
    let mut body = Vec::with_capacity(1 + msg.encoded_len());
    body.push(kind);
    msg.encode(&mut body).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(|_| invalid_input("record larger than 4 GiB"))?;
    let mut header = [0u8; HEADER_LEN];
    let (len_crc, header_crc) = header.split_at_mut(8);
    let (len_bytes, crc_bytes) = len_crc.split_at_mut(4);
    len_bytes.copy_from_slice(&len.to_le_bytes());
    crc_bytes.copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    header_crc.copy_from_slice(&crc32fast::hash(len_crc).to_le_bytes());
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&body);
    Ok(())
}

/// Replaces the log file with one holding `conf_state`, `hard_state` and `entries`; returns its
/// length.
fn write_log(
    dir: &Path,
    conf_state: &ConfState,
    hard_state: &HardState,
    entries: &[Entry],
) -> io::Result<u64> {
    let mut buf = LOG_MAGIC.to_vec();
    push_record(&mut buf, KIND_CONF_STATE, conf_state)?;
    push_record(&mut buf, KIND_HARD_STATE, hard_state)?;
    for e in entries {
        push_record(&mut buf, KIND_ENTRY, e)?;
    }
    replace_file(dir, LOG_TMP, LOG_FILE, &buf)?;
    u64::try_from(buf.len()).map_err(io::Error::other)
}

/// Replaces the snapshot file with one holding `snapshot`.
fn write_snapshot(dir: &Path, snapshot: &Snapshot) -> io::Result<()> {
    let mut buf = SNAPSHOT_MAGIC.to_vec();
    push_record(&mut buf, KIND_SNAPSHOT, snapshot)?;
    replace_file(dir, SNAPSHOT_TMP, SNAPSHOT_FILE, &buf)
}

/// Writes `bytes` to `dir/tmp`, fsyncs it, renames it to `dir/name` and fsyncs `dir`.
fn replace_file(dir: &Path, tmp: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp_path = dir.join(tmp);
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp_path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp_path, dir.join(name))?;
    sync_dir(dir)
}

/// Makes the entries of `dir` (creations, renames) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn invalid_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn invalid_input(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// Damage in `path` at `offset`.
fn corrupt(path: &Path, offset: u64, what: &dyn fmt::Display) -> io::Error {
    invalid_data(format!("{}: corrupt at offset {offset}: {what}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::error::Error;
    use std::fs;
    use std::path::{Path, PathBuf};

    use prost011::Message as _;
    use raft::eraftpb::{ConfState, Entry, HardState, Message, Snapshot, SnapshotMetadata};
    use raft::storage::MemStorage;
    use raft::{Config, GetEntriesContext, RawNode, StateRole, Storage, StorageError};

    use super::DiskStorage;

    type TestResult<T = ()> = Result<T, Box<dyn Error>>;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry { index, term, data: data.to_vec(), ..Entry::default() }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    /// All entries the storage holds, first to last.
    fn all_entries(s: &DiskStorage) -> TestResult<Vec<Entry>> {
        Ok(s.entries(s.first_index()?, s.last_index()? + 1, None, ctx())?)
    }

    fn log_path(dir: &Path) -> PathBuf {
        dir.join("log")
    }

    fn file_len(path: &Path) -> TestResult<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn compacted<T>() -> raft::Result<T> {
        Err(raft::Error::Store(StorageError::Compacted))
    }

    fn unavailable<T>() -> raft::Result<T> {
        Err(raft::Error::Store(StorageError::Unavailable))
    }

    fn snapshot_at(index: u64, term: u64, voters: &[u64], data: &[u8]) -> Snapshot {
        Snapshot {
            data: data.to_vec(),
            metadata: Some(SnapshotMetadata {
                conf_state: Some(ConfState { voters: voters.to_vec(), ..ConfState::default() }),
                index,
                term,
            }),
        }
    }

    /// A fresh directory answers raft-rs like `MemStorage::new_with_conf_state` does (same initial
    /// state, first and last index, term of index 0, Unavailable past the end), except that
    /// `snapshot()` says SnapshotTemporarilyUnavailable instead of inventing an empty snapshot.
    #[test]
    fn fresh_storage_answers_like_mem_storage() -> TestResult {
        let dir = tempfile::tempdir()?;
        let disk = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        let mem = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let (d, m) = (disk.initial_state()?, mem.initial_state()?);
        assert_eq!((d.hard_state, d.conf_state), (m.hard_state, m.conf_state));
        assert_eq!((disk.first_index()?, disk.last_index()?), (mem.first_index()?, mem.last_index()?));
        assert_eq!(disk.term(0), mem.term(0));
        assert_eq!(disk.term(1), mem.term(1));
        assert_eq!(disk.term(1), unavailable());
        assert_eq!(disk.entries(1, 1, None, ctx())?, Vec::<Entry>::new());
        assert_eq!(
            disk.snapshot(0, 2),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        );
        assert!(disk.latest_snapshot().is_none());
        Ok(())
    }

    /// Appended entries, a conflicting suffix overwritten (longer and shorter), the hard state and
    /// a raised commit index all come back exactly after the storage is dropped and reopened, and
    /// the reopened storage keeps appending to the same log.
    #[test]
    fn append_overwrite_and_hard_state_survive_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        s.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c"), entry(4, 1, b"d")])?;
        s.set_hard_state(&HardState { term: 1, vote: 2, commit: 2 })?;
        s.append(&[entry(3, 2, b"C"), entry(4, 2, b"D"), entry(5, 2, b"E"), entry(6, 2, b"F")])?;
        s.append(&[entry(4, 3, b"x")])?;
        s.set_hard_state(&HardState { term: 3, vote: 1, commit: 2 })?;
        s.set_commit(3)?;
        s.set_commit(1)?; // lower: changes nothing
        let expected = vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 2, b"C"), entry(4, 3, b"x")];
        assert_eq!(all_entries(&s)?, expected);
        drop(s);

        let mut s = DiskStorage::open(dir.path(), &[7])?;
        assert_eq!(all_entries(&s)?, expected);
        assert_eq!((s.first_index()?, s.last_index()?), (1, 4));
        let state = s.initial_state()?;
        assert_eq!(state.hard_state, HardState { term: 3, vote: 1, commit: 3 });
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.term(3)?, 2);

        s.append(&[entry(5, 3, b"y")])?;
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!(s.last_index()?, 5);
        assert_eq!(s.entries(4, 6, None, ctx())?, vec![entry(4, 3, b"x"), entry(5, 3, b"y")]);
        Ok(())
    }

    /// `persist` writes entries and hard state together with the same meaning as `append` then
    /// `set_hard_state` (an overwrite of a suffix included), both survive a reopen, and it refuses
    /// a commit index beyond the entries it writes.
    #[test]
    fn persist_writes_entries_and_hard_state_together() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        s.persist(
            &[entry(1, 1, b"a"), entry(2, 1, b"b")],
            Some(&HardState { term: 1, vote: 1, commit: 2 }),
            true,
        )?;
        s.persist(&[entry(3, 1, b"c"), entry(4, 1, b"d")], None, true)?;
        s.persist(&[entry(4, 2, b"D")], Some(&HardState { term: 2, vote: 3, commit: 3 }), true)?;
        // Only the commit moves: written without fsync, still read back after a reopen.
        s.persist(&[], Some(&HardState { term: 2, vote: 3, commit: 4 }), false)?;
        assert!(s
            .persist(&[entry(5, 2, b"e")], Some(&HardState { term: 2, vote: 3, commit: 6 }), true)
            .is_err());
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!(
            all_entries(&s)?,
            vec![entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c"), entry(4, 2, b"D")]
        );
        assert_eq!(s.initial_state()?.hard_state, HardState { term: 2, vote: 3, commit: 4 });
        Ok(())
    }

    /// A log cut short inside its last record (a crash mid-append), or inside the last record's
    /// header, reopens with every complete record, the file truncated at the last complete record,
    /// and appends continue from there.
    #[test]
    fn torn_tail_is_dropped_and_truncated() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = log_path(dir.path());
        let mut s = DiskStorage::open(dir.path(), &[1])?;
        s.append(&[entry(1, 1, b"one")])?;
        s.append(&[entry(2, 1, b"two")])?;
        let complete = file_len(&log)?;
        s.append(&[entry(3, 1, &[7u8; 100])])?;
        let full = file_len(&log)?;
        drop(s);

        for cut in [full - 3, complete + 5] {
            fs::OpenOptions::new().write(true).open(&log)?.set_len(cut)?;
            let mut s = DiskStorage::open(dir.path(), &[1])?;
            assert_eq!(all_entries(&s)?, vec![entry(1, 1, b"one"), entry(2, 1, b"two")]);
            assert_eq!(file_len(&log)?, complete);
            s.append(&[entry(3, 2, b"three")])?;
            drop(s);
            let s = DiskStorage::open(dir.path(), &[1])?;
            assert_eq!(s.entries(3, 4, None, ctx())?, vec![entry(3, 2, b"three")]);
            drop(s);
            // Put back the first two records and a full third one for the next round.
            fs::OpenOptions::new().write(true).open(&log)?.set_len(complete)?;
            let mut s = DiskStorage::open(dir.path(), &[1])?;
            s.append(&[entry(3, 1, &[7u8; 100])])?;
        }
        Ok(())
    }

    /// Garbage or zeros after the last complete record (a torn write on a file system that
    /// exposes unwritten blocks) are dropped on open: every record survives and the file is cut
    /// back to its complete records.
    #[test]
    fn garbage_after_last_record_is_dropped() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = log_path(dir.path());
        let mut s = DiskStorage::open(dir.path(), &[1])?;
        let written = vec![entry(1, 1, b"one"), entry(2, 1, b"two"), entry(3, 1, b"three")];
        s.append(&written)?;
        s.set_hard_state(&HardState { term: 1, vote: 1, commit: 3 })?;
        let complete = file_len(&log)?;
        drop(s);

        let tails: [Vec<u8>; 3] =
            [vec![0u8; 64], b"\xff\xff\xff\x7f garbage that is no record".to_vec(), vec![0x10, 0, 0, 0, 1]];
        for tail in tails {
            let mut bytes = fs::read(&log)?;
            bytes.extend_from_slice(&tail);
            fs::write(&log, &bytes)?;
            let s = DiskStorage::open(dir.path(), &[1])?;
            assert_eq!(all_entries(&s)?, written);
            assert_eq!(s.initial_state()?.hard_state.commit, 3);
            assert_eq!(file_len(&log)?, complete);
        }
        Ok(())
    }

    /// A damaged record in the middle of the log (a flipped bit in its body, or in its length)
    /// is an InvalidData error naming the log file and the record's offset, not a silent loss of
    /// the records after it; the failed open leaves the file as it was. A damaged snapshot file
    /// is an error naming that file.
    #[test]
    fn corruption_in_the_middle_is_an_error_naming_file_and_offset() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = log_path(dir.path());
        let mut s = DiskStorage::open(dir.path(), &[1])?;
        s.append(&[entry(1, 1, b"first")])?;
        let offset = file_len(&log)?;
        s.append(&[entry(2, 1, b"middle entry")])?;
        s.append(&[entry(3, 1, b"last")])?;
        drop(s);
        let good = fs::read(&log)?;

        for flip_at in [offset + 12 + 3, offset + 1] {
            let mut bytes = good.clone();
            let byte = bytes.get_mut(usize::try_from(flip_at)?).ok_or("offset outside the log")?;
            *byte ^= 0x40;
            fs::write(&log, &bytes)?;
            let err = DiskStorage::open(dir.path(), &[1]).err().ok_or("damaged log opened")?;
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
            let msg = err.to_string();
            assert!(msg.contains(&log.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("offset {offset}:")), "{msg}");
            assert_eq!(fs::read(&log)?, bytes);
        }

        fs::write(&log, &good)?;
        let mut s = DiskStorage::open(dir.path(), &[1])?;
        s.set_commit(3)?;
        s.compact(2, b"state".to_vec())?;
        drop(s);
        let snap = dir.path().join("snapshot");
        let mut bytes = fs::read(&snap)?;
        let last = bytes.last_mut().ok_or("empty snapshot file")?;
        *last ^= 1;
        fs::write(&snap, &bytes)?;
        let err = DiskStorage::open(dir.path(), &[1]).err().ok_or("damaged snapshot opened")?;
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&snap.display().to_string()), "{err}");
        Ok(())
    }

    /// After `compact`, the first index moves past the snapshot, the term of the snapshot's index
    /// comes from its metadata, earlier terms and entries are Compacted, the log file and the
    /// disk use shrink to about the surviving entries, and a reopen gives the same snapshot,
    /// entries and hard state. Compacting past the commit index or below the snapshot is refused;
    /// compacting up to the last entry leaves an empty log that keeps working.
    #[test]
    fn compaction_drops_entries_from_memory_and_disk() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = log_path(dir.path());
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        let written: Vec<Entry> = (1..=100).map(|i| entry(i, 1 + i / 50, &[i as u8; 1000])).collect();
        s.append(&written)?;
        s.set_hard_state(&HardState { term: 3, vote: 1, commit: 90 })?;
        let (log_before, usage_before) = (file_len(&log)?, s.disk_usage()?);
        assert!(log_before > 100_000);

        s.compact(80, b"state at 80".to_vec())?;
        let check = |s: &DiskStorage| -> TestResult {
            assert_eq!((s.first_index()?, s.last_index()?), (81, 100));
            assert_eq!(s.term(80)?, 2);
            assert_eq!(s.term(79), compacted());
            assert_eq!(s.entries(50, 90, None, ctx()), compacted());
            assert_eq!(s.entries(81, 101, None, ctx())?, written.get(80..).ok_or("short")?.to_vec());
            let snap = s.snapshot(0, 2)?;
            assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (80, 2));
            assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
            assert_eq!(snap.data, b"state at 80");
            assert_eq!(s.latest_snapshot(), Some(&snap));
            assert_eq!(s.initial_state()?.hard_state, HardState { term: 3, vote: 1, commit: 90 });
            Ok(())
        };
        check(&s)?;
        let log_after = file_len(&log)?;
        assert!(log_after > 20_000 && log_after < 22_000, "log is {log_after} bytes");
        assert!(s.disk_usage()? < usage_before / 4);
        drop(s);

        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        check(&s)?;
        assert!(s.compact(91, Vec::new()).is_err());
        assert!(s.compact(79, Vec::new()).is_err());
        check(&s)?;
        s.compact(80, b"state at 80, again".to_vec())?;
        assert_eq!(s.latest_snapshot().map(|s| s.data.clone()), Some(b"state at 80, again".to_vec()));

        s.set_commit(100)?;
        s.compact(100, b"state at 100".to_vec())?;
        assert_eq!((s.first_index()?, s.last_index()?), (101, 100));
        assert!(file_len(&log)? < 100);
        s.append(&[entry(101, 3, b"after")])?;
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!(all_entries(&s)?, vec![entry(101, 3, b"after")]);
        assert_eq!(s.term(100)?, 3);
        Ok(())
    }

    /// A crash after the new snapshot file is in place but before the log is rewritten (new
    /// snapshot beside the old log), or while a temporary file is half-written, recovers to a
    /// whole state: the new one for compaction and for an installed snapshot whose index the log
    /// did not hold, the old one when only the temporary file was written. Leftover temporary
    /// files are removed.
    #[test]
    fn crash_between_snapshot_and_log_rewrite_recovers_a_whole_state() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = log_path(dir.path());
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        s.append(&(1..=10).map(|i| entry(i, 1, b"e")).collect::<Vec<_>>())?;
        s.set_hard_state(&HardState { term: 1, vote: 1, commit: 8 })?;
        let old_log = fs::read(&log)?;
        s.compact(6, b"six".to_vec())?;
        let after = (all_entries(&s)?, s.initial_state()?.hard_state, s.latest_snapshot().cloned());
        drop(s);

        fs::write(&log, &old_log)?;
        fs::write(dir.path().join("log.tmp"), b"half a log")?;
        let s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!((all_entries(&s)?, s.initial_state()?.hard_state, s.latest_snapshot().cloned()), after);
        assert_eq!(s.first_index()?, 7);
        assert!(!dir.path().join("log.tmp").exists());

        // A snapshot that was only half-written to its temporary file never happened.
        fs::write(dir.path().join("snapshot.tmp"), b"keelrsn1 and then nothing")?;
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!(s.latest_snapshot().map(|s| s.get_metadata().index), Some(6));
        assert!(!dir.path().join("snapshot.tmp").exists());

        // Installing a snapshot whose index is past the log: new snapshot beside the old log.
        let old_log = fs::read(&log)?;
        s.apply_snapshot(snapshot_at(12, 2, &[1, 2, 3], b"twelve"))?;
        drop(s);
        fs::write(&log, &old_log)?;
        let s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!((s.first_index()?, s.last_index()?), (13, 12));
        assert_eq!(s.initial_state()?.hard_state, HardState { term: 2, vote: 1, commit: 12 });
        assert_eq!(s.term(12)?, 2);
        Ok(())
    }

    /// `apply_snapshot` keeps the entries after its index when the log holds that index with the
    /// snapshot's term, drops them all otherwise, takes the conf state from the snapshot, raises
    /// term and commit, refuses an older snapshot, and all of it survives a reopen.
    #[test]
    fn apply_snapshot_then_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        s.append(&(1..=10).map(|i| entry(i, 1, &[i as u8])).collect::<Vec<_>>())?;
        s.set_hard_state(&HardState { term: 1, vote: 3, commit: 5 })?;

        s.apply_snapshot(snapshot_at(8, 1, &[1, 2, 3, 4], b"eight"))?;
        let check_matching = |s: &DiskStorage| -> TestResult {
            assert_eq!(all_entries(s)?, vec![entry(9, 1, &[9]), entry(10, 1, &[10])]);
            assert_eq!(s.term(8)?, 1);
            assert_eq!(s.term(7), compacted());
            let state = s.initial_state()?;
            assert_eq!(state.hard_state, HardState { term: 1, vote: 3, commit: 8 });
            assert_eq!(state.conf_state.voters, vec![1, 2, 3, 4]);
            assert_eq!(s.latest_snapshot().map(|s| s.data.clone()), Some(b"eight".to_vec()));
            Ok(())
        };
        check_matching(&s)?;
        drop(s);
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        check_matching(&s)?;

        s.apply_snapshot(snapshot_at(20, 3, &[1, 2, 3], b"twenty"))?;
        let check_past = |s: &DiskStorage| -> TestResult {
            assert_eq!((s.first_index()?, s.last_index()?), (21, 20));
            assert_eq!(s.term(20)?, 3);
            assert_eq!(s.term(10), compacted());
            assert_eq!(s.term(21), unavailable());
            assert_eq!(s.initial_state()?.hard_state, HardState { term: 3, vote: 3, commit: 20 });
            assert_eq!(s.initial_state()?.conf_state.voters, vec![1, 2, 3]);
            Ok(())
        };
        check_past(&s)?;
        assert!(s.apply_snapshot(snapshot_at(15, 3, &[1, 2, 3], b"older")).is_err());
        check_past(&s)?;
        drop(s);
        let mut s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        check_past(&s)?;
        s.append(&[entry(21, 3, b"next")])?;
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1, 2, 3])?;
        assert_eq!(all_entries(&s)?, vec![entry(21, 3, b"next")]);
        Ok(())
    }

    /// `entries` honours `max_size` as MemStorage does (always at least one entry, then whole
    /// entries while the total stays within the limit), and ranges raft-rs never asks for get an
    /// error instead of a panic.
    #[test]
    fn entries_honour_max_size() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut s = DiskStorage::open(dir.path(), &[1])?;
        let written: Vec<Entry> = (1..=5).map(|i| entry(i, 1, &[0u8; 100])).collect();
        s.append(&written)?;
        let size = u64::try_from(written.first().ok_or("no entry")?.encoded_len())?;
        assert_eq!(s.entries(1, 6, Some(0), ctx())?.len(), 1);
        assert_eq!(s.entries(1, 6, Some(size * 2 + size / 2), ctx())?.len(), 2);
        assert_eq!(s.entries(2, 6, Some(size * 3), ctx())?, written.get(1..4).ok_or("short")?.to_vec());
        assert_eq!(s.entries(1, 6, None, ctx())?, written);
        assert_eq!(s.entries(1, 7, None, ctx()), unavailable());
        assert_eq!(s.entries(4, 3, None, ctx()), unavailable());
        assert_eq!(s.entries(0, 3, None, ctx()), compacted());
        Ok(())
    }

    /// Changes that would break the log's invariants (a gap, an overwrite of compacted or committed
    /// entries, non-contiguous entries, a commit past the last index, a snapshot without metadata)
    /// are refused with an error, change nothing in memory or on disk, and never panic.
    #[test]
    fn invalid_changes_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut s = DiskStorage::open(dir.path(), &[1])?;
        s.append(&(1..=5).map(|i| entry(i, 1, b"x")).collect::<Vec<_>>())?;
        s.set_hard_state(&HardState { term: 1, vote: 1, commit: 4 })?;
        s.compact(2, Vec::new())?;
        let before = (all_entries(&s)?, s.initial_state()?.hard_state);

        assert!(s.append(&[entry(7, 1, b"gap")]).is_err());
        assert!(s.append(&[entry(2, 1, b"compacted")]).is_err());
        assert!(s.append(&[entry(5, 1, b"a"), entry(7, 1, b"b")]).is_err());
        assert!(s.append(&[entry(4, 2, b"committed")]).is_err());
        assert!(s.set_commit(6).is_err());
        assert!(s.set_hard_state(&HardState { term: 1, vote: 0, commit: 9 }).is_err());
        assert!(s.apply_snapshot(Snapshot::default()).is_err());
        assert_eq!((all_entries(&s)?, s.initial_state()?.hard_state), before);
        s.append(&[entry(6, 1, b"fine")])?;
        drop(s);
        let s = DiskStorage::open(dir.path(), &[1])?;
        assert_eq!(s.initial_state()?.hard_state, before.1);
        assert_eq!(s.entries(3, 6, None, ctx())?, before.0);
        assert_eq!(s.last_index()?, 6);
        Ok(())
    }

    // ---- end to end with raft-rs ----

    const VOTERS: [u64; 3] = [1, 2, 3];

    /// One member of the test cluster: its directory, its node while it runs, and its state
    /// machine (the data of every applied entry, in order).
    struct Member {
        id: u64,
        dir: PathBuf,
        node: Option<RawNode<DiskStorage>>,
        applied: Vec<Vec<u8>>,
        applied_index: u64,
        snapshots_installed: usize,
    }

    /// The state machine as snapshot bytes: each applied entry's data, length-prefixed.
    fn encode_state(applied: &[Vec<u8>]) -> TestResult<Vec<u8>> {
        let mut out = Vec::new();
        for data in applied {
            out.extend_from_slice(&u32::try_from(data.len())?.to_le_bytes());
            out.extend_from_slice(data);
        }
        Ok(out)
    }

    fn decode_state(mut bytes: &[u8]) -> TestResult<Vec<Vec<u8>>> {
        let mut applied = Vec::new();
        while !bytes.is_empty() {
            let (len, rest) = bytes.split_at_checked(4).ok_or("short length")?;
            let len = usize::try_from(u32::from_le_bytes(len.try_into()?))?;
            let (data, rest) = rest.split_at_checked(len).ok_or("short data")?;
            applied.push(data.to_vec());
            bytes = rest;
        }
        Ok(applied)
    }

    fn apply(applied: &mut Vec<Vec<u8>>, applied_index: &mut u64, entries: Vec<Entry>) -> TestResult {
        for e in entries {
            if e.index != *applied_index + 1 {
                return Err(format!("applied {} after {}", e.index, applied_index).into());
            }
            if !e.data.is_empty() {
                applied.push(e.data);
            }
            *applied_index = e.index;
        }
        Ok(())
    }

    impl Member {
        /// Opens the member's directory and starts its node, the state machine restored from the
        /// latest snapshot (raft then hands over the committed entries after it).
        fn start(&mut self, logger: &slog::Logger) -> TestResult {
            let storage = DiskStorage::open(&self.dir, &VOTERS)?;
            let (applied, index) = match storage.latest_snapshot() {
                Some(s) => (decode_state(&s.data)?, s.get_metadata().index),
                None => (Vec::new(), 0),
            };
            (self.applied, self.applied_index) = (applied, index);
            let config = Config {
                id: self.id,
                election_tick: 10,
                heartbeat_tick: 2,
                applied: index,
                max_size_per_msg: 4096,
                max_inflight_msgs: 16,
                ..Config::default()
            };
            config.validate()?;
            self.node = Some(RawNode::new(&config, storage, logger)?);
            Ok(())
        }

        /// Handles one Ready the way the member's Ready loop does, collecting outgoing messages.
        fn handle_ready(&mut self, out: &mut Vec<Message>) -> TestResult {
            let Member { node: Some(node), applied, applied_index, snapshots_installed, .. } = self else {
                return Ok(());
            };
            if !node.has_ready() {
                return Ok(());
            }
            let mut rd = node.ready();
            out.extend(rd.take_messages());
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                *applied = decode_state(&snap.data)?;
                *applied_index = snap.get_metadata().index;
                node.mut_store().apply_snapshot(snap)?;
                *snapshots_installed += 1;
            }
            apply(applied, applied_index, rd.take_committed_entries())?;
            node.mut_store().append(rd.entries())?;
            if let Some(hs) = rd.hs() {
                node.mut_store().set_hard_state(hs)?;
            }
            out.extend(rd.take_persisted_messages());
            let mut light = node.advance(rd);
            if let Some(commit) = light.commit_index() {
                node.mut_store().set_commit(commit)?;
            }
            out.extend(light.take_messages());
            apply(applied, applied_index, light.take_committed_entries())?;
            node.advance_apply();
            Ok(())
        }

        /// Snapshots the state machine at its applied index and compacts the log there.
        fn compact(&mut self) -> TestResult {
            let data = encode_state(&self.applied)?;
            let node = self.node.as_mut().ok_or("member not running")?;
            node.mut_store().compact(self.applied_index, data)?;
            assert_eq!(node.store().first_index()?, self.applied_index + 1);
            Ok(())
        }
    }

    struct Cluster {
        members: Vec<Member>,
        logger: slog::Logger,
    }

    impl Cluster {
        fn member(&mut self, id: u64) -> TestResult<&mut Member> {
            Ok(self.members.iter_mut().find(|m| m.id == id).ok_or("no such member")?)
        }

        fn node(&mut self, id: u64) -> TestResult<&mut RawNode<DiskStorage>> {
            Ok(self.member(id)?.node.as_mut().ok_or("member not running")?)
        }

        fn start(&mut self, id: u64) -> TestResult {
            let logger = self.logger.clone();
            self.member(id)?.start(&logger)
        }

        fn stop(&mut self, id: u64) -> TestResult {
            self.member(id)?.node = None;
            Ok(())
        }

        fn leader(&self) -> Option<u64> {
            self.members
                .iter()
                .find(|m| m.node.as_ref().is_some_and(|n| n.raft.state == StateRole::Leader))
                .map(|m| m.id)
        }

        fn applied(&self, id: u64) -> usize {
            self.members.iter().find(|m| m.id == id).map_or(0, |m| m.applied.len())
        }

        /// Handles Readies and delivers messages (to running members) until nothing moves.
        fn route(&mut self) -> TestResult {
            for _ in 0..10_000 {
                let mut msgs = Vec::new();
                for m in &mut self.members {
                    m.handle_ready(&mut msgs)?;
                }
                let busy = self.members.iter().any(|m| m.node.as_ref().is_some_and(|n| n.has_ready()));
                if msgs.is_empty() && !busy {
                    return Ok(());
                }
                for msg in msgs {
                    if let Some(node) =
                        self.members.iter_mut().find(|m| m.id == msg.to).and_then(|m| m.node.as_mut())
                    {
                        node.step(msg)?;
                    }
                }
            }
            Err("messages never settled".into())
        }

        /// Ticks every running member (routing after each tick) until `done` holds.
        fn tick_until(&mut self, what: &str, done: impl Fn(&Cluster) -> bool) -> TestResult {
            for _ in 0..1_000 {
                if done(self) {
                    return Ok(());
                }
                for m in &mut self.members {
                    if let Some(node) = m.node.as_mut() {
                        node.tick();
                    }
                }
                self.route()?;
            }
            Err(format!("timed out waiting until {what}").into())
        }

        fn propose(&mut self, range: std::ops::Range<u32>) -> TestResult {
            let leader = self.leader().ok_or("no leader")?;
            for i in range {
                self.node(leader)?.propose(Vec::new(), format!("entry {i}").into_bytes())?;
                self.route()?;
            }
            Ok(())
        }
    }

    /// Three `RawNode<DiskStorage>` elect a leader and commit 50 proposals; every member compacts;
    /// a member restarted from its directory catches up from the leader's log, another, down
    /// while the leader compacted past its log, catches up from a snapshot sent by the leader;
    /// and after a restart of the whole cluster all three have applied the same 50 entries in
    /// order. It fails if storage loses, reorders or duplicates an entry, if a reopen does not
    /// restore what raft persisted (raft-rs panics on inconsistent state), or if a snapshot is
    /// not installed.
    #[test]
    fn three_raft_nodes_elect_replicate_compact_and_catch_up() -> TestResult {
        let root = tempfile::tempdir()?;
        let members = VOTERS
            .iter()
            .map(|&id| Member {
                id,
                dir: root.path().join(format!("member-{id}")),
                node: None,
                applied: Vec::new(),
                applied_index: 0,
                snapshots_installed: 0,
            })
            .collect();
        let mut c = Cluster { members, logger: slog::Logger::root(slog::Discard, slog::o!()) };
        for id in VOTERS {
            c.start(id)?;
        }
        c.node(1)?.campaign()?;
        c.route()?;
        assert_eq!(c.leader(), Some(1));

        c.propose(0..20)?;
        c.tick_until("all applied 20", |c| VOTERS.iter().all(|&id| c.applied(id) == 20))?;

        // Member 3 misses 10 entries, then catches up from the leader's log.
        c.stop(3)?;
        c.propose(20..30)?;
        c.tick_until("1 and 2 applied 30", |c| c.applied(1) == 30 && c.applied(2) == 30)?;
        c.start(3)?;
        c.tick_until("3 applied 30", |c| c.applied(3) == 30)?;
        assert_eq!(c.member(3)?.snapshots_installed, 0);

        for id in VOTERS {
            c.member(id)?.compact()?;
        }

        // Member 2 misses 20 entries that the leader compacts away: it needs a snapshot.
        let last_of_2 = c.node(2)?.store().last_index()?;
        c.stop(2)?;
        c.propose(30..50)?;
        c.tick_until("1 and 3 applied 50", |c| c.applied(1) == 50 && c.applied(3) == 50)?;
        for id in [1, 3] {
            c.member(id)?.compact()?;
        }
        assert!(c.node(1)?.store().first_index()? > last_of_2 + 1);
        c.start(2)?;
        assert_eq!(c.applied(2), 30); // restored from its own snapshot
        c.tick_until("2 applied 50", |c| c.applied(2) == 50)?;
        assert_eq!(c.member(2)?.snapshots_installed, 1);
        let installed = c.node(2)?.store().latest_snapshot().map(|s| s.get_metadata().index);
        assert!(installed > Some(last_of_2));

        let expected: Vec<Vec<u8>> = (0..50).map(|i| format!("entry {i}").into_bytes()).collect();
        for m in &c.members {
            assert_eq!(m.applied, expected, "member {}", m.id);
        }

        // The whole cluster restarts from its directories and agrees again.
        for id in VOTERS {
            c.stop(id)?;
        }
        for id in VOTERS {
            c.start(id)?;
        }
        c.tick_until("a leader and 50 applied everywhere", |c| {
            c.leader().is_some() && VOTERS.iter().all(|&id| c.applied(id) == 50)
        })?;
        c.propose(50..51)?;
        c.tick_until("51 applied everywhere", |c| VOTERS.iter().all(|&id| c.applied(id) == 51))?;
        for m in &c.members {
            assert_eq!(m.applied.get(..50), Some(expected.as_slice()), "member {}", m.id);
        }
        Ok(())
    }
}
