//! The decisions of R2..R10 (docs/rules.md) as pure functions of (state, request, now).
//! Ledgers call these inside their atomic step; nothing here does I/O.
use crate::error::{QuotaError, Refusal, RefusalReason, Result};
use crate::quota::QuotaRow;

/// The kind of invocation (R4).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    Realtime,
    Batch,
    Custom,
}

impl Kind {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "realtime" => Ok(Self::Realtime),
            "batch" => Ok(Self::Batch),
            "custom" => Ok(Self::Custom),
            other => Err(QuotaError::Invalid(format!(
                "kind {other:?} is not \"realtime\", \"batch\" or \"custom\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Realtime => "realtime",
            Self::Batch => "batch",
            Self::Custom => "custom",
        }
    }

    /// R4: only real-time inference draws on free quota.
    pub fn covered(self) -> bool {
        self == Self::Realtime
    }
}

/// What the guard knows of the account that is not ledger state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// R2: does this guard's region have free quota on its site?
    pub region_has_free: bool,
    /// R6: is the account identity-verified?
    pub verified: bool,
}

/// Free tokens a new call could draw on now, or why there are none (R2, R3).
pub fn free_available(
    quota: Option<&QuotaRow>,
    reserved: u64,
    policy: Policy,
    now_ms: i64,
) -> std::result::Result<u64, RefusalReason> {
    let q = match quota {
        Some(q) if policy.region_has_free && q.total > 0 => q,
        _ => return Err(RefusalReason::NoQuota),
    };
    if q.expired(now_ms) {
        return Err(RefusalReason::Expired);
    }
    match q.left().saturating_sub(reserved) {
        0 => Err(RefusalReason::Exhausted),
        n => Ok(n),
    }
}

/// `remaining(model)` as the user sees it: 0 when expired, none, or in another region.
pub fn remaining(quota: Option<&QuotaRow>, reserved: u64, policy: Policy, now_ms: i64) -> u64 {
    free_available(quota, reserved, policy, now_ms).unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Let the call through; `free_part` of its worst case is held from free quota.
    Admit {
        free_part: u64,
    },
    Refuse(Refusal),
}

/// R6, R7, R8: may a call whose worst case is `worst` go ahead?
#[allow(clippy::too_many_arguments)]
pub fn admit(
    model: &str,
    quota: Option<&QuotaRow>,
    reserved: u64,
    overdue: bool,
    policy: Policy,
    kind: Kind,
    worst: u64,
    now_ms: i64,
) -> Admission {
    let available = free_available(quota, reserved, policy, now_ms);
    let avail = *available.as_ref().unwrap_or(&0);
    let refuse = |reason, cause| {
        Admission::Refuse(Refusal {
            model: model.to_string(),
            reason,
            remaining: avail,
            requested: worst,
            total: quota.map_or(0, |q| q.total),
            cause,
            detail: None,
            input: None,
        })
    };
    if overdue {
        return refuse(RefusalReason::Overdue, None);
    }
    if kind.covered() && worst <= avail {
        return Admission::Admit { free_part: worst };
    }
    // Chargeable: free quota does not cover all of it (R6).
    let cause = if !kind.covered() {
        RefusalReason::NotCovered
    } else {
        available.err().unwrap_or(RefusalReason::Exhausted)
    };
    if !policy.verified {
        return refuse(RefusalReason::Unverified, Some(cause));
    }
    if quota.is_some_and(|q| q.free_only) {
        return refuse(cause, None);
    }
    Admission::Admit {
        free_part: if kind.covered() { avail } else { 0 },
    }
}

/// R6, R7, R8 for a call whose cost is not known before it is sent: input that cannot
/// be bounded (`Unbounded`), or a method the wrapper cannot guard (`Unguarded`). Such a
/// call may be charged, so it is refused wherever a chargeable call would be: the
/// account is overdue, not verified, or any of `quotas` (the models the call may use;
/// every model of the account when the call names none) has Free Quota Only on.
/// `None`: it may go ahead.
pub fn refuse_uncounted(
    model: &str,
    quotas: &[&QuotaRow],
    overdue: bool,
    policy: Policy,
    reason: RefusalReason,
    detail: &str,
    now_ms: i64,
) -> Option<Refusal> {
    let first = quotas.first().copied();
    let refusal = |reason, cause| Refusal {
        model: model.to_string(),
        reason,
        remaining: remaining(first, 0, policy, now_ms),
        requested: 0,
        total: first.map_or(0, |q| q.total),
        cause,
        detail: Some(detail.to_string()),
        input: None,
    };
    if overdue {
        return Some(refusal(RefusalReason::Overdue, None));
    }
    if !policy.verified {
        return Some(refusal(reason, Some(RefusalReason::Unverified)));
    }
    quotas
        .iter()
        .any(|q| q.free_only)
        .then(|| refusal(reason, None))
}

/// How a settled call's tokens divide between free quota and the bill (R6: input first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Split {
    pub free: u64,
    pub billable_input: u64,
    pub billable_output: u64,
}

