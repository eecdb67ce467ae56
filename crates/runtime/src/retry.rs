//! The one retry policy: exponential backoff with jitter, used for nak delays of transient
//! failures and for re-establishing lost consumers. Built on `backon`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::WorkerSettings;

/// Exponential backoff with full jitter between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// The policy configured for workers.
    pub fn from_settings(settings: &WorkerSettings) -> Self {
        Self {
            min: settings.retry_min_delay,
            max: settings.retry_max_delay,
        }
    }

    /// A `backon` builder for retry loops (unbounded attempts; the caller stops on shutdown).
    pub fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }

    /// The delay before retry number `attempt` (1 = first retry), for nak delays.
    pub fn delay(&self, attempt: u64) -> Duration {
        let index = attempt.saturating_sub(1).min(64) as usize;
        self.builder()
            .build()
            .nth(index)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let policy = RetryPolicy {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        // With jitter the delay lies between the base and twice the base, capped at max.
        let first = policy.delay(1);
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
        let third = policy.delay(3);
        assert!(third >= Duration::from_millis(400), "{third:?}");
        assert!(policy.delay(50) <= Duration::from_secs(2));
    }
}
