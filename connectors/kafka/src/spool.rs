//! Spool files: the records of an exactly-once sink's transactions that are not committed yet,
//! kept on disk so that a restored task can write them again (see [`crate::eos`]).
//!
//! A spool file starts with the magic `KEELSPL1`; then each record is
//!
//! ```text
//! flags u8 (1 = key, 2 = value, 4 = timestamp)
//! [timestamp i64] [key length u32, key] [value length u32, value]
//! header count u16, each: name length u16, name (UTF-8), value length u32, value
//! ```
//!
//! little-endian; a header without a value has the length `u32::MAX` ([`NO_VALUE`]) and no
//! bytes (no value can be that long: Kafka's records are far smaller). Files are appended
//! through a buffer and fsynced when their segment is sealed at a checkpoint barrier; only
//! sealed (fsynced) files are ever read after a crash.
//!
//! Neither side allocates per record: the writer appends into its buffer, the reader reads
//! each record into buffers of its own that the next record reuses, and hands it out borrowed
//! ([`SpoolRecord`]).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use keel_proto::{KeelError, Result};

const MAGIC: &[u8; 8] = b"KEELSPL1";
const FLAG_KEY: u8 = 1;
const FLAG_VALUE: u8 = 2;
const FLAG_TIMESTAMP: u8 = 4;
/// The length of a header value that is absent.
const NO_VALUE: u32 = u32::MAX;

/// One record as the sink writes it, owned (see [`SpoolRecord::to_owned_record`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpooledRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// In order; a header without a value has `None`.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub timestamp_ms: Option<i64>,
}

/// One record read from a spool file, borrowed from the reader's buffers until the next read.
#[derive(Debug, Clone, Copy)]
pub struct SpoolRecord<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
    /// The header bytes (names and values, back to back) and where each header lies in them.
    header_bytes: &'a [u8],
    header_spans: &'a [HeaderSpan],
}

/// Where one header's name and value lie in a reader's header buffer.
#[derive(Debug, Clone, Copy)]
struct HeaderSpan {
    name: (usize, usize),
    value: Option<(usize, usize)>,
}

impl<'a> SpoolRecord<'a> {
    /// How many headers the record has.
    pub fn header_count(&self) -> usize {
        self.header_spans.len()
    }