pub fn split(input: u64, output: u64, free_cap: u64) -> Split {
    let free = free_cap.min(input + output);
    let free_in = free.min(input);
    let free_out = free - free_in;
    Split {
        free,
        billable_input: input - free_in,
        billable_output: output - free_out,
    }
}

/// Free tokens a settling call may take: what is left, less the other live reservations.
pub fn settle_cap(
    quota: Option<&QuotaRow>,
    reserved_by_others: u64,
    policy: Policy,
    kind: Kind,
    now_ms: i64,
) -> u64 {
    if !kind.covered() {
        return 0;
    }
    free_available(quota, reserved_by_others, policy, now_ms).unwrap_or(0)
}

/// R11 cost types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CostType {
    FreeQuota,
    PayAsYouGo,
    Split,
    Unpriced,
}

impl CostType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FreeQuota => "free_quota",
            Self::PayAsYouGo => "pay_as_you_go",
            Self::Split => "split",
            Self::Unpriced => "unpriced",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "free_quota" => Self::FreeQuota,
            "pay_as_you_go" => Self::PayAsYouGo,
            "split" => Self::Split,
            "unpriced" => Self::Unpriced,
            _ => return None,
        })
    }

    pub fn of(split: &Split, priced: bool) -> Self {
        let billable = split.billable_input + split.billable_output;
        if billable == 0 {
            Self::FreeQuota
        } else if !priced {
            Self::Unpriced
        } else if split.free == 0 {
            Self::PayAsYouGo
        } else {
            Self::Split
        }
    }
}

/// R5: may the Free Quota Only switch be turned on / off with `remaining` left?
pub fn check_free_only_change(model: &str, enable: bool, remaining: u64) -> Result<()> {
    if enable && remaining == 0 {
        return Err(QuotaError::Rejected(format!(
            "cannot enable Free Quota Only for {model:?}: it has no free quota left (none granted, expired or used up)"
        )));
    }
    if !enable && remaining > 0 {
        return Err(QuotaError::Rejected(format!(
            "cannot disable Free Quota Only for {model:?} while {remaining} free tokens remain"
        )));
    }
    Ok(())
}

/// R10 alert kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    QuotaLow,
    QuotaDepleted,
    QuotaExpiring,
    DailySpend,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QuotaLow => "quota_low",
            Self::QuotaDepleted => "quota_depleted",
            Self::QuotaExpiring => "quota_expiring",
            Self::DailySpend => "daily_spend",
        }
    }
}

/// The tokens at or below which a `quota_low` alert fires; threshold in parts per million.
pub fn low_mark(total: u64, threshold_ppm: u32) -> u64 {
    (total as u128 * threshold_ppm as u128 / 1_000_000) as u64
}

