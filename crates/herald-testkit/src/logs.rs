//! What herald logged, for tests that check a warning (or that a secret is not in it).

use std::sync::{Arc, Mutex, PoisonError};

use tracing::subscriber::DefaultGuard;

/// Records every event at `warn` or above (or the level given) logged on this thread while it lives, as the
/// command prints them (plain text, one event per line, with fields as `name=value`). On a
/// current-thread runtime that includes the tasks it spawns.
///
/// ```
/// let logs = herald_testkit::LogCapture::start();
/// tracing::warn!(setting = "mandatory", "weak");
/// assert!(logs.text().contains("setting=\"mandatory\""));
/// ```
pub struct LogCapture {
    sink: Sink,
    _guard: DefaultGuard,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Starts recording on this thread, `warn` and above.
    pub fn start() -> Self {
        Self::start_at(tracing::Level::WARN)
    }

    /// Starts recording on this thread, `level` and above.
    pub fn start_at(level: tracing::Level) -> Self {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(level)
            .with_ansi(false)
            .finish();
        keep_two_dispatchers_registered();
        Self {
            sink,
            // Registering it asks every log line reached so far again (tracing does that).
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// Everything recorded so far.
    pub fn text(&self) -> String {
        let bytes = self
            .sink
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// tracing caches at each log line (callsite) whether any subscriber wants it. While at most
/// one scoped subscriber is registered in the process, it computes that from the subscriber of
/// whichever thread reaches the line first, not from all of them: a test thread with no capture
/// that reached a line first made it "wanted by nobody" for good, and a capture on another
/// thread never saw it (herald-amqp's connect-warning test failed so in CI, depending on which
/// test got there first). With a second dispatcher registered for the life of the process,
/// tracing asks every registered one, the capture included, wherever the line is reached. It
/// wants nothing itself, so the other threads' events still go nowhere.
fn keep_two_dispatchers_registered() {
    static KEPT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    KEPT.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture").finish_non_exhaustive()
    }
}
