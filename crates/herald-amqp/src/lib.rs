//! herald's amqp transport (in progress).
