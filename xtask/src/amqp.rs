//! Provisioning and benchmarks for the amqp adapter (in progress).

use std::path::Path;

use anyhow::{bail, Result};

use crate::it::Broker;

/// Finds or starts a broker for the integration tests.
pub(crate) fn provision() -> Result<Broker> {
    bail!("the amqp adapter's integration tests are not written yet")
}

/// `cargo xtask bench amqp`.
pub(crate) fn bench(_root: &Path) -> Result<()> {
    bail!("the amqp benchmark is not written yet")
}
