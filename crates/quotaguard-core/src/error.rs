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
    /// The input part of `requested`, when known: whether a smaller output would fit.
    pub input: Option<u64>,
}

impl Refusal {
    /// The first line of the message: what was refused and why, with the figures.
    fn fact(&self) -> String {
        let left = format!(
            "requested {} tokens, {} of {} left",
            thousands(self.requested),
            thousands(self.remaining),
            thousands(self.total)
        );
        let m = &self.model;
        match self.reason {
            RefusalReason::Overdue => format!(
                "account is overdue: every call is refused until a top-up clears it (call to {m:?})"
            ),
            RefusalReason::Exhausted => format!("free quota of {m:?} exhausted: {left}"),
            RefusalReason::Expired => format!("free quota of {m:?} expired: {left}"),
            RefusalReason::NoQuota => format!("{m:?} has no free quota here: {left}"),
            RefusalReason::NotCovered => format!(
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
                    format!(
                        "call to {m:?} has input that cannot be bounded before it is sent ({detail}) \
                         and {why}"
                    )
                } else {
                    let model = if m.is_empty() {
                        String::new()
                    } else {
                        format!(" for {m:?}")
                    };
                    format!("{detail}{model} cannot be guarded (what it bills is unknown) and {why}")
                }
            }
            RefusalReason::Unverified => {
                let why = match self.cause {
                    Some(RefusalReason::Expired) => "has expired",
                    Some(RefusalReason::NoQuota) => "does not exist here",
                    Some(RefusalReason::NotCovered) => "does not cover this kind of call",
                    _ => "does not cover it",
                };
                format!("account is not identity-verified and the free quota of {m:?} {why}: {left}")
            }
        }
    }

    /// What the caller can do, one item a line, fitting the reason.
    pub fn fixes(&self) -> Vec<String> {
        let m = &self.model;
        // R5: the switch can be turned off only once the free quota is used up.
        let switch_off = |what: &str| {
            if self.remaining == 0 {
                format!(
                    "to let {what} be charged instead, switch Free Quota Only off: \
                     guard.set_free_only({m:?}, False) (`quotaguard free-only off {m}`)"
                )
            } else {
                format!(
                    "Free Quota Only can be switched off (to let {what} be charged) only once the \
                     {} free tokens left are used up",
                    thousands(self.remaining)
                )
            }
        };
        let shrink = "lower max_tokens, or pass clip=True to shrink it to the free tokens left";
        let sync = format!(
            "if the console shows more left than {}, the ledger is behind it: \
             guard.sync({m:?}, \"LEFT/TOTAL\") with the console's figure (`quotaguard sync {m} LEFT/TOTAL`)",
            thousands(self.remaining)
        );
        let verify = "once the account is identity-verified, say so: QuotaGuard(verified=True)";
        let input_fits = self.input.is_none_or(|i| i < self.remaining);
        let fits_smaller = self.remaining > 0 && self.requested > self.remaining && input_fits;
        let long_input = match self.input {
            Some(i) if self.remaining > 0 && !input_fits => Some(format!(
                "shorten the input: its {} tokens alone do not fit the {} free tokens left",
                thousands(i),
                thousands(self.remaining)
            )),
            _ => None,
        };
        let mut out: Vec<String> = Vec::new();
        match self.reason {
            RefusalReason::Overdue => out.push(
                "top up the account, then record it: guard.top_up(amount) or \
                 guard.set_balance(amount) (a balance of zero or more clears the overdue flag)"
                    .into(),
            ),
            RefusalReason::Exhausted => {
                if fits_smaller {
                    out.push(shrink.into());
                }
                out.extend(long_input);
                out.push(sync);
                out.push(switch_off("the calls beyond the free quota"));
            }
            RefusalReason::Expired => {
                out.push(format!(
                    "if the console shows a current free quota for {m:?}, record it: \
                     guard.grant({m:?}, tokens, activated_at=...) (`quotaguard grant {m}`)"
                ));
                out.push(switch_off("its calls"));
            }
            RefusalReason::NoQuota => {
                out.push(format!(
                    "if the console shows a free quota for {m:?}, record it: guard.grant({m:?}) \
                     (`quotaguard grant {m}`)"
                ));
                out.push(
                    "free quota covers calls to one region only (cn-beijing on the China site, \
                     ap-southeast-1 on the international site): check QuotaGuard(region=...)"
                        .into(),
                );
                out.push(switch_off("its calls"));
            }
            RefusalReason::NotCovered => {
                out.push("send it as a real-time call: only those draw on free quota".into());
                out.push(switch_off("batch and custom calls"));
            }
            RefusalReason::Unbounded | RefusalReason::Unguarded => {
                if self.reason == RefusalReason::Unbounded {
                    out.push(
                        "state a bound of its input: max_input_tokens=N on the call or the wrapper"
                            .into(),
                    );
                }
                if self.cause == Some(RefusalReason::Unverified) {
                    out.push(verify.into());
                } else if m.is_empty() {
                    out.push(
                        "to send it anyway, switch Free Quota Only off for the models that have it on \
                         (what it bills is not recorded)"
                            .into(),
                    );
                } else {
                    out.push(switch_off("such calls"));
                }
            }
            RefusalReason::Unverified => {
                if self.cause == Some(RefusalReason::Exhausted) {
                    if fits_smaller {
                        out.push(shrink.into());
                    }
                    out.extend(long_input);
                }
                out.push(verify.into());
            }
        }
        out
    }
}

