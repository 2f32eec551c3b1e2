//! Threads of a task's own, for work that must not hold the async runtime: opening and
//! closing blocking clients (a leaf module).

/// Drops `value` on a thread of its own, so that the caller does not wait for its teardown.
pub fn drop_off_thread<T: Send + 'static>(name: &str, value: T) {
    // When no thread can be started, the closure, and `value` with it, is dropped here.
    if let Err(e) = std::thread::Builder::new().name(name.to_string()).spawn(move || drop(value)) {
        tracing::debug!(error = %e, "cannot start a thread to drop on; dropped here");
    }
}

/// Runs blocking work on a thread of its own and awaits its result (`Err` when it panicked).
///
/// Not `spawn_blocking`: opening a Kafka client blocks for up to its request timeout (minutes,
/// if the spec says so) against an unreachable broker, and a task canceled meanwhile stops
/// waiting for it at once; but the tokio runtime's shutdown waits for every `spawn_blocking`
/// call still running, so a stopped TaskManager's process stayed alive until the call gave up.
/// A thread of its own ends with the process.
pub async fn off_runtime<T: Send + 'static>(
    name: String,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, tokio::sync::oneshot::error::RecvError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        // The receiver is gone when the task was canceled meanwhile: nothing to hand over.
        let _ = tx.send(work());
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a thread for blocking work");
    }
    rx.await
}

#[cfg(test)]
mod tests {
    use super::drop_off_thread;
    use std::sync::mpsc;
    use std::thread::ThreadId;

    /// Says on which thread it is dropped.
    struct DropProbe(mpsc::Sender<ThreadId>);

    impl Drop for DropProbe {
        fn drop(&mut self) {
            let _ = self.0.send(std::thread::current().id());
        }
    }

    /// `drop_off_thread` drops the value, and not on the caller's thread (whose teardown,
    /// such as closing Kafka clients, the caller then does not wait for).
    #[test]
    fn the_value_is_dropped_on_another_thread() {
        let (tx, rx) = mpsc::channel();
        drop_off_thread("test-drop", DropProbe(tx));
        let dropped_on = rx.recv().expect("the value is dropped");
        assert_ne!(dropped_on, std::thread::current().id());
    }
}
