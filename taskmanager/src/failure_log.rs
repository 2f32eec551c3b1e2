//! Quiet logging of a loop's repeated failures (a leaf: it imports nothing of the crate).

/// Logs repeated failures of a loop without flooding: failures number 1, 2, 4, ..., 32, then
/// every 64th, and a note when it works again.
#[derive(Debug, Default)]
pub struct FailureLog {
    consecutive: u32,
}

impl FailureLog {
    pub fn failure(&mut self, log: impl FnOnce()) {
        self.consecutive += 1;
        if self.consecutive.is_power_of_two() || self.consecutive & 63 == 0 {
            log();
        }
    }

    pub fn success(&mut self, message: &'static str) {
        if self.consecutive > 0 {
            tracing::info!(failures = self.consecutive, "{message}");
        }
        self.consecutive = 0;
    }
}
