//! herald's kafka transport (in progress).
