//! The test guest's memory checker (`godwit.verify=`) as the tests read
//! it: its verdict lines, and a whole round of checks without a mismatch.

use std::time::Duration;

use crate::RunningVm;

/// The console's `verify: <pages> pages, <checked> checked, <mismatches> mismatches`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub pages: u64,
    pub checked: u64,
    pub mismatches: u64,
}

/// Parses a verdict line; panics on any other line.
pub fn verdict(line: &str) -> Verdict {
    let parse = || {
        let rest = line.trim_end().strip_prefix("verify: ")?;
        let (pages, rest) = rest.split_once(" pages, ")?;
        let (checked, rest) = rest.split_once(" checked, ")?;
        let mismatches = rest.strip_suffix(" mismatches")?;
        Some(Verdict {
            pages: pages.parse().ok()?,
            checked: checked.parse().ok()?,
            mismatches: mismatches.parse().ok()?,
        })
    };
    parse().unwrap_or_else(|| panic!("not a verify line: {line:?}"))
}

/// The next verify verdict line (mismatch lines stay in `vm.seen`).
pub fn next_verdict(vm: &mut RunningVm) -> Verdict {
    loop {
        let line = vm.wait_prefix("verify: ", Duration::from_secs(30));
        if !line.starts_with("verify: mismatch") {
            return verdict(&line);
        }
    }
}

/// Reads verify lines until the guest has checked every page of its buffer
/// at least once more; panics on any mismatch. Returns the last verdict.
pub fn full_round_without_mismatch(vm: &mut RunningVm, what: &str) -> Verdict {
    let first = next_verdict(vm);
    let mut last = first;
    while last.checked < first.checked + first.pages {
        last = next_verdict(vm);
    }
    let bad: Vec<&String> = vm
        .seen
        .iter()
        .filter(|l| l.starts_with("verify: mismatch"))
        .collect();
    assert!(
        bad.is_empty() && first.mismatches == 0 && last.mismatches == 0,
        "{what}: the guest found memory that is not what it wrote: {bad:?}, {last:?}; console:\n{}",
        vm.seen.join("\n")
    );
    last
}