    /// The headers in order, as (name, value); a header without a value has `None`.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        let bytes = self.header_bytes;
        self.header_spans.iter().map(move |span| {
            let name = bytes.get(span.name.0..span.name.1).unwrap_or_default();
            // The reader checked every name when it read the record.
            let name = std::str::from_utf8(name).unwrap_or_default();
            (name, span.value.map(|(from, to)| bytes.get(from..to).unwrap_or_default()))
        })
    }

    /// An owned copy.
    pub fn to_owned_record(&self) -> SpooledRecord {
        SpooledRecord {
            key: self.key.map(<[u8]>::to_vec),
            value: self.value.map(<[u8]>::to_vec),
            headers: self.headers().map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec))).collect(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> KeelError {
    KeelError::internal(format!("exactly-once spool: cannot {what} {}: {e}", path.display()))
}

fn too_long(path: &Path, what: &str) -> KeelError {
    KeelError::internal(format!(
        "exactly-once spool {}: {what} too long for the spool format",
        path.display()
    ))
}

/// Appends records to a new spool file.
pub struct SpoolWriter {
    path: PathBuf,
    out: BufWriter<File>,
    records: u64,
}

impl SpoolWriter {
    /// Creates `path` (and its directory); fails if it exists.
    pub fn create(path: PathBuf) -> Result<SpoolWriter> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_error("create directory", dir, e))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error("create", &path, e))?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        out.write_all(MAGIC).map_err(|e| io_error("write", &path, e))?;
        Ok(SpoolWriter { path, out, records: 0 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records appended so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn append(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        timestamp_ms: Option<i64>,
    ) -> Result<()> {
        let mut flags = 0;
        if key.is_some() {
            flags |= FLAG_KEY;
        }
        if value.is_some() {
            flags |= FLAG_VALUE;
        }
        if timestamp_ms.is_some() {
            flags |= FLAG_TIMESTAMP;
        }
        let path = &self.path;
        let count = u16::try_from(headers.len()).map_err(|_| too_long(path, "header list"))?;
        let w = &mut self.out;
        let mut put = |bytes: &[u8]| w.write_all(bytes).map_err(|e| io_error("write", path, e));
        put(&[flags])?;
        if let Some(ts) = timestamp_ms {
            put(&ts.to_le_bytes())?;
        }
        for bytes in [key, value].into_iter().flatten() {
            let len = u32::try_from(bytes.len()).map_err(|_| too_long(path, "key or value"))?;
            put(&len.to_le_bytes())?;
            put(bytes)?;
        }
        put(&count.to_le_bytes())?;
        for (name, v) in headers {
            let name_len = u16::try_from(name.len()).map_err(|_| too_long(path, "header name"))?;
            put(&name_len.to_le_bytes())?;
            put(name.as_bytes())?;
            match v {
                None => put(&NO_VALUE.to_le_bytes())?,
                Some(v) => {
                    let value_len = u32::try_from(v.len())
                        .ok()
                        .filter(|n| *n != NO_VALUE)
                        .ok_or_else(|| too_long(path, "header value"))?;
                    put(&value_len.to_le_bytes())?;
                    put(v)?;
                }
            }
        }
        self.records += 1;
        Ok(())
    }

    /// Writes the buffer to the file; `durable` also fsyncs it.
    pub fn flush(&mut self, durable: bool) -> Result<()> {
        self.out.flush().map_err(|e| io_error("flush", &self.path, e))?;
        if durable {
            self.out.get_ref().sync_data().map_err(|e| io_error("fsync", &self.path, e))?;
        }
        Ok(())
    }
}

/// Reads the records of a spool file, in the order they were appended.
pub struct SpoolReader {
    path: PathBuf,
    input: BufReader<File>,
    index: u64,
    /// The current record's key, value and headers: reused by the next record.
    key: Vec<u8>,
    value: Vec<u8>,
    header_bytes: Vec<u8>,
    header_spans: Vec<HeaderSpan>,
}

impl SpoolReader {
    pub fn open(path: &Path) -> Result<SpoolReader> {
        let file = File::open(path).map_err(|e| io_error("open", path, e))?;
        let mut input = BufReader::with_capacity(256 * 1024, file);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|e| io_error("read the header of", path, e))?;
        if &magic != MAGIC {
            return Err(KeelError::internal(format!(
                "exactly-once spool {}: not a spool file (bad magic)",
                path.display()
            )));
        }
        Ok(SpoolReader {
            path: path.to_path_buf(),
            input,
            index: 0,
            key: Vec::new(),
            value: Vec::new(),
            header_bytes: Vec::new(),
            header_spans: Vec::new(),
        })
    }

    fn corrupt(path: &Path, index: u64, e: std::io::Error) -> KeelError {
        KeelError::internal(format!(
            "exactly-once spool {}: record {index} is truncated or corrupt: {e}",
            path.display()
        ))
    }

    /// The next record, borrowed until the next call; `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<SpoolRecord<'_>>> {
        let (path, index) = (&self.path, self.index);
        let corrupt = |e: std::io::Error| Self::corrupt(path, index, e);
        let input = &mut self.input;
        let mut flags = [0u8; 1];
        match input.read_exact(&mut flags) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(corrupt(e)),
        }
        let flags = flags[0];
        if flags & !(FLAG_KEY | FLAG_VALUE | FLAG_TIMESTAMP) != 0 {
            return Err(corrupt(std::io::Error::other(format!("unknown flags {flags:#x}"))));
        }
        let timestamp_ms = if flags & FLAG_TIMESTAMP != 0 {
            Some(i64::from_le_bytes(read_array(input).map_err(corrupt)?))
        } else {
            None
        };
        let has_key = flags & FLAG_KEY != 0;
        if has_key {
            let n = read_len32(input).map_err(corrupt)?;
            read_into(input, &mut self.key, n).map_err(corrupt)?;
        }
        let has_value = flags & FLAG_VALUE != 0;
        if has_value {
            let n = read_len32(input).map_err(corrupt)?;
            read_into(input, &mut self.value, n).map_err(corrupt)?;
        }
        let count = u16::from_le_bytes(read_array(input).map_err(corrupt)?);
        self.header_bytes.clear();
        self.header_spans.clear();
        for _ in 0..count {
            let name_len = usize::from(u16::from_le_bytes(read_array(input).map_err(corrupt)?));
            let name = append_from(input, &mut self.header_bytes, name_len).map_err(corrupt)?;
            if let Some(bytes) = self.header_bytes.get(name.0..name.1) {
                std::str::from_utf8(bytes)
                    .map_err(|e| corrupt(std::io::Error::other(format!("header name: {e}"))))?;
            }
            let value_len = u32::from_le_bytes(read_array(input).map_err(corrupt)?);
            let value = if value_len == NO_VALUE {
                None
            } else {
                let n = usize::try_from(value_len)
                    .map_err(|_| corrupt(std::io::Error::other("length overflows")))?;
                Some(append_from(input, &mut self.header_bytes, n).map_err(corrupt)?)
            };
            self.header_spans.push(HeaderSpan { name, value });
        }
        self.index += 1;
        Ok(Some(SpoolRecord {
            key: has_key.then_some(self.key.as_slice()),
            value: has_value.then_some(self.value.as_slice()),
            timestamp_ms,
            header_bytes: &self.header_bytes,
            header_spans: &self.header_spans,
        }))
    }
}

