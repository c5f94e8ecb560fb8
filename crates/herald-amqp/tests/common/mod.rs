//! Stand-ins for a broker, for the hermetic tests: a fake AMQP server, and a port nothing
//! listens on.

pub(crate) mod fake_broker;

/// No broker needed: a port on this machine that nothing listens on.
pub(crate) fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