/// R10: which quota alerts apply to a quota with `left` of `total` free tokens.
/// The ledger keeps them to once per grant.
pub fn quota_alerts(total: u64, left: u64, threshold_ppm: Option<u32>) -> Vec<AlertKind> {
    let mut out = Vec::new();
    if total == 0 {
        return out;
    }
    if let Some(ppm) = threshold_ppm {
        if left <= low_mark(total, ppm) {
            out.push(AlertKind::QuotaLow);
        }
    }
    if left == 0 {
        out.push(AlertKind::QuotaDepleted);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::{QuotaRow, CUTOVER_MS};

    const ON: Policy = Policy {
        region_has_free: true,
        verified: true,
    };

    fn q(total: u64, used: u64) -> QuotaRow {
        QuotaRow {
            total,
            used,
            activated_ms: CUTOVER_MS,
            valid_days: 90,
            free_only: false,
            configured: false,
        }
    }

    fn now() -> i64 {
        CUTOVER_MS + 1000
    }

    #[test]
    fn r1_seed_example_shared_counter() {
        // root uses 100,000 and a RAM user 200,000 of one counter: 700,000 left.
        let mut quota = q(1_000_000, 0);
        for used in [100_000, 200_000] {
            let s = split(
                used,
                0,
                settle_cap(Some(&quota), 0, ON, Kind::Realtime, now()),
            );
            quota.used += s.free;
        }
        assert_eq!(remaining(Some(&quota), 0, ON, now()), 700_000);
    }

    #[test]
    fn r2_other_region_has_nothing() {
        let off = Policy {
            region_has_free: false,
            verified: true,
        };
        assert_eq!(remaining(Some(&q(1000, 0)), 0, off, now()), 0);
        assert_eq!(
            free_available(Some(&q(1000, 0)), 0, off, now()),
            Err(RefusalReason::NoQuota)
        );
    }

    #[test]
    fn r3_expired_quota_is_zero_and_says_expired() {
        let quota = q(1000, 0);
        let later = quota.expires_ms();
        assert_eq!(remaining(Some(&quota), 0, ON, later), 0);
        let mut sw = quota;
        sw.free_only = true;
        match admit("m", Some(&sw), 0, false, ON, Kind::Realtime, 10, later) {
            Admission::Refuse(r) => assert_eq!(r.reason, RefusalReason::Expired),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn r4_batch_and_custom_are_never_free() {
        let mut quota = q(1000, 0);
        assert_eq!(
            admit("m", Some(&quota), 0, false, ON, Kind::Batch, 10, now()),
            Admission::Admit { free_part: 0 }
        );
        quota.free_only = true;
        match admit("m", Some(&quota), 0, false, ON, Kind::Custom, 10, now()) {
            Admission::Refuse(r) => assert_eq!(r.reason, RefusalReason::NotCovered),
            a => panic!("{a:?}"),
        }
        assert_eq!(settle_cap(Some(&quota), 0, ON, Kind::Batch, now()), 0);
    }

    #[test]
    fn r5_switch_changes() {
        assert!(check_free_only_change("m", true, 0).is_err());
        assert!(check_free_only_change("m", true, 1).is_ok());
        assert!(check_free_only_change("m", false, 5)
            .unwrap_err()
            .to_string()
            .contains('5'));
        assert!(check_free_only_change("m", false, 0).is_ok());
    }

    #[test]
    fn r6_chargeable_calls() {
        let unverified = Policy {
            region_has_free: true,
            verified: false,
        };
        let quota = q(1000, 990);
        match admit(
            "m",
            Some(&quota),
            0,
            false,
            unverified,
            Kind::Realtime,
            20,
            now(),
        ) {
            Admission::Refuse(r) => {
                assert_eq!(r.reason, RefusalReason::Unverified);
                assert_eq!(r.cause, Some(RefusalReason::Exhausted));
                assert_eq!((r.remaining, r.requested, r.total), (10, 20, 1000));
            }
            a => panic!("{a:?}"),
        }
        // verified, switch off: allowed, holding the 10 free tokens
        assert_eq!(
            admit("m", Some(&quota), 0, false, ON, Kind::Realtime, 20, now()),
            Admission::Admit { free_part: 10 }
        );
        let mut sw = quota;
        sw.free_only = true;
        assert!(matches!(
            admit("m", Some(&sw), 0, false, ON, Kind::Realtime, 20, now()),
            Admission::Refuse(_)
        ));
        assert_eq!(
            admit("m", Some(&sw), 0, false, ON, Kind::Realtime, 10, now()),
            Admission::Admit { free_part: 10 }
        );
    }

    #[test]
    fn r6_partly_covered_call_is_input_first() {
        assert_eq!(
            split(100, 50, 120),
            Split {
                free: 120,
                billable_input: 0,
                billable_output: 30
            }
        );
        assert_eq!(
            split(100, 50, 60),
            Split {
                free: 60,
                billable_input: 40,
                billable_output: 50
            }
        );
        assert_eq!(
            split(100, 50, 500),
            Split {
                free: 150,
                billable_input: 0,
                billable_output: 0
            }
        );
    }

    #[test]
    fn r7_overdue_refuses_even_with_quota() {
        match admit(
            "m",
            Some(&q(1000, 0)),
            0,
            true,
            ON,
            Kind::Realtime,
            1,
            now(),
        ) {
            Admission::Refuse(r) => assert_eq!(r.reason, RefusalReason::Overdue),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn r8_worst_case_must_fit_after_reservations() {
        let mut quota = q(1000, 0);
        quota.free_only = true;
        assert_eq!(
            admit(
                "m",
                Some(&quota),
                400,
                false,
                ON,
                Kind::Realtime,
                600,
                now()
            ),
            Admission::Admit { free_part: 600 }
        );
        assert!(matches!(
            admit(
                "m",
                Some(&quota),
                401,
                false,
                ON,
                Kind::Realtime,
                600,
                now()
            ),
            Admission::Refuse(_)
        ));
    }

    #[test]
    fn r10_alert_marks() {
        assert_eq!(quota_alerts(1000, 201, Some(200_000)), vec![]);
        assert_eq!(
            quota_alerts(1000, 200, Some(200_000)),
            vec![AlertKind::QuotaLow]
        );
        assert_eq!(
            quota_alerts(1000, 0, Some(200_000)),
            vec![AlertKind::QuotaLow, AlertKind::QuotaDepleted]
        );
        assert_eq!(quota_alerts(1000, 0, None), vec![AlertKind::QuotaDepleted]);
        assert_eq!(quota_alerts(0, 0, Some(200_000)), vec![]);
    }

    #[test]
    fn r11_cost_types() {
        assert_eq!(CostType::of(&split(10, 10, 20), true), CostType::FreeQuota);
        assert_eq!(CostType::of(&split(10, 10, 0), true), CostType::PayAsYouGo);
        assert_eq!(CostType::of(&split(10, 10, 5), true), CostType::Split);
        assert_eq!(CostType::of(&split(10, 10, 5), false), CostType::Unpriced);
    }
}