impl fmt::Display for Refusal {
    /// The fact, that the call was not sent, and the fixes, one a line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}. It was not sent; to go on:", self.fact())?;
        for fix in self.fixes() {
            write!(f, "\n  - {fix}")?;
        }
        Ok(())
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
    #[error(
        "the ledger is blocked ({0:?}): every call is refused, and this one was not sent; \
         guard.unblock() or `quotaguard unblock` lifts it"
    )]
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
            input: None,
        };
        let text = r.to_string();
        let first = text.lines().next().unwrap_or_default();
        assert_eq!(
            first,
            "free quota of \"qwen-max\" exhausted: requested 1,200 tokens, 800 of 1,000,000 left. \
             It was not sent; to go on:"
        );
        assert!(text.contains("clip=True"), "{text}");
        assert!(text.contains("guard.sync(\"qwen-max\""), "{text}");
        // R5: the switch cannot be turned off while free tokens remain.
        assert!(!text.contains("set_free_only"), "{text}");
        assert!(
            text.contains("only once the 800 free tokens left are used up"),
            "{text}"
        );
        let gone = Refusal { remaining: 0, ..r };
        let text = gone.to_string();
        assert!(
            text.contains("guard.set_free_only(\"qwen-max\", False)"),
            "{text}"
        );
        assert!(
            !text.contains("clip=True"),
            "nothing is left to clip to: {text}"
        );
        let long = Refusal {
            input: Some(900),
            remaining: 800,
            ..gone
        };
        let text = long.to_string();
        assert!(
            !text.contains("clip=True"),
            "the input alone does not fit: {text}"
        );
        assert!(
            text.contains("its 900 tokens alone do not fit the 800"),
            "{text}"
        );
    }

    #[test]
    fn every_refusal_says_it_was_not_sent_and_what_to_do() {
        use RefusalReason::*;
        for reason in [
            Exhausted, Expired, NoQuota, NotCovered, Unverified, Overdue, Unbounded, Unguarded,
        ] {
            let r = Refusal {
                model: "qwen-max".into(),
                reason,
                remaining: 0,
                requested: 10,
                total: 100,
                cause: None,
                detail: Some("enable_search".into()),
                input: None,
            };
            let text = r.to_string();
            assert!(text.contains("It was not sent"), "{text}");
            assert!(!r.fixes().is_empty(), "{reason:?}");
            assert!(
                !text.contains("clip=True"),
                "nothing is left to clip to: {text}"
            );
        }
    }
}
