//! Where a guard's ledger lives and the settings a guard validates: one owner for
//! each policy (the default location, URL parsing, secrets in URLs, thresholds,
//! leases).
use std::path::{Path, PathBuf};

use crate::error::{invalid, Result};
use crate::ledger::sqlite::Durability;

/// The environment variable naming the ledger when none is given.
pub const LEDGER_ENV: &str = "QUOTAGUARD_LEDGER";
/// The environment variable naming the directory of a Redis ledger's spill files.
pub const SPILL_DIR_ENV: &str = "QUOTAGUARD_SPILL_DIR";

/// How a Redis ledger reaches its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    /// One server (`redis://`, or `rediss://` for TLS): its URL.
    Standalone(String),
    /// A Redis Cluster (`redis+cluster://`, `rediss+cluster://`): one URL per seed node.
    Cluster(Vec<String>),
}

/// Where a guard's ledger lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerUrl {
    Memory,
    Sqlite {
        path: PathBuf,
        durability: Durability,
    },
    Redis {
        topology: RedisTopology,
        /// The URL as given, its password hidden: what messages show.
        display: String,
    },
}

/// A path or URL that names the ledger in messages: printable, trimmed of nothing.
fn shown(text: &str) -> String {
    format!("{:?}", redacted(text))
}

impl LedgerUrl {
    /// `memory://`, `sqlite:///abs/path.db` (`?synchronous=full`), `redis://[:password@]host:port/db`,
    /// `rediss://…` (TLS), `redis+cluster://host:port[,host:port…]`, or a plain path.
    pub fn parse(text: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Err(invalid(format!("ledger {text:?} is empty")));
        }
        if text.chars().any(char::is_control) {
            return Err(invalid(format!(
                "ledger {} contains a control character",
                shown(text)
            )));
        }
        if text == "memory://" || text == ":memory:" {
            return Ok(Self::Memory);
        }
        let lower = text.to_ascii_lowercase();
        for (prefix, cluster, tls) in [
            ("redis+cluster://", true, false),
            ("rediss+cluster://", true, true),
            ("redis://", false, false),
            ("rediss://", false, true),
        ] {
            if lower.starts_with(prefix) {
                return Self::parse_redis(text, &text[prefix.len()..], cluster, tls);
            }
        }
        if lower.starts_with("file:") {
            // SQLite would read it as a URI, and the file opened would not be the one named.
            return Err(invalid(format!(
                "ledger {} is a file: URI, which quotaguard does not read: give the path itself \
                 or sqlite:///abs/path.db",
                shown(text)
            )));
        }
        let (rest, query) = match text.split_once('?') {
            Some((a, b)) if lower.starts_with("sqlite://") => (a, Some(b)),
            _ => (text, None),
        };
        let rest = match (rest.rsplit_once("?synchronous="), query) {
            // A plain path may carry the option too: "ledger.db?synchronous=full".
            (Some((path, mode)), None) => {
                return Ok(Self::Sqlite {
                    path: PathBuf::from(path),
                    durability: durability(&format!("synchronous={mode}"))?,
                })
            }
            _ => rest,
        };
        let durability = match query {
            None => Durability::Normal,
            Some(q) => durability(q)?,
        };
        let path = if lower.starts_with("sqlite://") {
            let p = &rest["sqlite://".len()..];
            if p.is_empty() {
                return Err(invalid(format!("ledger {} names no file", shown(text))));
            }
            PathBuf::from(p)
        } else if text.contains("://") {
            return Err(invalid(format!(
                "ledger {} is not memory://, sqlite:///path, redis://host:port/db, \
                 redis+cluster://host:port,… or a file path",
                shown(text)
            )));
        } else {
            PathBuf::from(rest)
        };
        Ok(Self::Sqlite { path, durability })
    }

    fn parse_redis(text: &str, rest: &str, cluster: bool, tls: bool) -> Result<Self> {
        let display = redacted(text);
        let scheme = if tls { "rediss" } else { "redis" };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        if hosts.is_empty() {
            return Err(invalid(format!("ledger {display:?} names no host")));
        }
        let nodes: Vec<&str> = hosts.split(',').map(str::trim).collect();
        if nodes.iter().any(|n| n.is_empty()) {
            return Err(invalid(format!("ledger {display:?} has an empty host")));
        }
        if nodes.len() > 1 && !cluster {
            return Err(invalid(format!(
                "ledger {display:?} names several hosts: use redis+cluster:// for a Redis Cluster"
            )));
        }
        let user = userinfo.map_or(String::new(), |u| format!("{u}@"));
        let db = path.split('?').next().unwrap_or("").trim_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(invalid(format!(
                "ledger {display:?}: the database {db:?} is not a number"
            )));
        }
        if cluster && !db.is_empty() && db != "0" {
            return Err(invalid(format!(
                "ledger {display:?}: a Redis Cluster has only database 0"
            )));
        }
        let urls: Vec<String> = nodes
            .iter()
            .map(|n| format!("{scheme}://{user}{n}{path}"))
            .collect();
        let topology = if cluster {
            RedisTopology::Cluster(urls)
        } else {
            RedisTopology::Standalone(urls.into_iter().next().unwrap_or_default())
        };
        Ok(Self::Redis { topology, display })
    }

    /// Where the ledger lives, as messages show it (no secret).
    pub fn display(&self) -> String {
        match self {
            Self::Memory => "memory://".into(),
            Self::Sqlite { path, .. } => path.display().to_string(),
            Self::Redis { display, .. } => display.clone(),
        }
    }
}

