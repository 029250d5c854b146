//! Backoff between attempts: exponential, capped, with jitter so that events
//! that failed together do not all come back at the same instant.

use std::time::Duration;

use crate::config::Settings;

/// The wait after failed attempt number `attempt` (1-based):
/// `base · 2^(attempt-1)`, capped at `backoff_max`, then scaled by a random
/// factor in [0.5, 1.0) ("equal jitter").
pub fn backoff(settings: &Settings, attempt: u32) -> Duration {
    let exp = settings
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = exp.min(settings.backoff_max);
    capped.mul_f64(0.5 + jitter() / 2.0)
}

/// A random number in [0, 1).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = Settings {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            ..Settings::default()
        };
        for _ in 0..100 {
            let first = backoff(&s, 1);
            assert!(first >= Duration::from_millis(500) && first < Duration::from_secs(1));
            let third = backoff(&s, 3);
            assert!(third >= Duration::from_secs(2) && third < Duration::from_secs(4));
            assert!(backoff(&s, 30) < Duration::from_secs(10));
        }
    }
}
