//! Exact money (R13). Amounts are integers in pico-units (10^-12 of the
//! currency): a price of P per million tokens is P * 10^6 pico-units per token,
//! so every cost is an exact integer product, and sums never round.
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

use crate::error::{invalid, QuotaError, Result};

/// Pico-units in one unit of currency.
pub const PICO: i64 = 1_000_000_000_000;
const PICO_SCALE: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Currency {
    Cny,
    Usd,
}

impl Currency {
    pub fn code(self) -> &'static str {
        match self {
            Self::Cny => "CNY",
            Self::Usd => "USD",
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "CNY" => Ok(Self::Cny),
            "USD" => Ok(Self::Usd),
            other => Err(invalid(format!(
                "currency {other:?} is not \"CNY\" or \"USD\""
            ))),
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// pico-units -> an exact decimal with trailing zeros removed. Sums of many amounts
/// are `i128`, so no bill overflows.
pub fn to_decimal(pico: impl Into<i128>) -> Decimal {
    Decimal::from_i128_with_scale(pico.into(), PICO_SCALE).normalize()
}

/// An exact decimal amount -> pico-units; refuses what pico-units cannot hold exactly.
pub fn from_decimal(amount: Decimal, what: &str) -> Result<i64> {
    let scaled = amount
        .checked_mul(Decimal::from(PICO))
        .ok_or_else(|| invalid(format!("{what} {amount} is too large")))?;
    if !scaled.fract().is_zero() {
        return Err(invalid(format!(
            "{what} {amount} has more than 12 decimal places"
        )));
    }
    i64::try_from(scaled.mantissa() / 10i128.pow(scaled.scale()))
        .map_err(|_| invalid(format!("{what} {amount} is too large")))
}

pub fn parse_amount(text: &str, what: &str) -> Result<i64> {
    let d = Decimal::from_str(text.trim())
        .map_err(|_| invalid(format!("{what} {text:?} is not a decimal number")))?;
    from_decimal(d, what)
}

/// `12.5` -> `"12.50"`; amounts shown with at least two decimals.
pub fn format_amount(pico: impl Into<i128>) -> String {
    let d = to_decimal(pico);
    if d.scale() < 2 {
        format!("{:.2}", d)
    } else {
        d.to_string()
    }
}

/// One price tier: applies to requests whose input tokens are at most `up_to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Inclusive upper bound of the request's input tokens; `None`: unbounded.
    pub up_to: Option<u64>,
    /// pico-units per input token.
    pub input: i64,
    /// pico-units per output token.
    pub output: i64,
    /// pico-units per output token in thinking mode, when it differs.
    pub thinking_output: Option<i64>,
}

/// A model's prices in one deployment region, as one site states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    pub currency: Currency,
    pub tiers: Vec<Tier>,
    /// Percentage of the input price charged for input that hit the implicit cache.
    pub cache_hit_percent: u32,
    /// Percentage of the input price charged for input that hit an explicit cache.
    pub explicit_cache_hit_percent: u32,
    /// Percentage of the input price charged for input that created an explicit cache.
    pub cache_write_percent: u32,
    /// Percentage of the real-time price charged for batch calls.
    pub batch_percent: u32,
}

/// What a settled call is charged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Billable {
    /// All input tokens of the request: they choose the tier.
    pub request_input: u64,
    pub input: u64,
    pub output: u64,
    /// Billable input tokens that were cache hits.
    pub cached_input: u64,
    /// Billable input tokens that created an explicit cache.
    pub cache_write_input: u64,
    /// The cache hits were explicit-cache hits.
    pub explicit_cache: bool,
    pub thinking: bool,
    pub batch: bool,
}

/// A per-million price written as a decimal string -> pico-units per token.
pub fn per_token(per_million: &str, what: &str) -> Result<i64> {
    let d = Decimal::from_str(per_million.trim())
        .map_err(|_| invalid(format!("{what} {per_million:?} is not a decimal number")))?;
    if d.is_sign_negative() {
        return Err(invalid(format!("{what} {per_million:?} is negative")));
    }
    let scaled = d * Decimal::from(1_000_000);
    if !scaled.fract().is_zero() {
        return Err(invalid(format!(
            "{what} {per_million:?} has more than 6 decimal places per million tokens"
        )));
    }
    i64::try_from(scaled.trunc().mantissa() / 10i128.pow(scaled.trunc().scale()))
        .map_err(|_| invalid(format!("{what} {per_million:?} is too large")))
}

fn percent_of(price: i64, percent: u32, what: &str) -> Result<i64> {
    let p = price as i128 * percent as i128;
    if p % 100 != 0 {
        return Err(invalid(format!(
            "{what}: {percent}% of {} per million tokens is not exact to 10^-12",
            to_decimal(price * 1_000_000)
        )));
    }
    i64::try_from(p / 100).map_err(|_| invalid(format!("{what}: a price is too large")))
}

