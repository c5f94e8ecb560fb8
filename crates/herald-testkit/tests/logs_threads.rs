//! `LogCapture` on one thread while another thread, capturing nothing, is the first to reach a
//! log line. Its own test binary: it needs a process where no other capture is alive.
//!
//! tracing caches at each log line whether anyone wants it, computed when the line is first
//! reached. While at most one scoped subscriber is registered in the process, tracing computes
//! that from the subscriber of the thread that reaches the line first: a thread with none
//! cached "nobody", and a capture on another thread then missed the line for good. That made
//! herald-amqp's test of its connect warning fail in CI when a test beside it reached the
//! warning first.

use std::sync::mpsc;

use herald_testkit::LogCapture;

/// One log line (one callsite) that both threads reach.
fn warn_once(who: &str) {
    tracing::warn!(who, "shared line");
}

#[test]
fn a_line_another_thread_reached_first_is_still_captured() {
    let (started, wait_started) = mpsc::channel();
    let (reached, wait_reached) = mpsc::channel::<()>();
    let capturing = std::thread::spawn(move || {
        let logs = LogCapture::start();
        started.send(()).expect("main waits");
        wait_reached
            .recv()
            .expect("the other thread reached the line");
        warn_once("capturing");
        logs.text()
    });
    wait_started.recv().expect("the capture started");
    // This thread has no subscriber of its own, and reaches the line first.
    warn_once("bystander");
    reached.send(()).expect("the capturing thread waits");
    let text = capturing.join().expect("capturing thread");
    assert!(text.contains("who=\"capturing\""), "captured: {text:?}");
    assert!(
        !text.contains("bystander"),
        "another thread's line: {text:?}"
    );
}
