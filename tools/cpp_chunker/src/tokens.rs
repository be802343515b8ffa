//! Token estimates. There is no tokenizer in this tool: tokens are *estimated* as
//! `bytes / 3.5`, rounded up. A budget of `N` tokens is therefore `floor(3.5 * N)` bytes.

/// Bytes per estimated token is 3.5 = 7 / 2; integer arithmetic keeps it exact.
pub const BYTES_PER_TOKEN: f64 = 3.5;

/// Estimated tokens for `bytes` bytes: `ceil(bytes / 3.5)`.
pub fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).saturating_mul(2).div_ceil(7)
}

/// Largest byte length whose estimate is at most `max_tokens`: `floor(3.5 * max_tokens)`,
/// never less than 1.
pub fn budget_bytes(max_tokens: u64) -> usize {
    let b = max_tokens.saturating_mul(7) / 2;
    usize::try_from(b).unwrap_or(usize::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_rounds_up() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(7), 2);
        assert_eq!(estimate_tokens(8), 3);
        assert_eq!(estimate_tokens(35), 10);
    }

    #[test]
    fn budget_is_consistent_with_estimate() {
        for t in 1..200u64 {
            let b = budget_bytes(t);
            assert!(estimate_tokens(b) <= t, "t={t} b={b}");
            assert!(estimate_tokens(b + 1) > t || b + 1 > budget_bytes(t));
        }
        assert_eq!(budget_bytes(16384), 57344);
    }
}
