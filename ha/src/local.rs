//! The local HA backend: one host, no server.
//!
//! Everything lives under `<storage_dir>/<cluster_id>/`:
//!
//! | path | what |
//! | --- | --- |
//! | `leader/<role>.lock` | the election lock: the leader holds `flock(LOCK_EX)` on it for as long as it leads; the kernel drops it when the process dies |
//! | `leader/<role>.json` | the published [`LeaderInfo`] of the current (or last) leader |
//! | `epochs/<role>` | the last epoch handed out for the role, bumped under the lock |
//! | `meta/<key>` | one file per metadata key |
//!
//! Every file is replaced atomically (temporary file in the same directory, fsync, rename, fsync
//! of the directory). Temporary files start with `.`, which is why keys may not.
//!
//! A leadership is fenced by the lock itself: a fenced write first checks, under the backend's
//! mutex, that this backend still holds the lock of the leadership's epoch and that
//! `epochs/<role>` still carries that epoch.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use keel_proto::{KeelError, Result};
use rustix::fs::FlockOperation;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::keys::{error_chain, validate_cluster_id, validate_key, validate_prefix};
use crate::{HaServices, LeaderInfo, Leadership, Role};

/// How often a candidate retries the lock, and how often `watch_leader` re-reads.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// HA services on local files, for one host. See the module documentation for the layout.
pub struct LocalHaServices {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// The leaderships this backend holds, with the open lock file of each.
    held: Mutex<HashMap<Role, Held>>,
    /// Unique suffixes for temporary files and ids for leaderships.
    seq: AtomicU64,
}

struct Held {
    id: u64,
    epoch: u64,
    address: String,
    token: CancellationToken,
    /// Holds the flock; closing it (drop) releases the lock.
    lock: File,
}

impl std::fmt::Debug for LocalHaServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHaServices").field("root", &self.inner.root).finish()
    }
}

fn io_err(what: &str, path: &Path, e: &std::io::Error) -> KeelError {
    KeelError::ha(format!("{what} {}: {}", path.display(), error_chain(e)))
}

fn lost(leadership: &Leadership, why: impl std::fmt::Display) -> KeelError {
    KeelError::LeadershipLost {
        reason: format!("{} leadership of epoch {}: {why}", leadership.role, leadership.epoch),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KeelError::internal(format!("local HA file task failed: {e}")))?
}

/// Tries `flock(LOCK_EX|LOCK_NB)`; `Ok(false)` when someone else holds the lock.
fn try_lock(file: &File, path: &Path) -> Result<bool> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => Ok(false),
        Err(e) => Err(io_err("cannot lock", path, &e.into())),
    }
}

fn unlock(file: &File, path: &Path) {
    if let Err(e) = rustix::fs::flock(file, FlockOperation::Unlock) {
        tracing::warn!(path = %path.display(), error = %e, "cannot unlock ha lock file");
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("cannot open lock file", path, &e))
}

/// The contents of a file, `None` when it does not exist (or is a directory).
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::IsADirectory => Ok(None),
        Err(e) => Err(io_err("cannot read", path, &e)),
    }
}

fn parse_u64(path: &Path, bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| KeelError::ha(format!("{} does not hold a decimal number", path.display())))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("cannot fsync directory", dir, &e))
}

fn parse_leader(path: &Path, bytes: &[u8]) -> Result<LeaderInfo> {
    serde_json::from_slice(bytes)
        .map_err(|e| KeelError::ha(format!("leader record {} is not readable: {e}", path.display())))
}

impl LocalHaServices {
    /// Opens (creating it if needed) the HA directory `<storage_dir>/<cluster_id>/`. Fails with
    /// `KeelError::Ha` naming the path when it cannot be created or written.
    pub fn open(storage_dir: &Path, cluster_id: &str) -> Result<Self> {
        validate_cluster_id(cluster_id)?;
        let root = storage_dir.join(cluster_id);
        for sub in ["leader", "epochs", "meta"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create HA directory", &dir, &e))?;
        }
        // Creating a directory that already exists succeeds even when it is read-only: prove
        // that we can write.
        let probe = root.join(format!(".write-probe-{}", std::process::id()));
        std::fs::write(&probe, b"probe")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|e| io_err("HA directory is not writable:", &root, &e))?;
        tracing::debug!(root = %root.display(), "local ha services opened");
        Ok(LocalHaServices {
            inner: Arc::new(Inner { root, held: Mutex::new(HashMap::new()), seq: AtomicU64::new(0) }),
        })
    }

    /// The directory this backend keeps its files in (`<storage_dir>/<cluster_id>`).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }
}