fn read_array<const N: usize>(input: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    input.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_len32(input: &mut impl Read) -> std::io::Result<usize> {
    let n = u32::from_le_bytes(read_array(input)?);
    usize::try_from(n).map_err(|_| std::io::Error::other("length overflows"))
}

/// Reads `len` bytes into `buf` (replacing what it held, keeping its capacity).
fn read_into(input: &mut impl Read, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    buf.clear();
    append_from(input, buf, len).map(|_| ())
}

/// Appends `len` bytes read from `input` to `buf`; returns where they lie in it. A length
/// longer than the file fails when the file ends: it never sizes a buffer up front.
fn append_from(input: &mut impl Read, buf: &mut Vec<u8>, len: usize) -> std::io::Result<(usize, usize)> {
    let from = buf.len();
    let want = u64::try_from(len).map_err(|_| std::io::Error::other("length overflows"))?;
    let got = input.by_ref().take(want).read_to_end(buf)?;
    if got < len {
        return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "the record ends early"));
    }
    Ok((from, from + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keel-spool-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("a.spool")
    }

    /// What is appended is read back, field for field and in order, including absent keys,
    /// values and timestamps, and headers with an empty value and without one (distinct), also
    /// when a record with fewer or shorter fields follows one with more (buffers reused).
    #[test]
    fn records_round_trip() {
        let path = temp_path("round");
        let mut w = SpoolWriter::create(path.clone()).expect("create");
        let records = vec![
            SpooledRecord {
                key: Some(b"k".to_vec()),
                value: Some(b"v1".to_vec()),
                headers: vec![
                    ("h".into(), Some(b"x".to_vec())),
                    ("empty".into(), Some(Vec::new())),
                    ("none".into(), None),
                ],
                timestamp_ms: Some(-5),
            },
            SpooledRecord::default(),
            SpooledRecord { value: Some(Vec::new()), ..Default::default() },
        ];
        for r in &records {
            let headers: Vec<(&str, Option<&[u8]>)> =
                r.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            w.append(r.key.as_deref(), r.value.as_deref(), &headers, r.timestamp_ms).expect("append");
        }
        assert_eq!(w.records(), 3);
        w.flush(true).expect("flush");
        assert!(SpoolWriter::create(path.clone()).is_err(), "an existing spool is never overwritten");
        let mut r = SpoolReader::open(&path).expect("open");
        let mut back = Vec::new();
        while let Some(rec) = r.next_record().expect("read") {
            back.push(rec.to_owned_record());
        }
        assert_eq!(back, records);
    }

    /// A cut-off file is an error naming the file and the record, not a short read.
    #[test]
    fn a_truncated_spool_is_an_error() {
        let path = temp_path("trunc");
        let mut w = SpoolWriter::create(path.clone()).expect("create");
        w.append(None, Some(b"hello world"), &[], None).expect("append");
        w.flush(true).expect("flush");
        let len = std::fs::metadata(&path).expect("meta").len();
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(len - 3).expect("truncate");
        let mut r = SpoolReader::open(&path).expect("open");
        let err = r.next_record().expect_err("truncated");
        assert!(err.to_string().contains("record 0"), "{err}");
        assert!(err.to_string().contains("a.spool"), "{err}");
        std::fs::write(&path, b"garbage!").expect("write");
        assert!(SpoolReader::open(&path).is_err());
    }
}
