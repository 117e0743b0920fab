//! The drivers' clock. The sans-IO core takes `std::time::Instant` values passed in; the loops
//! that feed it read the time here, through tokio's clock, so that a paused tokio runtime (the
//! simulation, `tokio::time::pause`) drives the whole tunnel in virtual time.

use std::time::Instant;

/// Now, on tokio's clock (virtual under a paused runtime, real otherwise).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