impl Inner {
    fn held(&self) -> MutexGuard<'_, HashMap<Role, Held>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_path(&self, role: Role) -> PathBuf {
        self.root.join("leader").join(format!("{}.lock", role.as_str()))
    }

    fn leader_path(&self, role: Role) -> PathBuf {
        self.root.join("leader").join(format!("{}.json", role.as_str()))
    }

    fn epoch_path(&self, role: Role) -> PathBuf {
        self.root.join("epochs").join(role.as_str())
    }

    fn meta_root(&self) -> PathBuf {
        self.root.join("meta")
    }

    fn meta_path(&self, key: &str) -> PathBuf {
        self.meta_root().join(key)
    }

    fn read_epoch(&self, role: Role) -> Result<u64> {
        let path = self.epoch_path(role);
        match read_optional(&path)? {
            None => Ok(0),
            Some(bytes) => parse_u64(&path, &bytes),
        }
    }

    /// Replaces `path` atomically: temporary file in the same directory, fsync, rename, fsync
    /// of the directory (and of the directories created on the way).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| KeelError::internal(format!("{} has no parent directory", path.display())))?;
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create directory", dir, &e))?;
            // Make the new directory entries durable, up to the backend root.
            let mut d = dir;
            while let Some(parent) = d.parent() {
                sync_dir(parent)?;
                if parent == self.root || !parent.starts_with(&self.root) {
                    break;
                }
                d = parent;
            }
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err("cannot write", path, &e));
        }
        sync_dir(dir)
    }

    /// Called with the lock held: bumps the epoch, publishes the leader record and records the
    /// leadership. On error the lock file is dropped, which releases the lock.
    fn take_office(
        &self,
        role: Role,
        id: u64,
        address: String,
        token: CancellationToken,
        lock: File,
    ) -> Result<u64> {
        let epoch = self.read_epoch(role)? + 1;
        self.write_atomic(&self.epoch_path(role), epoch.to_string().as_bytes())?;
        let info = LeaderInfo { address: address.clone(), epoch };
        let json = serde_json::to_vec(&info)
            .map_err(|e| KeelError::internal(format!("cannot encode leader record: {e}")))?;
        self.write_atomic(&self.leader_path(role), &json)?;
        self.held().insert(role, Held { id, epoch, address, token, lock });
        Ok(epoch)
    }

    /// Gives up the leadership of `role` that `matches` (if this backend still holds it):
    /// cancels its token, removes the published leader record if it is still ours, and
    /// releases the lock.
    fn release(&self, role: Role, matches: impl Fn(&Held) -> bool) -> Result<()> {
        let mut held = self.held();
        let Some(h) = held.get(&role) else {
            return Ok(());
        };
        if !matches(h) {
            return Ok(());
        }
        let Some(h) = held.remove(&role) else {
            return Ok(());
        };
        h.token.cancel();
        let leader_path = self.leader_path(role);
        let mut result = Ok(());
        if let Some(bytes) = read_optional(&leader_path)? {
            let ours = parse_leader(&leader_path, &bytes).map(|i| i.epoch == h.epoch).unwrap_or(false);
            if ours {
                result = std::fs::remove_file(&leader_path)
                    .or_else(|e| if e.kind() == ErrorKind::NotFound { Ok(()) } else { Err(e) })
                    .map_err(|e| io_err("cannot remove leader record", &leader_path, &e))
                    .and_then(|()| sync_dir(&self.root.join("leader")));
            }
        }
        unlock(&h.lock, &self.lock_path(role));
        drop(h);
        tracing::info!(role = %role, "local leadership released");
        result
    }

    /// The published leader of `role`, or `None` when nobody holds the lock.
    fn read_leader(&self, role: Role) -> Result<Option<LeaderInfo>> {
        if let Some(h) = self.held().get(&role) {
            if !h.token.is_cancelled() {
                return Ok(Some(LeaderInfo { address: h.address.clone(), epoch: h.epoch }));
            }
        }
        let leader_path = self.leader_path(role);
        let Some(bytes) = read_optional(&leader_path)? else {
            return Ok(None);
        };
        let info = parse_leader(&leader_path, &bytes)?;
        if info.epoch < self.read_epoch(role)? {
            // A new leader holds the lock but has not published itself yet.
            return Ok(None);
        }
        let lock_path = self.lock_path(role);
        let probe = match OpenOptions::new().read(true).open(&lock_path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot open lock file", &lock_path, &e)),
        };
        // flock locks of separate open file descriptions conflict even within one process,
        // so this probe fails exactly when some leader (here or elsewhere) holds the lock.
        if try_lock(&probe, &lock_path)? {
            unlock(&probe, &lock_path);
            Ok(None)
        } else {
            Ok(Some(info))
        }
    }

    /// Runs `op` only while `leadership` is this backend's current leadership of its role and
    /// the epoch file still carries its epoch; the backend mutex is held throughout, so a
    /// resign cannot interleave.
    fn fenced<T>(&self, leadership: &Leadership, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let held = self.held();
        leadership.check()?;
        match held.get(&leadership.role) {
            Some(h) if h.epoch == leadership.epoch && !h.token.is_cancelled() => {}
            _ => {
                leadership.give_up();
                return Err(lost(leadership, "this process no longer holds the leader lock"));
            }
        }
        let on_disk = self.read_epoch(leadership.role)?;
        if on_disk != leadership.epoch {
            leadership.give_up();
            return Err(lost(leadership, format!("the epoch file says {on_disk}")));
        }
        op()
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        // Only walk the directory the prefix names (`jobs/` -> meta/jobs).
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let base = if dir_part.is_empty() { self.meta_root() } else { self.meta_path(dir_part) };
        let mut out = Vec::new();
        walk(&base, dir_part, prefix, &mut out)?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

fn walk(dir: &Path, rel: &str, prefix: &str, out: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory => return Ok(()),
        Err(e) => return Err(io_err("cannot list", dir, &e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("cannot list", dir, &e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(dir = %dir.display(), "skipping a file whose name is not utf-8");
            continue;
        };
        if name.starts_with('.') {
            continue; // temporary files
        }
        let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| io_err("cannot stat", &path, &e))?;
        if file_type.is_dir() {
            // Descend only where keys under the prefix can be.
            if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                walk(&path, &key, prefix, out)?;
            }
        } else if file_type.is_file() && key.starts_with(prefix) {
            if let Some(bytes) = read_optional(&path)? {
                out.push((key, bytes));
            }
        }
    }
    Ok(())
}