fn durability(option: &str) -> Result<Durability> {
    match option {
        "synchronous=normal" => Ok(Durability::Normal),
        "synchronous=full" => Ok(Durability::Full),
        q => Err(invalid(format!(
            "ledger option {q:?} is not synchronous=normal or synchronous=full"
        ))),
    }
}

/// Hides the password of any URL, whatever its scheme (`postgres://u:pw@h` →
/// `postgres://u:***@h`, `redis://:pw@h` → `redis://:***@h`), and the value of a
/// `password=` option, before the URL is shown anywhere.
pub fn redacted(url: &str) -> String {
    let Some(s) = url.find("://") else {
        return url.to_string();
    };
    let start = s + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let mut out = url[..start].to_string();
    match url[start..end].rfind('@') {
        Some(at) => {
            let userinfo = &url[start..start + at];
            match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***")),
                None => out.push_str("***"),
            }
            out.push_str(&url[start + at..end]);
        }
        None => out.push_str(&url[start..end]),
    }
    let tail = &url[end..];
    match tail.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let parts: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _))
                        if ["password", "pass", "pwd", "secret"]
                            .contains(&k.to_ascii_lowercase().as_str()) =>
                    {
                        format!("{k}=***")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&parts.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

/// Every URL inside a free text (an error message, a client's complaint) with its
/// password hidden, as [`redacted`] hides it.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let scheme_start = rest[..i]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
            .map_or(0, |(j, c)| j + c.len_utf8());
        let end = rest[i..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .map_or(rest.len(), |j| i + j);
        out.push_str(&rest[..scheme_start]);
        out.push_str(&redacted(&rest[scheme_start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The longest account, user, workspace or model name quotaguard stores.
pub const MAX_NAME_CHARS: usize = 256;

/// An account, user, workspace or model name as stored in every row: not blank, no
/// control character, at most [`MAX_NAME_CHARS`] characters.
pub fn check_name(what: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(invalid(format!("{what} {value:?} is empty")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} {value:?} contains a control character"
        )));
    }
    let n = value.chars().count();
    if n > MAX_NAME_CHARS {
        let head: String = value.chars().take(40).collect();
        return Err(invalid(format!(
            "{what} {head:?}… is {n} characters long (at most {MAX_NAME_CHARS})"
        )));
    }
    Ok(())
}

/// The default ledger file: `$HOME/.quotaguard/ledger.db`.
pub fn default_ledger_path(home: &Path) -> PathBuf {
    home.join(".quotaguard").join("ledger.db")
}

/// The directory quotaguard keeps its own files in by default: `$HOME/.quotaguard`.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".quotaguard"))
}

/// The ledger a guard opens: the one given, else `$QUOTAGUARD_LEDGER`, else the
/// default file. The second value is the directory to create (private) first: only
/// the default location's, never a directory the user named.
pub fn resolve_ledger(given: Option<&str>) -> Result<(LedgerUrl, Option<PathBuf>)> {
    if let Some(u) = given {
        return Ok((LedgerUrl::parse(u)?, None));
    }
    if let Some(u) = std::env::var(LEDGER_ENV).ok().filter(|v| !v.is_empty()) {
        return Ok((LedgerUrl::parse(&u)?, None));
    }
    let dir = home_dir().ok_or_else(|| {
        invalid(format!(
            "no ledger given, no ${LEDGER_ENV} and no $HOME to put the default one in"
        ))
    })?;
    let path = dir.join("ledger.db");
    Ok((
        LedgerUrl::Sqlite {
            path,
            durability: Durability::Normal,
        },
        Some(dir),
    ))
}

/// Where a Redis ledger spills the records it could not write: `$QUOTAGUARD_SPILL_DIR`,
/// else beside the default ledger.
pub fn spill_dir() -> Option<PathBuf> {
    match std::env::var_os(SPILL_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(d) => Some(PathBuf::from(d)),
        None => home_dir(),
    }
}

/// A quota alert threshold, a fraction in [0, 1], as parts per million.
pub fn threshold_ppm(fraction: f64) -> Result<u32> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(invalid(format!(
            "alert_threshold {fraction} is outside [0, 1]"
        )));
    }
    Ok((fraction * 1_000_000.0).round() as u32)
}