impl PriceTable {
    /// The tier a request with `request_input` tokens falls in.
    pub fn tier(&self, request_input: u64) -> &Tier {
        self.tiers
            .iter()
            .find(|t| t.up_to.is_none_or(|up| request_input <= up))
            .unwrap_or_else(|| self.tiers.last().expect("a price table has a tier"))
    }

    /// Checks the tiers, and that every derived price (cache hits and writes, batch) is
    /// exact.
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.tiers.is_empty() {
            return Err(invalid(format!("{what}: no price tiers")));
        }
        if self.cache_hit_percent > 100
            || self.explicit_cache_hit_percent > 100
            || self.batch_percent > 100
        {
            return Err(invalid(format!(
                "{what}: a cache hit or batch percentage above 100"
            )));
        }
        if self.cache_write_percent > 1000 {
            return Err(invalid(format!(
                "{what}: cache_write_percent {} is above 1000",
                self.cache_write_percent
            )));
        }
        let mut last = 0u64;
        for (i, t) in self.tiers.iter().enumerate() {
            match t.up_to {
                Some(up) if up <= last && i > 0 => {
                    return Err(invalid(format!(
                        "{what}: tier up_to {up} is not above the previous tier's {last}"
                    )))
                }
                Some(up) => last = up,
                None if i + 1 != self.tiers.len() => {
                    return Err(invalid(format!(
                        "{what}: only the last tier may omit up_to"
                    )))
                }
                None => {}
            }
            percent_of(t.input, self.cache_hit_percent, what)?;
            percent_of(t.input, self.explicit_cache_hit_percent, what)?;
            percent_of(t.input, self.cache_write_percent, what)?;
            for price in [Some(t.input), Some(t.output), t.thinking_output]
                .into_iter()
                .flatten()
            {
                percent_of(price, self.batch_percent, what)?;
            }
        }
        Ok(())
    }

    /// The exact cost of a call's billable tokens, in pico-units.
    ///
    /// A batch call pays `batch_percent` of the real-time price for all of its tokens
    /// and no cache discount: the two do not stack (the platform's billing rules).
    pub fn cost(&self, b: &Billable) -> Result<i64> {
        let tier = self.tier(b.request_input);
        let out_price = if b.thinking {
            tier.thinking_output.unwrap_or(tier.output)
        } else {
            tier.output
        };
        let total: i128 = if b.batch {
            // validate() guarantees every per-token price is exact at this percentage.
            (b.input as i128 * percent_of(tier.input, self.batch_percent, "batch price")? as i128)
                + b.output as i128
                    * percent_of(out_price, self.batch_percent, "batch price")? as i128
        } else {
            let written = b.cache_write_input.min(b.input);
            let cached = b.cached_input.min(b.input - written);
            let hit = if b.explicit_cache {
                self.explicit_cache_hit_percent
            } else {
                self.cache_hit_percent
            };
            let hit_price = percent_of(tier.input, hit, "cache price")?;
            let write_price = percent_of(tier.input, self.cache_write_percent, "cache price")?;
            (b.input - written - cached) as i128 * tier.input as i128
                + cached as i128 * hit_price as i128
                + written as i128 * write_price as i128
                + b.output as i128 * out_price as i128
        };
        i64::try_from(total).map_err(|_| {
            QuotaError::Invalid(format!(
                "cost of {} input and {} output tokens is too large to record",
                b.input, b.output
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plus() -> PriceTable {
        PriceTable {
            currency: Currency::Cny,
            tiers: vec![
                Tier {
                    up_to: Some(128_000),
                    input: per_token("0.8", "p").unwrap(),
                    output: per_token("2", "p").unwrap(),
                    thinking_output: Some(per_token("8", "p").unwrap()),
                },
                Tier {
                    up_to: Some(256_000),
                    input: per_token("2.4", "p").unwrap(),
                    output: per_token("20", "p").unwrap(),
                    thinking_output: Some(per_token("24", "p").unwrap()),
                },
                Tier {
                    up_to: None,
                    input: per_token("4.8", "p").unwrap(),
                    output: per_token("48", "p").unwrap(),
                    thinking_output: Some(per_token("64", "p").unwrap()),
                },
            ],
            cache_hit_percent: 20,
            explicit_cache_hit_percent: 10,
            cache_write_percent: 125,
            batch_percent: 50,
        }
    }

    #[test]
    fn prices_are_exact_pico_per_token() {
        assert_eq!(per_token("0.15", "p").unwrap(), 150_000);
        assert_eq!(per_token("2.4", "p").unwrap(), 2_400_000);
        assert!(per_token("0.0000001", "p").is_err());
        assert!(per_token("-1", "p")
            .unwrap_err()
            .to_string()
            .contains("\"-1\""));
        assert!(per_token("abc", "input price")
            .unwrap_err()
            .to_string()
            .contains("input price \"abc\""));
    }

    #[test]
    fn one_million_tokens_cost_the_list_price() {
        let t = plus();
        let b = Billable {
            request_input: 1000,
            input: 1_000_000,
            output: 1_000_000,
            ..Default::default()
        };
        assert_eq!(to_decimal(t.cost(&b).unwrap()).to_string(), "2.8");
    }

    #[test]
    fn tier_boundary_is_inclusive_and_k_is_a_thousand() {
        let t = plus();
        let at = Billable {
            request_input: 128_000,
            input: 1_000_000,
            ..Default::default()
        };
        let over = Billable {
            request_input: 128_001,
            ..at
        };
        // 130,000 input tokens is past 128K: the second tier (2.4 / 20), not the first.
        let issue = Billable {
            request_input: 130_000,
            input: 130_000,
            output: 1_000,
            ..Default::default()
        };
        assert_eq!(
            to_decimal(t.cost(&issue).unwrap()).to_string(),
            "0.332" // 130,000 x 2.4 + 1,000 x 20 per million
        );
        assert_eq!(to_decimal(t.cost(&at).unwrap()).to_string(), "0.8");
        assert_eq!(to_decimal(t.cost(&over).unwrap()).to_string(), "2.4");
        let huge = Billable {
            request_input: 5_000_000,
            ..at
        };
        assert_eq!(to_decimal(t.cost(&huge).unwrap()).to_string(), "4.8");
    }

    #[test]
    fn thinking_cache_and_batch() {
        let t = plus();
        let think = Billable {
            request_input: 10,
            output: 1_000_000,
            thinking: true,
            ..Default::default()
        };
        assert_eq!(to_decimal(t.cost(&think).unwrap()).to_string(), "8");
        let cached = Billable {
            request_input: 10,
            input: 1_000_000,
            cached_input: 500_000,
            ..Default::default()
        };
        // 500k at 0.8 + 500k at 0.16
        assert_eq!(to_decimal(t.cost(&cached).unwrap()).to_string(), "0.48");
        let batch = Billable {
            request_input: 10,
            input: 1_000_000,
            output: 1_000_000,
            batch: true,
            ..Default::default()
        };
        assert_eq!(to_decimal(t.cost(&batch).unwrap()).to_string(), "1.4");
        let one = Billable {
            request_input: 1,
            input: 1,
            ..Default::default()
        };
        assert_eq!(to_decimal(t.cost(&one).unwrap()).to_string(), "0.0000008");
    }

    #[test]
    fn explicit_cache_writes_and_hits() {
        let t = plus();
        // 100k plain, 400k written to an explicit cache (125 %), 500k explicit hits (10 %).
        let b = Billable {
            request_input: 10,
            input: 1_000_000,
            cache_write_input: 400_000,
            cached_input: 500_000,
            explicit_cache: true,
            ..Default::default()
        };
        // 0.08 + 0.4 + 0.04
        assert_eq!(to_decimal(t.cost(&b).unwrap()).to_string(), "0.52");
        // The same hits from the implicit cache cost 20 %.
        let implicit = Billable {
            explicit_cache: false,
            ..b
        };
        assert_eq!(to_decimal(t.cost(&implicit).unwrap()).to_string(), "0.56");
    }

    #[test]
    fn batch_and_cache_discounts_do_not_stack() {
        let t = plus();
        let b = Billable {
            request_input: 10,
            input: 1_000_000,
            cached_input: 1_000_000,
            output: 1_000_000,
            batch: true,
            ..Default::default()
        };
        // 50 % of 0.8 + 50 % of 2: the cache hits get no further discount.
        assert_eq!(to_decimal(t.cost(&b).unwrap()).to_string(), "1.4");
    }

    #[test]
    fn amounts_round_trip() {
        assert_eq!(
            parse_amount("12.5", "balance").unwrap(),
            12 * PICO + PICO / 2
        );
        assert_eq!(format_amount(12 * PICO + PICO / 2), "12.50");
        assert_eq!(format_amount(150_000), "0.00000015");
        assert!(parse_amount("1e40", "balance").is_err());
        assert!(parse_amount("0.0000000000001", "balance")
            .unwrap_err()
            .to_string()
            .contains("12 decimal"));
        assert!(parse_amount("ten", "balance")
            .unwrap_err()
            .to_string()
            .contains("\"ten\""));
    }

    #[test]
    fn validate_rejects_inexact_derived_prices() {
        let mut t = plus();
        t.tiers[0].input = 1; // 20 % of one pico is not a whole pico
        assert!(t.validate("qwen-plus").is_err());
        assert!(plus().validate("qwen-plus").is_ok());
    }
}
