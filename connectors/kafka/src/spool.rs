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
//! little-endian. Files are appended through a buffer and fsynced when their segment is sealed
//! at a checkpoint barrier; only sealed (fsynced) files are ever read after a crash.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use keel_proto::{KeelError, Result};

const MAGIC: &[u8; 8] = b"KEELSPL1";
const FLAG_KEY: u8 = 1;
const FLAG_VALUE: u8 = 2;
const FLAG_TIMESTAMP: u8 = 4;

/// One record as the sink writes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpooledRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
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
        headers: &[(String, Vec<u8>)],
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
            let value_len = u32::try_from(v.len()).map_err(|_| too_long(path, "header value"))?;
            put(&name_len.to_le_bytes())?;
            put(name.as_bytes())?;
            put(&value_len.to_le_bytes())?;
            put(v)?;
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
        Ok(SpoolReader { path: path.to_path_buf(), input, index: 0 })
    }

    fn corrupt(&self, e: std::io::Error) -> KeelError {
        KeelError::internal(format!(
            "exactly-once spool {}: record {} is truncated or corrupt: {e}",
            self.path.display(),
            self.index
        ))
    }

    fn bytes(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.input.read_exact(&mut buf).map_err(|e| self.corrupt(e))?;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.input.read_exact(&mut buf).map_err(|e| self.corrupt(e))?;
        Ok(buf)
    }

    fn len32(&mut self) -> Result<usize> {
        let n = u32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.corrupt(std::io::Error::other("length overflows")))
    }

    /// The next record; `None` at the end of the file.
    pub fn next_record(&mut self) -> Result<Option<SpooledRecord>> {
        let mut flags = [0u8; 1];
        match self.input.read_exact(&mut flags) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(self.corrupt(e)),
        }
        let flags = flags[0];
        if flags & !(FLAG_KEY | FLAG_VALUE | FLAG_TIMESTAMP) != 0 {
            return Err(self.corrupt(std::io::Error::other(format!("unknown flags {flags:#x}"))));
        }
        let timestamp_ms =
            if flags & FLAG_TIMESTAMP != 0 { Some(i64::from_le_bytes(self.array()?)) } else { None };
        let key = if flags & FLAG_KEY != 0 {
            let n = self.len32()?;
            Some(self.bytes(n)?)
        } else {
            None
        };
        let value = if flags & FLAG_VALUE != 0 {
            let n = self.len32()?;
            Some(self.bytes(n)?)
        } else {
            None
        };
        let count = u16::from_le_bytes(self.array()?);
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name_len = u16::from_le_bytes(self.array()?);
            let name = self.bytes(usize::from(name_len))?;
            let name = String::from_utf8(name)
                .map_err(|e| self.corrupt(std::io::Error::other(format!("header name: {e}"))))?;
            let n = self.len32()?;
            headers.push((name, self.bytes(n)?));
        }
        self.index += 1;
        Ok(Some(SpooledRecord { key, value, headers, timestamp_ms }))
    }
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
    /// values and timestamps.
    #[test]
    fn records_round_trip() {
        let path = temp_path("round");
        let mut w = SpoolWriter::create(path.clone()).expect("create");
        let records = vec![
            SpooledRecord {
                key: Some(b"k".to_vec()),
                value: Some(b"v1".to_vec()),
                headers: vec![("h".into(), b"x".to_vec())],
                timestamp_ms: Some(-5),
            },
            SpooledRecord::default(),
            SpooledRecord { value: Some(Vec::new()), ..Default::default() },
        ];
        for r in &records {
            w.append(r.key.as_deref(), r.value.as_deref(), &r.headers, r.timestamp_ms).expect("append");
        }
        assert_eq!(w.records(), 3);
        w.flush(true).expect("flush");
        assert!(SpoolWriter::create(path.clone()).is_err(), "an existing spool is never overwritten");
        let mut r = SpoolReader::open(&path).expect("open");
        let mut back = Vec::new();
        while let Some(rec) = r.next_record().expect("read") {
            back.push(rec);
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