/// A high-spending rule (R10): alert when the previous CST day's bill exceeds `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRule {
    /// `None`: the whole account.
    pub model: Option<String>,
    /// pico-units of the account's currency.
    pub limit: i64,
}

impl SpendRule {
    /// A rule; `what` names the setting in the message about a negative amount.
    pub fn new(model: Option<String>, limit: i64, what: &str) -> Result<Self> {
        if limit < 0 {
            return Err(invalid(format!(
                "{what} {} is negative",
                crate::money::to_decimal(limit)
            )));
        }
        Ok(Self { model, limit })
    }
}

/// The longest lease quotaguard accepts: a week.
pub const MAX_LEASE_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// A reservation's lease (R9) in milliseconds.
pub fn lease_ms(seconds: f64) -> Result<i64> {
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_LEASE_SECONDS {
        return Err(invalid(format!(
            "lease_seconds {seconds} must be a positive number of seconds, at most {MAX_LEASE_SECONDS}"
        )));
    }
    Ok(((seconds * 1000.0).round() as i64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_urls() {
        assert_eq!(LedgerUrl::parse("memory://").unwrap(), LedgerUrl::Memory);
        assert_eq!(
            LedgerUrl::parse("sqlite:///tmp/x.db").unwrap(),
            LedgerUrl::Sqlite {
                path: "/tmp/x.db".into(),
                durability: Durability::Normal
            }
        );
        assert_eq!(
            LedgerUrl::parse("x.db?synchronous=full").unwrap(),
            LedgerUrl::Sqlite {
                path: "x.db".into(),
                durability: Durability::Full
            }
        );
        assert!(LedgerUrl::parse("ftp://x").is_err());
        assert!(LedgerUrl::parse("sqlite:///x.db?fast=yes")
            .unwrap_err()
            .to_string()
            .contains("fast=yes"));
        // Spaces belong to the file name.
        assert_eq!(
            LedgerUrl::parse("x.db ").unwrap(),
            LedgerUrl::Sqlite {
                path: "x.db ".into(),
                durability: Durability::Normal
            }
        );
    }

    #[test]
    fn redis_urls() {
        let u = LedgerUrl::parse("redis://:s3cret@127.0.0.1:6379/2").unwrap();
        assert_eq!(
            u,
            LedgerUrl::Redis {
                topology: RedisTopology::Standalone("redis://:s3cret@127.0.0.1:6379/2".into()),
                display: "redis://:***@127.0.0.1:6379/2".into(),
            }
        );
        let c = LedgerUrl::parse("redis+cluster://:pw@h1:7000,h2:7001").unwrap();
        assert_eq!(
            c,
            LedgerUrl::Redis {
                topology: RedisTopology::Cluster(vec![
                    "redis://:pw@h1:7000".into(),
                    "redis://:pw@h2:7001".into()
                ]),
                display: "redis+cluster://:***@h1:7000,h2:7001".into(),
            }
        );
        assert!(matches!(
            LedgerUrl::parse("rediss://h:6380").unwrap(),
            LedgerUrl::Redis { topology: RedisTopology::Standalone(u), .. } if u == "rediss://h:6380"
        ));
        for bad in [
            "redis://",
            "redis://h:1,h:2",
            "redis://h:1/x",
            "redis+cluster://h:1/3",
        ] {
            let e = LedgerUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.is_empty(), "{bad}");
        }
        let e = LedgerUrl::parse("redis://:topsecret@h:1,h:2")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("topsecret"), "{e}");
    }

    #[test]
    fn passwords_are_hidden_whatever_the_scheme() {
        for (url, want) in [
            ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
            ("Redis://:pw@host", "Redis://:***@host"),
            ("postgres://u:pw@h/db", "postgres://u:***@h/db"),
            ("rediss://token@h:1", "rediss://***@h:1"),
            (
                "redis://h:1/0?password=x&db=1",
                "redis://h:1/0?password=***&db=1",
            ),
            ("sqlite:///a@b/x.db", "sqlite:///a@b/x.db"),
            ("plain/path.db", "plain/path.db"),
        ] {
            assert_eq!(redacted(url), want, "{url}");
        }
        let e = LedgerUrl::parse("postgres://u:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn paths_are_taken_as_written() {
        for (text, path) in [
            ("x.db ", "x.db "),
            (" x.db", " x.db"),
            ("odd?name.db", "odd?name.db"),
            ("a?b?synchronous=full", "a?b"),
            ("sqlite:///tmp/a b.db", "/tmp/a b.db"),
        ] {
            match LedgerUrl::parse(text).unwrap() {
                LedgerUrl::Sqlite { path: p, .. } => assert_eq!(p, PathBuf::from(path), "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        for bad in [
            "\u{1}\u{2}",
            "led\nger.db",
            "x\0.db",
            "a\tb",
            "sqlite:///tmp/\u{7f}.db",
        ] {
            let e = LedgerUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("control character"), "{bad:?}: {e}");
            assert!(!e.chars().any(char::is_control), "{bad:?}: {e}");
        }
        for uri in ["file:x.db", "FILE:///tmp/x.db", "file:x.db?mode=ro"] {
            let e = LedgerUrl::parse(uri).unwrap_err().to_string();
            assert!(e.contains("file: URI") && e.contains(uri), "{e}");
        }
    }

    #[test]
    fn names_are_checked() {
        for good in [
            "default",
            "alice",
            "王",
            "ws-1 (eval)",
            &"a".repeat(MAX_NAME_CHARS),
        ] {
            check_name("account", good).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("\0", "control"),
            ("a\nb", "control"),
            ("\u{1b}[31m", "control"),
            (&"a".repeat(MAX_NAME_CHARS + 1) as &str, "257 characters"),
        ] {
            let e = check_name("account", bad).unwrap_err().to_string();
            assert!(e.starts_with("account ") && e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn passwords_are_hidden_inside_messages() {
        let msg = "cannot reach Redis://:hunter2@h:1/0 (or postgres://u:pw2@db/x): \
                   'rediss://tok3n@h:2' refused";
        let out = redact_text(msg);
        for secret in ["hunter2", "pw2", "tok3n"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains("Redis://:***@h:1/0"), "{out}");
        assert!(out.contains("postgres://u:***@db/x)"), "{out}");
        assert_eq!(redact_text("no url here"), "no url here");
        for odd in ["://@", "é://a:b@c", "x://", "://://:p@q"] {
            assert!(!redact_text(odd).contains(":b@"), "{odd}");
        }
    }

    #[test]
    fn thresholds_and_leases_are_checked() {
        assert_eq!(threshold_ppm(0.2).unwrap(), 200_000);
        assert!(threshold_ppm(1.5).unwrap_err().to_string().contains("1.5"));
        assert!(threshold_ppm(f64::NAN).is_err());
        assert_eq!(lease_ms(1.5).unwrap(), 1500);
        for bad in [0.0, -1.0, f64::INFINITY, f64::NAN, 1e12] {
            assert!(lease_ms(bad).is_err(), "{bad}");
        }
    }
}
