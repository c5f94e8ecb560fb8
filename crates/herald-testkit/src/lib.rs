//! Test tools for herald and its adapters.
//!
//! - [`MemoryTransport`]: an in-memory [`herald_core::Transport`] that records what it receives
//!   and can be scripted to fail ([`CallFault`]: whole calls, some messages, latency; permanent
//!   rejections by rule).
//! - [`conformance`]: the suite every transport must pass inside a producer. An adapter
//!   implements [`conformance::Harness`] and calls [`conformance::run`];
//!   [`MemoryHarness`] is that harness for the in-memory transport.
//! - [`LogCapture`]: what herald logged on this thread, for tests of warnings.
//! - [`scenario`]: runs with known outcomes ([`scenario::ScriptedFaults`]), for checking what a
//!   producer reports against what happened.

pub mod baseline;
pub mod checks;
pub mod conformance;
mod logs;
mod memory;
pub mod proxy;
pub mod scenario;
pub mod tls;

pub use logs::LogCapture;
pub use memory::{CallFault, MemoryTransport};

use herald_core::{async_trait, Destination, ErrorClass, Message};

/// The conformance harness for [`MemoryTransport`]: one shared transport, destinations told
/// apart by name, faults by script.
#[derive(Debug, Clone)]
pub struct MemoryHarness {
    transport: MemoryTransport,
}

impl Default for MemoryHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryHarness {
    /// A harness whose transport rejects payloads starting with `poison`.
    pub fn new() -> Self {
        let transport = MemoryTransport::new();
        transport.reject_payload_prefix("poison");
        Self { transport }
    }
    /// The transport every producer of the suite uses.
    pub fn transport(&self) -> &MemoryTransport {
        &self.transport
    }
}

#[async_trait]
impl conformance::Harness for MemoryHarness {
    type Transport = MemoryTransport;

    async fn transport(&self) -> MemoryTransport {
        self.transport.clone()
    }

    async fn destination(&self, hint: &str) -> Destination {
        Destination::new(format!("memory-{hint}"))
    }

    fn poison(&self, destination: &Destination) -> Option<Message> {
        Some(Message::new(destination.clone(), "poison pill"))
    }

    async fn read_back(&self, destination: &Destination, _expected: usize) -> Option<Vec<Message>> {
        Some(
            self.transport
                .received()
                .into_iter()
                .filter(|m| m.destination() == destination)
                .collect(),
        )
    }

    async fn inject_transient_failures(&self, calls: usize) -> conformance::Injected {
        self.transport.script(std::iter::repeat_n(
            CallFault::FailAll(ErrorClass::Transient),
            calls,
        ));
        conformance::Injected::IntoTransport
    }
}