/// Cancels the token when dropped unless disarmed: a campaign abandoned half-way (its future
/// dropped) must not leave the lock held with nobody leading.
struct CancelOnDrop(Option<CancellationToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

#[async_trait]
impl HaServices for LocalHaServices {
    fn backend_name(&self) -> &'static str {
        "local"
    }

    async fn campaign(&self, role: Role, address: &str, shutdown: &CancellationToken) -> Result<Leadership> {
        let cancelled = || KeelError::Cancelled { reason: format!("campaign for {role} leadership stopped") };
        let lock_path = self.inner.lock_path(role);
        let file = blocking({
            let p = lock_path.clone();
            move || open_lock_file(&p)
        })
        .await?;
        loop {
            if shutdown.is_cancelled() {
                return Err(cancelled());
            }
            if try_lock(&file, &lock_path)? {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(cancelled()),
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }

        let id = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let mut guard = CancelOnDrop(Some(token.clone()));
        // Whoever cancels the token (resign, `Leadership::give_up`, a dropped campaign), the
        // lock is released and the leader record removed.
        {
            let inner = self.inner.clone();
            let token = token.clone();
            tokio::spawn(async move {
                token.cancelled().await;
                let r = blocking(move || inner.release(role, |h| h.id == id)).await;
                if let Err(e) = r {
                    tracing::warn!(role = %role, error = %e, "cannot release local leadership");
                }
            });
        }
        let epoch = blocking({
            let inner = self.inner.clone();
            let address = address.to_string();
            let token = token.clone();
            move || inner.take_office(role, id, address, token, file)
        })
        .await?;
        guard.0 = None;
        tracing::info!(role = %role, epoch, address, "local leadership won");
        Ok(Leadership::new(role, epoch, address.to_string(), token))
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        leadership.give_up();
        let inner = self.inner.clone();
        let (role, epoch) = (leadership.role, leadership.epoch);
        blocking(move || inner.release(role, |h| h.epoch == epoch)).await
    }

    async fn leader(&self, role: Role) -> Result<Option<LeaderInfo>> {
        let inner = self.inner.clone();
        blocking(move || inner.read_leader(role)).await
    }

    fn watch_leader(&self, role: Role, shutdown: CancellationToken) -> watch::Receiver<Option<LeaderInfo>> {
        // The first value is read right away (a few small file reads) so that a caller sees the
        // current leader without waiting for the first poll.
        let initial = self.inner.read_leader(role).unwrap_or_else(|e| {
            tracing::warn!(role = %role, error = %e, "cannot read leader");
            None
        });
        let (tx, rx) = watch::channel(initial);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                }
                let inner = inner.clone();
                match blocking(move || inner.read_leader(role)).await {
                    Ok(current) => {
                        tx.send_if_modified(|v| {
                            if *v != current {
                                *v = current;
                                true
                            } else {
                                false
                            }
                        });
                    }
                    Err(e) => tracing::warn!(role = %role, error = %e, "cannot read leader"),
                }
            }
        });
        rx
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        validate_key(key)?;
        let path = self.inner.meta_path(key);
        blocking(move || read_optional(&path)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        validate_prefix(prefix)?;
        let inner = self.inner.clone();
        let prefix = prefix.to_string();
        blocking(move || inner.list(&prefix)).await
    }

    async fn put(&self, leadership: &Leadership, key: &str, value: Vec<u8>) -> Result<()> {
        validate_key(key)?;
        let inner = self.inner.clone();
        let leadership = leadership.clone();
        let path = inner.meta_path(key);
        blocking(move || inner.fenced(&leadership, || inner.write_atomic(&path, &value))).await
    }

    async fn delete(&self, leadership: &Leadership, key: &str) -> Result<()> {
        validate_key(key)?;
        let inner = self.inner.clone();
        let leadership = leadership.clone();
        let path = inner.meta_path(key);
        blocking(move || {
            inner.fenced(&leadership, || {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(io_err("cannot delete", &path, &e)),
                }
                match path.parent() {
                    Some(dir) => sync_dir(dir),
                    None => Ok(()),
                }
            })
        })
        .await
    }

    async fn increment(&self, leadership: &Leadership, key: &str) -> Result<u64> {
        validate_key(key)?;
        let inner = self.inner.clone();
        let leadership = leadership.clone();
        let path = inner.meta_path(key);
        blocking(move || {
            inner.fenced(&leadership, || {
                let current = match read_optional(&path)? {
                    None => 0,
                    Some(bytes) => parse_u64(&path, &bytes)?,
                };
                let next = current + 1;
                inner.write_atomic(&path, next.to_string().as_bytes())?;
                Ok(next)
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leadership whose epoch file was bumped behind its back (which the lock makes
    /// impossible for a well-behaved peer, but a fenced write checks anyway) can no longer
    /// write, and is marked lost.
    #[tokio::test]
    async fn fenced_write_refused_when_epoch_file_moved_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ha = LocalHaServices::open(dir.path(), "c").expect("open");
        let l = ha.campaign(Role::JobManager, "a:1", &CancellationToken::new()).await.expect("win");
        ha.put(&l, "k", b"v".to_vec()).await.expect("put while leader");
        std::fs::write(ha.inner.epoch_path(Role::JobManager), format!("{}", l.epoch + 1)).expect("tamper");
        let err = ha.put(&l, "k", b"w".to_vec()).await.expect_err("must be refused");
        assert!(matches!(err, KeelError::LeadershipLost { .. }), "{err:?}");
        assert!(!l.is_valid());
        assert_eq!(ha.get("k").await.expect("get"), Some(b"v".to_vec()));
    }

    /// `Leadership::give_up` alone (without `resign`) releases the lock, so a standby is not
    /// starved by a leader that stopped leading.
    #[tokio::test]
    async fn give_up_releases_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = LocalHaServices::open(dir.path(), "c").expect("open");
        let b = LocalHaServices::open(dir.path(), "c").expect("open");
        let la = a.campaign(Role::ResourceManager, "a:1", &CancellationToken::new()).await.expect("a");
        la.give_up();
        let lb = tokio::time::timeout(
            Duration::from_secs(5),
            b.campaign(Role::ResourceManager, "b:1", &CancellationToken::new()),
        )
        .await
        .expect("b must win after a gave up")
        .expect("b");
        assert!(lb.epoch > la.epoch);
    }
}
