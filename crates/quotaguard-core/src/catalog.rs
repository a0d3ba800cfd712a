//! The model catalogue: free tokens, validity, output limits and prices per
//! model, bundled as TOML and overridable, key by key, by a user file.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{invalid, Result};
use crate::money::{per_token, Currency, PriceTable, Tier};

const BUNDLED: &str = include_str!("data/catalog.toml");

/// The site an account was opened on (R2, docs/rules.md): it fixes the free region and the currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    China,
    International,
}

impl Site {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "china" => Ok(Self::China),
            "international" => Ok(Self::International),
            other => Err(invalid(format!(
                "site {other:?} is not \"china\" or \"international\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::China => "china",
            Self::International => "international",
        }
    }

    pub fn currency(self) -> Currency {
        match self {
            Self::China => Currency::Cny,
            Self::International => Currency::Usd,
        }
    }

    /// The one region whose calls the free quota covers (R2).
    pub fn free_region(self) -> &'static str {
        match self {
            Self::China => "cn-beijing",
            Self::International => "ap-southeast-1",
        }
    }
}

/// Alibaba Cloud region ids quotaguard knows. Only each site's free region has free quota.
pub const KNOWN_REGIONS: &[&str] = &[
    "cn-beijing",
    "cn-hangzhou",
    "cn-shanghai",
    "cn-shenzhen",
    "cn-zhangjiakou",
    "cn-wulanchabu",
    "cn-hongkong",
    "ap-southeast-1",
    "ap-southeast-3",
    "ap-southeast-5",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-south-1",
    "us-east-1",
    "us-west-1",
    "eu-central-1",
    "eu-west-1",
    "me-east-1",
    "me-central-1",
];

pub fn check_region(region: &str) -> Result<()> {
    if KNOWN_REGIONS.contains(&region) {
        Ok(())
    } else {
        Err(invalid(format!(
            "region {region:?} is not a known Alibaba Cloud region (for example \"cn-beijing\" or \"ap-southeast-1\")"
        )))
    }
}

/// Whether a model reasons before it answers (R8: reasoning is output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Thinking {
    /// The model has no thinking mode.
    #[default]
    None,
    /// Thinking mode is off unless the call turns it on (`enable_thinking`).
    Optional,
    /// Thinking mode is on unless the call turns it off.
    Default,
    /// The model always reasons.
    Always,
}

