//! One error enum for the whole core. Every message names the offending value.
use std::fmt;

/// Why a call was refused under R6/R8 (or R7 for `Overdue`; docs/rules.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The free quota is used up (or too small for this call's worst case).
    Exhausted,
    /// The free quota's validity period has ended (R3).
    Expired,
    /// No free quota: never granted, or none in this region (R2).
    NoQuota,
    /// The kind of invocation is never covered by free quota (R4).
    NotCovered,
    /// The account is not identity-verified, so nothing chargeable may run (R6).
    Unverified,
    /// The account has an overdue balance (R7).
    Overdue,
    /// The call's input cannot be bounded before it is sent (web search, built-in
    /// tools, `fileid://` references) and no bound was stated (R8).
    Unbounded,
    /// The client method cannot be guarded: the wrapper does not know what it bills.
    Unguarded,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Expired => "expired",
            Self::NoQuota => "no_quota",
            Self::NotCovered => "not_covered",
            Self::Unverified => "unverified",
            Self::Overdue => "overdue",
            Self::Unbounded => "unbounded",
            Self::Unguarded => "unguarded",
        }
    }
}

/// A refused call: what the caller sees as `FreeTierOnly` / `AccountOverdue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub model: String,
    pub reason: RefusalReason,
    /// Free tokens left for this model when the call was refused.
    pub remaining: u64,
    /// The worst case the call asked for.
    pub requested: u64,
    /// The model's free quota total (0 when none).
    pub total: u64,
    /// Why the free quota did not cover it, when `reason` is `Unverified`; for
    /// `Unbounded` and `Unguarded`, `Some(Unverified)` when the account's state (not the
    /// Free Quota Only switch) refused it.
    pub cause: Option<RefusalReason>,
    /// What made an `Unbounded` call unbounded (`"enable_search"`), or the method an
    /// `Unguarded` refusal names (`"POST /audio/speech"`).
    pub detail: Option<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let left = format!(
            "requested {} tokens, {} of {} left",
            thousands(self.requested),
            thousands(self.remaining),
            thousands(self.total)
        );
        let m = &self.model;
        match self.reason {
            RefusalReason::Overdue => write!(
                f,
                "account is overdue: every call is refused until a top-up clears it (call to {m:?})"
            ),
            RefusalReason::Exhausted => write!(f, "free quota of {m:?} exhausted: {left}"),
            RefusalReason::Expired => write!(f, "free quota of {m:?} expired: {left}"),
            RefusalReason::NoQuota => write!(f, "{m:?} has no free quota here: {left}"),
            RefusalReason::NotCovered => write!(
                f,
                "call to {m:?} is not covered by free quota (batch and custom calls are always charged) \
                 and Free Quota Only is on"
            ),
            RefusalReason::Unbounded | RefusalReason::Unguarded => {
                let why = if self.cause == Some(RefusalReason::Unverified) {
                    "the account is not identity-verified"
                } else {
                    "Free Quota Only is on"
                };
                let detail = self.detail.as_deref().unwrap_or("?");
                if self.reason == RefusalReason::Unbounded {
                    write!(
                        f,
                        "call to {m:?} has input that cannot be bounded before it is sent ({detail}) \
                         and {why}: state a bound with max_input_tokens="
                    )
                } else {
                    let model = if m.is_empty() {
                        String::new()
                    } else {
                        format!(" for {m:?}")
                    };
                    write!(
                        f,
                        "{detail}{model} cannot be guarded (what it bills is unknown) and {why}: \
                         it was not sent"
                    )
                }
            }
            RefusalReason::Unverified => {
                let why = match self.cause {
                    Some(RefusalReason::Expired) => "has expired",
                    Some(RefusalReason::NoQuota) => "does not exist here",
                    Some(RefusalReason::NotCovered) => "does not cover this kind of call",
                    _ => "does not cover it",
                };
                write!(
                    f,
                    "account is not identity-verified and the free quota of {m:?} {why}: {left}"
                )
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuotaError {
    /// A bad argument value (Python `ValueError`).
    #[error("{0}")]
    Invalid(String),
    /// A call refused by the rules (Python `FreeTierOnly` / `AccountOverdue`).
    #[error("{0}")]
    Refused(Refusal),
    /// A budget would be exceeded (Python `BudgetExceeded`).
    #[error("{0}")]
    Budget(String),
    /// An operation the rules reject, such as R5 switch changes or settling twice
    /// (Python `QuotaGuardError`).
    #[error("{0}")]
    Rejected(String),
    /// The ledger is blocked by its kill switch (R15; Python `Blocked`): the reason.
    #[error("every call is refused: the ledger is blocked ({0:?}); `quotaguard unblock` lifts it")]
    Blocked(String),
    /// The ledger could not be read or written (Python `LedgerError`).
    #[error("ledger {ledger}: {message}")]
    Ledger { ledger: String, message: String },
    /// A wait was cut short by the caller (Ctrl-C: Python `KeyboardInterrupt`); nothing
    /// was recorded.
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T> = std::result::Result<T, QuotaError>;

pub fn invalid(msg: impl Into<String>) -> QuotaError {
    QuotaError::Invalid(msg.into())
}

/// `1234567` -> `"1,234,567"`: the console's way of writing token counts.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(362_917), "362,917");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn refusal_message_carries_values() {
        let r = Refusal {
            model: "qwen-max".into(),
            reason: RefusalReason::Exhausted,
            remaining: 800,
            requested: 1200,
            total: 1_000_000,
            cause: None,
            detail: None,
        };
        assert_eq!(
            r.to_string(),
            "free quota of \"qwen-max\" exhausted: requested 1,200 tokens, 800 of 1,000,000 left"
        );
    }
}
