//! Shared test code: stand-ins for a broker for the hermetic tests (a fake AMQP server, and a
//! port nothing listens on), and RabbitMQ nodes and clusters of a test's own for the real-broker
//! tests.

// Each test file compiles its own copy of this module and uses a part of it.
#![allow(dead_code)]

pub(crate) mod cluster;
pub(crate) mod fake_broker;
pub(crate) mod node;
pub(crate) mod recording;

pub(crate) use herald_testkit::checks::wait_for;

/// No broker needed: a port on this machine that nothing listens on.
pub(crate) fn closed_port() -> u16 {
    herald_testkit::checks::free_port()
}