impl Thinking {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "none" => Ok(Self::None),
            "optional" => Ok(Self::Optional),
            "default" => Ok(Self::Default),
            "always" => Ok(Self::Always),
            other => Err(invalid(format!(
                "thinking {other:?} is not \"none\", \"optional\", \"default\" or \"always\""
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Default => "default",
            Self::Always => "always",
        }
    }
}

/// A model's prices on one site: those of the site's own deployment region, and of
/// the other regions the site lists, in the site's currency.
#[derive(Debug, Clone, PartialEq)]
pub struct SitePrices {
    pub home: PriceTable,
    pub regions: BTreeMap<String, PriceTable>,
    /// The day these prices were last checked against the pricing page, when it
    /// differs from the catalogue's.
    pub prices_read: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub free_tokens: u64,
    /// Validity in days for quota activated before the 2025-09-08 cut-over (R3).
    pub valid_days: u32,
    pub max_input_tokens: Option<u64>,
    pub max_output_tokens: u64,
    pub default_max_output_tokens: u64,
    /// Whether the model reasons, and by default.
    pub thinking: Thinking,
    /// The longest chain of thought the model produces (its default thinking budget).
    pub max_reasoning_tokens: u64,
    /// The most input tokens one image can bill on this model.
    pub max_image_tokens: u64,
    pub prices: BTreeMap<&'static str, SitePrices>,
}

impl ModelInfo {
    /// The prices an account of `site` pays for a call deployed in `region` (R13):
    /// the site's own region, else a region the site lists; `None` when unknown.
    pub fn prices(&self, site: Site, region: &str) -> Option<&PriceTable> {
        let p = self.prices.get(site.name())?;
        if region == site.free_region() {
            Some(&p.home)
        } else {
            p.regions.get(region)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub prices_read: String,
    pub source: String,
    pub defaults: Defaults,
    pub models: BTreeMap<String, ModelInfo>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub free_tokens: u64,
    pub valid_days: u32,
    pub max_output_tokens: u64,
    pub default_max_output_tokens: u64,
    pub max_reasoning_tokens: u64,
    pub max_image_tokens: u64,
    pub cache_hit_percent: u32,
    pub explicit_cache_hit_percent: u32,
    pub cache_write_percent: u32,
    pub batch_percent: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    catalog: RawHeader,
    defaults: Defaults,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    prices_read: String,
    #[serde(default)]
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    free_tokens: Option<u64>,
    valid_days: Option<u32>,
    max_input_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    default_max_output_tokens: Option<u64>,
    thinking: Option<String>,
    max_reasoning_tokens: Option<u64>,
    max_image_tokens: Option<u64>,
    #[serde(default)]
    prices: BTreeMap<String, RawPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrices {
    currency: String,
    prices_read: Option<String>,
    tiers: Vec<RawTier>,
    cache_hit_percent: Option<u32>,
    explicit_cache_hit_percent: Option<u32>,
    cache_write_percent: Option<u32>,
    batch_percent: Option<u32>,
    #[serde(default)]
    regions: BTreeMap<String, RawRegionPrices>,
}

/// Another deployment region's column on the same site (same currency).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegionPrices {
    tiers: Vec<RawTier>,
    cache_hit_percent: Option<u32>,
    explicit_cache_hit_percent: Option<u32>,
    cache_write_percent: Option<u32>,
    batch_percent: Option<u32>,
}

/// The percentages a price table states (the rest are inherited or defaults).
struct RawPercents {
    cache_hit_percent: Option<u32>,
    explicit_cache_hit_percent: Option<u32>,
    cache_write_percent: Option<u32>,
    batch_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    up_to: Option<u64>,
    input: String,
    output: String,
    thinking_output: Option<String>,
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The line of a model's table header (`[models.NAME]`, `[models."NAME".prices…]`),
/// else the first line outside a comment that names it.
fn model_line(text: &str, model: &str) -> Option<usize> {
    if model.is_empty() {
        return None;
    }
    let quoted = format!("\"{model}\"");
    let header = |l: &str| {
        let t = l.trim_start();
        t.starts_with('[')
            && (t.contains(&format!("models.{model}]"))
                || t.contains(&format!("models.{model}."))
                || t.contains(&format!("models.{quoted}")))
    };
    let named = |l: &str| !l.trim_start().starts_with('#') && l.contains(model);
    text.lines()
        .position(header)
        .or_else(|| text.lines().position(named))
        .map(|i| i + 1)
}

/// The shape a single catalogue file may have: everything optional, nothing unknown.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialCatalog {
    catalog: Option<PartialHeader>,
    defaults: Option<PartialDefaults>,
    #[serde(default)]
    models: BTreeMap<String, PartialModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialHeader {
    prices_read: Option<String>,
    source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialDefaults {
    free_tokens: Option<u64>,
    valid_days: Option<u32>,
    max_output_tokens: Option<u64>,
    default_max_output_tokens: Option<u64>,
    max_reasoning_tokens: Option<u64>,
    max_image_tokens: Option<u64>,
    cache_hit_percent: Option<u32>,
    explicit_cache_hit_percent: Option<u32>,
    cache_write_percent: Option<u32>,
    batch_percent: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialModel {
    free_tokens: Option<u64>,
    valid_days: Option<u32>,
    max_input_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    default_max_output_tokens: Option<u64>,
    thinking: Option<String>,
    max_reasoning_tokens: Option<u64>,
    max_image_tokens: Option<u64>,
    #[serde(default)]
    prices: BTreeMap<String, PartialPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialPrices {
    currency: Option<String>,
    prices_read: Option<String>,
    tiers: Option<Vec<RawTier>>,
    cache_hit_percent: Option<u32>,
    explicit_cache_hit_percent: Option<u32>,
    cache_write_percent: Option<u32>,
    batch_percent: Option<u32>,
    #[serde(default)]
    regions: BTreeMap<String, PartialRegionPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PartialRegionPrices {
    tiers: Option<Vec<RawTier>>,
    cache_hit_percent: Option<u32>,
    explicit_cache_hit_percent: Option<u32>,
    cache_write_percent: Option<u32>,
    batch_percent: Option<u32>,
}

/// One price table from its tiers and percentages; a percentage not given comes from
/// `inherit` (the site's own table, for another region), else the defaults.
fn price_table(
    model: &str,
    currency: Currency,
    raw_tiers: Vec<RawTier>,
    p: &RawPercents,
    inherit: Option<&PriceTable>,
    d: &Defaults,
) -> Result<PriceTable> {
    let mut tiers = Vec::with_capacity(raw_tiers.len());
    for t in raw_tiers {
        tiers.push(Tier {
            up_to: t.up_to,
            input: per_token(&t.input, "input price")?,
            output: per_token(&t.output, "output price")?,
            thinking_output: t
                .thinking_output
                .as_deref()
                .map(|s| per_token(s, "thinking output price"))
                .transpose()?,
        });
    }
    let pick = |own: Option<u32>, from: fn(&PriceTable) -> u32, default: u32| {
        own.or(inherit.map(from)).unwrap_or(default)
    };
    let table = PriceTable {
        currency,
        tiers,
        cache_hit_percent: pick(
            p.cache_hit_percent,
            |t| t.cache_hit_percent,
            d.cache_hit_percent,
        ),
        explicit_cache_hit_percent: pick(
            p.explicit_cache_hit_percent,
            |t| t.explicit_cache_hit_percent,
            d.explicit_cache_hit_percent,
        ),
        cache_write_percent: pick(
            p.cache_write_percent,
            |t| t.cache_write_percent,
            d.cache_write_percent,
        ),
        batch_percent: pick(p.batch_percent, |t| t.batch_percent, d.batch_percent),
    };
    table.validate(model)?;
    Ok(table)
}

impl Catalog {
    pub fn bundled() -> Self {
        Self::from_sources(&[("bundled catalogue", BUNDLED)])
            .expect("the bundled catalogue is valid")
    }

    /// The bundled catalogue with a user file merged over it.
    pub fn with_overrides(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("catalog {name:?} cannot be read: {e}")))?;
        Self::from_sources(&[("bundled catalogue", BUNDLED), (&name, &text)])
    }

    /// Parses and merges `(name, text)` sources in order; errors name the source and line.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<Self> {
        let mut merged = toml::Table::new();
        for (name, text) in sources {
            let at = |e: &toml::de::Error| {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                    .unwrap_or(1);
                let hint = if e.message().contains("floating point") {
                    " (write prices as decimal strings, e.g. \"2.4\": floats are inexact)"
                } else {
                    ""
                };
                invalid(format!(
                    "catalog {name:?} line {line}: {}{hint}",
                    e.message()
                ))
            };
            let table: toml::Table = text.parse().map_err(|e| at(&e))?;
            // Each file on its own first: its errors then carry its own line numbers.
            toml::from_str::<PartialCatalog>(text).map_err(|e| at(&e))?;
            merge(&mut merged, table);
        }
        let (last_name, last_text) = sources.last().copied().unwrap_or(("catalogue", ""));
        let locate = |model: &str| match model_line(last_text, model) {
            Some(l) => format!("catalog {last_name:?} line {l}"),
            None => format!("catalog {last_name:?}"),
        };
        let raw: RawCatalog =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    invalid(format!("catalog {last_name:?}: {}", e.message()))
                })?;
        let d = raw.defaults;
        let mut models = BTreeMap::new();
        for (name, m) in raw.models {
            let here = |msg: String| invalid(format!("{}: model {name:?}: {msg}", locate(&name)));
            let mut prices = BTreeMap::new();
            for (site_name, p) in m.prices {
                let site = Site::parse(&site_name).map_err(|e| here(e.to_string()))?;
                let currency = Currency::parse(&p.currency).map_err(|e| here(e.to_string()))?;
                if currency != site.currency() {
                    return Err(here(format!(
                        "{site_name} prices must be in {}, not {currency}",
                        site.currency()
                    )));
                }
                let percents = RawPercents {
                    cache_hit_percent: p.cache_hit_percent,
                    explicit_cache_hit_percent: p.explicit_cache_hit_percent,
                    cache_write_percent: p.cache_write_percent,
                    batch_percent: p.batch_percent,
                };
                let home = price_table(&name, currency, p.tiers, &percents, None, &d)
                    .map_err(|e| here(e.to_string()))?;
                let mut regions = BTreeMap::new();
                for (region, r) in p.regions {
                    check_region(&region).map_err(|e| here(e.to_string()))?;
                    if region == site.free_region() {
                        return Err(here(format!(
                            "{site_name} prices: region {region:?} is the site's own: write its tiers \
                             beside the currency"
                        )));
                    }
                    // A region's percentages default to the site's own.
                    let percents = RawPercents {
                        cache_hit_percent: r.cache_hit_percent,
                        explicit_cache_hit_percent: r.explicit_cache_hit_percent,
                        cache_write_percent: r.cache_write_percent,
                        batch_percent: r.batch_percent,
                    };
                    let table = price_table(&name, currency, r.tiers, &percents, Some(&home), &d)
                        .map_err(|e| here(e.to_string()))?;
                    regions.insert(region, table);
                }
                let prices_read = p.prices_read;
                prices.insert(
                    site.name(),
                    SitePrices {
                        home,
                        regions,
                        prices_read,
                    },
                );
            }
            let thinking = match m.thinking.as_deref() {
                Some(t) => Thinking::parse(t).map_err(|e| here(e.to_string()))?,
                None => Thinking::None,
            };
            let valid_days = m.valid_days.unwrap_or(d.valid_days);
            if !(30..=90).contains(&valid_days) {
                return Err(here(format!("valid_days {valid_days} is outside 30..90")));
            }
            let max_out = m.max_output_tokens.unwrap_or(d.max_output_tokens);
            let info = ModelInfo {
                name: name.clone(),
                free_tokens: m.free_tokens.unwrap_or(d.free_tokens),
                valid_days,
                max_input_tokens: m.max_input_tokens,
                max_output_tokens: max_out,
                default_max_output_tokens: m.default_max_output_tokens.unwrap_or(max_out),
                thinking,
                max_reasoning_tokens: m.max_reasoning_tokens.unwrap_or(d.max_reasoning_tokens),
                max_image_tokens: m.max_image_tokens.unwrap_or(d.max_image_tokens),
                prices,
            };
            models.insert(name, info);
        }
        Ok(Self {
            prices_read: raw.catalog.prices_read,
            source: raw.catalog.source,
            defaults: d,
            models,
        })
    }

    pub fn model(&self, name: &str) -> Option<&ModelInfo> {
        self.models.get(name)
    }

    /// The output limit assumed for a call that states none.
    pub fn default_max_output(&self, model: &str) -> u64 {
        self.model(model)
            .map(|m| m.default_max_output_tokens)
            .unwrap_or(self.defaults.default_max_output_tokens)
    }

    /// The catalogue names closest to `name`, best first (at most three; none for a
    /// name the catalogue knows). Case is ignored: a name that differs only in case
    /// is the one suggestion; otherwise the names within a normalised Damerau-Levenshtein
    /// similarity of 0.7 are.
    pub fn closest(&self, name: &str) -> Vec<&str> {
        if self.models.contains_key(name) {
            return Vec::new();
        }
        let wanted = name.trim().to_lowercase();
        if let Some(same) = self.models.keys().find(|m| m.to_lowercase() == wanted) {
            return vec![same.as_str()];
        }
        let mut scored: Vec<(f64, &str)> = self
            .models
            .keys()
            .map(|m| {
                let score = strsim::normalized_damerau_levenshtein(&wanted, &m.to_lowercase());
                (score, m.as_str())
            })
            .filter(|(score, _)| *score >= 0.7)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        scored.into_iter().take(3).map(|(_, m)| m).collect()
    }

    /// `" (did you mean \"qwen-max\"?)"` for a name the catalogue does not know but
    /// has close names for, else `""`.
    pub fn did_you_mean(&self, name: &str) -> String {
        let close = self.closest(name);
        if close.is_empty() {
            return String::new();
        }
        let names: Vec<String> = close.iter().map(|m| format!("{m:?}")).collect();
        format!(" (did you mean {}?)", names.join(" or "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_names_ignore_case_and_typos() {
        let c = Catalog::bundled();
        assert_eq!(c.closest("qwen-max"), Vec::<&str>::new());
        assert_eq!(c.closest("Qwen-Max"), vec!["qwen-max"]);
        assert_eq!(c.closest(" QWEN-PLUS "), vec!["qwen-plus"]);
        assert_eq!(c.closest("qwen-maxx").first(), Some(&"qwen-max"));
        assert_eq!(c.closest("qwen-plsu").first(), Some(&"qwen-plus"));
        assert!(c.closest("qwen-maxx").len() <= 3);
        assert_eq!(c.closest("llama-3-70b"), Vec::<&str>::new());
        assert_eq!(c.did_you_mean("Qwen-Max"), " (did you mean \"qwen-max\"?)");
        assert_eq!(c.did_you_mean("llama-3-70b"), "");
    }

    #[test]
    fn bundled_covers_the_named_models() {
        let c = Catalog::bundled();
        for m in [
            "qwen-max",
            "qwen-plus",
            "qwen-turbo",
            "qwen-flash",
            "qwen3-max",
            "qwen3-coder-plus",
            "qwen3-coder-flash",
            "qwen-long",
        ] {
            let info = c.model(m).unwrap_or_else(|| panic!("{m} missing"));
            assert_eq!(info.free_tokens, 1_000_000);
            assert_eq!(
                info.prices(Site::China, "cn-beijing").unwrap().currency,
                Currency::Cny
            );
        }
        assert_eq!(
            c.model("qwen-max")
                .unwrap()
                .prices(Site::International, "ap-southeast-1")
                .unwrap()
                .currency,
            Currency::Usd
        );
        assert!(c
            .model("qwen-long")
            .unwrap()
            .prices(Site::International, "ap-southeast-1")
            .is_none());
    }

    #[test]
    fn tiers_count_k_as_a_thousand() {
        let c = Catalog::bundled();
        let plus = c
            .model("qwen-plus")
            .unwrap()
            .prices(Site::China, "cn-beijing")
            .unwrap();
        let bounds: Vec<_> = plus.tiers.iter().map(|t| t.up_to).collect();
        assert_eq!(bounds, [Some(128_000), Some(256_000), None]);
        // 130,000 input tokens is past 128K: the second tier (2.4 / 20).
        assert_eq!(plus.tier(130_000).input, per_token("2.4", "p").unwrap());
        assert_eq!(plus.tier(130_000).output, per_token("20", "p").unwrap());
        for (name, m) in &c.models {
            for site in m.prices.values() {
                for t in site.home.tiers.iter().filter_map(|t| t.up_to) {
                    assert_eq!(t % 1000, 0, "{name}: tier bound {t} is not in K = 1,000");
                }
            }
        }
    }

    #[test]
    fn thinking_marks_and_new_models() {
        let c = Catalog::bundled();
        for m in ["qwen3.5-plus", "qwen3.6-plus", "qwen3-32b"] {
            assert_eq!(c.model(m).unwrap().thinking, Thinking::Default, "{m}");
        }
        assert_eq!(c.model("qwen-plus").unwrap().thinking, Thinking::Optional);
        assert_eq!(c.model("qwen-max").unwrap().thinking, Thinking::None);
        assert_eq!(c.model("qwen-plus").unwrap().max_reasoning_tokens, 81_920);
        // Unchecked prices are left out, not guessed.
        assert!(c.model("qwen3.5-plus").unwrap().prices.is_empty());
        let bad = "[models.m]\nthinking = \"sometimes\"\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("u", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"sometimes\""), "{e}");
    }

    #[test]
    fn prices_per_deployment_region() {
        let over = "[models.qwen-plus.prices.china.regions.ap-southeast-1]\n\
                    tiers = [{ input = \"2.9\", output = \"8.7\" }]\n";
        let c = Catalog::from_sources(&[("b", BUNDLED), ("user.toml", over)]).unwrap();
        let m = c.model("qwen-plus").unwrap();
        let home = m.prices(Site::China, "cn-beijing").unwrap();
        let sg = m.prices(Site::China, "ap-southeast-1").unwrap();
        assert_eq!(sg.currency, Currency::Cny);
        assert_eq!(sg.tiers[0].input, per_token("2.9", "p").unwrap());
        assert_ne!(home.tiers[0].input, sg.tiers[0].input);
        assert_eq!(sg.cache_hit_percent, home.cache_hit_percent, "inherited");
        // A column the catalogue does not have is unknown, never another region's.
        assert!(m.prices(Site::China, "us-east-1").is_none());
        assert!(Catalog::bundled()
            .model("qwen-plus")
            .unwrap()
            .prices(Site::China, "ap-southeast-1")
            .is_none());
        let bad = "[models.qwen-plus.prices.china.regions.mars-1]\ntiers = [{ input = \"1\", output = \"1\" }]\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("u", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"mars-1\""), "{e}");
    }

    #[test]
    fn overrides_merge_key_by_key() {
        let over = "[models.qwen-max]\nfree_tokens = 100_000\n";
        let c = Catalog::from_sources(&[("b", BUNDLED), ("user.toml", over)]).unwrap();
        let m = c.model("qwen-max").unwrap();
        assert_eq!(m.free_tokens, 100_000);
        assert!(m.prices(Site::China, "cn-beijing").is_some(), "prices kept");
    }

    #[test]
    fn errors_name_file_and_line() {
        let bad = "[models.qwen-max]\nfree_tokens = 1\nvalid_days = = 3\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("user.toml", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"user.toml\" line 3"), "{e}");
        let bad = "# prices\n[models.qwen-max]\nfree_tokens = 1\ncolour = \"blue\"\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("user.toml", bad)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"user.toml\" line 4") && e.contains("colour"),
            "{e}"
        );
        let bad = "[models.qwen-max.prices.china]\ncurrency = \"CNY\"\ntiers = [{ input = 2.4, output = \"1\" }]\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("user.toml", bad)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"user.toml\" line 3") && e.contains("decimal strings"),
            "{e}"
        );
        let bad = "# my-model is ours\n\n[models.my-model]\nvalid_days = 200\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("user.toml", bad)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"user.toml\" line 3") && e.contains("200"),
            "{e}"
        );
        let bad = "[models.m.prices.china]\ncurrency = \"USD\"\ntiers = [{ input = \"1\", output = \"1\" }]\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("u", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("CNY"), "{e}");
        let bad = "[models.m.prices.china]\ncurrency = \"CNY\"\ntiers = [{ input = \"x\", output = \"1\" }]\n";
        let e = Catalog::from_sources(&[("b", BUNDLED), ("u", bad)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"x\""), "{e}");
    }

    #[test]
    fn regions_and_sites() {
        assert!(check_region("cn-beijing").is_ok());
        assert!(check_region("mars-1")
            .unwrap_err()
            .to_string()
            .contains("\"mars-1\""));
        assert_eq!(Site::International.free_region(), "ap-southeast-1");
        assert!(Site::parse("moon").is_err());
    }
}
