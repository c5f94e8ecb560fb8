//! Provisioning and benchmarks for the kafka adapter (in progress).

use std::path::Path;

use anyhow::{bail, Result};

use crate::it::Broker;

/// Finds or starts a broker for the integration tests.
pub(crate) fn provision() -> Result<Broker> {
    bail!("the kafka adapter's integration tests are not written yet")
}

/// `cargo xtask bench kafka`.
pub(crate) fn bench(_root: &Path) -> Result<()> {
    bail!("the kafka benchmark is not written yet")
}
