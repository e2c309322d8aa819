//! Rate limiting of log lines triggered by the guest, so that a misbehaving
//! (or malicious) driver cannot flood the host's logs.

use std::time::{Duration, Instant};

/// Once a kind of event was logged, it is logged again at most once per this
/// interval, with the number of occurrences suppressed in between.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Remembers, for `N` kinds of event, when each was last logged.
#[derive(Debug)]
pub(crate) struct LogLimiter<const N: usize> {
    last: [Option<Instant>; N],
    suppressed: [u64; N],
}

impl<const N: usize> Default for LogLimiter<N> {
    fn default() -> Self {
        LogLimiter {
            last: [None; N],
            suppressed: [0; N],
        }
    }
}

impl<const N: usize> LogLimiter<N> {
    /// Whether an event of kind `kind` should be logged now. `Some(n)` says
    /// yes, `n` being how many events of that kind were suppressed since it
    /// was last logged.
    pub(crate) fn check(&mut self, kind: usize) -> Option<u64> {
        let kind = kind.min(N.saturating_sub(1));
        let (Some(last), Some(suppressed)) =
            (self.last.get_mut(kind), self.suppressed.get_mut(kind))
        else {
            return None;
        };
        let now = Instant::now();
        match last {
            Some(t) if now.duration_since(*t) < LOG_INTERVAL => {
                *suppressed = suppressed.saturating_add(1);
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }

    /// Whether `kind` was ever logged.
    #[cfg(test)]
    pub(crate) fn seen(&self, kind: usize) -> bool {
        self.last.get(kind).is_some_and(Option::is_some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_suppresses() {
        let mut l = LogLimiter::<3>::default();
        assert_eq!(l.check(1), Some(0));
        assert_eq!(l.check(1), None);
        assert_eq!(l.check(1), None);
        assert!(l.seen(1));
        assert!(!l.seen(0));
        assert_eq!(l.check(0), Some(0));
        // Out-of-range kinds share the last slot instead of panicking.
        assert_eq!(l.check(99), Some(0));
        assert_eq!(l.check(2), None);
    }
}
