//! `redis://`, `rediss://`, `redis+cluster://`: one ledger shared by every machine.
//!
//! Each atomic step is one `EVALSHA` of `redis.lua` (reloaded on `NOSCRIPT`), on
//! integers and flags only: the rules and all money stay here, in Rust. Every key of an
//! account carries the hash tag `{account}`, so an account lives in one Cluster slot
//! and every step touches one slot. Leases are judged by the server's `TIME` unless the
//! caller's clock is a test clock ([`Now::Caller`]).
//!
//! A settle is one round trip when the token step goes as the reservation predicts
//! (the call stays within its own free hold): the script checks the prediction and
//! commits the record Rust priced in the same step. Otherwise the token split is
//! written with a pending marker in that step and committed by a second one; a crash
//! in between is completed by [`Ledger::recover`] from the marker, exactly once.
//!
//! Faults fail closed: an unreachable server is a `LedgerError` naming it, and no call
//! is admitted. A settle that cannot reach the server (the call already happened)
//! retries for about a second, then spills its token step to a local file (0600) and
//! raises; the spill is replayed, once, on the next step that reaches the server (the
//! script recognises a replay by the record's id). A server that lost its data (its
//! epoch key is gone or changed) is reported on the first step that sees it, and
//! models that are not granted again are refused under Free Quota Only.
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{ConnectionLike, ErrorKind, RedisError, RedisResult, ServerErrorKind, Value};

use super::{
    AccountOp, AccountRow, DailyRow, Finish, GrantArgs, Hold, HoldRequest, HourRow, Inspection,
    Ledger, Now, QuotaRow, Reconcile, RecordQuery, Release, ReservationRow, Settled, Snapshot,
    TakeRequest, Taken, UsageRecord,
};
use crate::clock::{cst_day, hour_start, system_now_ms, DAY_MS};
use crate::config::{redacted, RedisTopology};
use crate::error::{QuotaError, Result};
use crate::money::Currency;
use crate::quota::CUTOVER_DAYS;
use crate::rules::Kind;

const SCRIPT: &str = include_str!("redis.lua");
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a settle keeps trying an unreachable server before it spills.
const SETTLE_RETRIES: [u64; 4] = [0, 100, 300, 600];
/// A settle pending for longer than this was left by a crash: recover it.
const PENDING_AGE_MS: i64 = 30_000;
/// How often a guard looks for settles left pending by a crash.
const RECOVERY_EVERY_MS: i64 = 60_000;
const SEP: char = '\u{1f}';
/// How many times a step is run again when the server lost its scripts meanwhile.
const NOSCRIPT_RETRIES: u32 = 16;

enum Conn {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c.as_mut(),
        }
    }
}

/// Why a step failed: the server could not be reached (the step may or may not have
/// run), or anything else.
enum StepError {
    Down(QuotaError),
    Other(QuotaError),
}

impl From<StepError> for QuotaError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::Down(e) | StepError::Other(e) => e,
        }
    }
}

impl From<QuotaError> for StepError {
    fn from(e: QuotaError) -> Self {
        StepError::Other(e)
    }
}

type Step<T> = std::result::Result<T, StepError>;

pub struct Redis {
    display: String,
    topology: RedisTopology,
    /// One connection per process: a child after `fork()` opens its own.
    conn: Mutex<Option<(u32, Conn)>>,
    script: redis::Script,
    /// The epoch this process knows, per account.
    epochs: Mutex<HashMap<String, String>>,
    /// The last quota seen per (account, model): what a settle predicts against.
    seen: Mutex<HashMap<(String, String), Option<QuotaRow>>>,
    /// Where spilled settles go, and where epochs are remembered across runs.
    dir: Option<PathBuf>,
    /// A spill may wait to be replayed.
    spilled: AtomicBool,
    last_recovery_ms: AtomicI64,
}

impl Drop for Redis {
    fn drop(&mut self) {
        // The parent's socket, in a forked child: never written to nor closed.
        let slot = self.conn.get_mut();
        if slot
            .as_ref()
            .is_some_and(|(p, _)| *p != crate::process::pid())
        {
            if let Some(inherited) = slot.take() {
                std::mem::forget(inherited);
            }
        }
    }
}

/// The hash tag of an account: its name, or its hex form when a brace in the name
/// would end the tag early.
fn tag(account: &str) -> String {
    if account.contains(['{', '}']) {
        account.bytes().map(|b| format!("{b:02x}")).collect()
    } else {
        account.to_string()
    }
}

fn prefix(account: &str) -> String {
    format!("qg:{{{}}}:", tag(account))
}

fn is_down(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

fn now_arg(now: Now) -> String {
    match now {
        Now::Caller(ms) => ms.to_string(),
        Now::System(_) => String::new(),
    }
}

fn b(v: bool) -> &'static str {
    if v {
        "1"
    } else {
        "0"
    }
}

/// A small FNV-1a hash: a stable file name for a server and account.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

// ---- reading replies ----

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).parse().unwrap_or(0),
    }
}

fn count(v: &Value) -> u64 {
    u64::try_from(int(v)).unwrap_or(0)
}

/// The quota row of a reply, from `at`: exists, total, used, activated, days, free_only,
/// configured.
fn quota_at(r: &[Value], at: usize) -> Option<QuotaRow> {
    let f = |i: usize| r.get(at + i).map_or(0, int);
    (f(0) != 0).then(|| QuotaRow {
        total: u64::try_from(f(1)).unwrap_or(0),
        used: u64::try_from(f(2)).unwrap_or(0),
        activated_ms: f(3),
        valid_days: u32::try_from(f(4)).unwrap_or(0),
        free_only: f(5) == 1,
        configured: f(6) == 1,
    })
}

/// The commit block of a settle, as the script reads it.
fn commit_block(args: &mut Vec<String>, c: &super::Commit, r: &TakeRequest) -> Result<()> {
    let rec = &c.record;
    args.push(serde_json::to_string(rec).map_err(|e| QuotaError::Invalid(e.to_string()))?);
    args.push(hour_start(rec.time_ms).to_string());
    args.push(r.model.clone());
    args.push(r.kind.as_str().to_string());
    for n in [
        rec.input_tokens,
        rec.output_tokens,
        rec.free_tokens,
        rec.billable_input_tokens,
        rec.billable_output_tokens,
    ] {
        args.push(n.to_string());
    }
    args.push(rec.cost.map_or(String::new(), |c| c.to_string()));
    args.push(rec.currency.code().to_string());
    args.push(c.marks.len().to_string());
    for m in &c.marks {
        args.push(m.key(&r.model));
        args.push(m.at_least.to_string());
        args.push(m.at_or_below.to_string());
    }
    Ok(())
}

/// The alerts of a commit whose reply named the keys that fired.
fn fired(c: &super::Commit, model: &str, reply: &[Value]) -> Vec<super::Alert> {
    let left = reply.get(1).map_or(0, count);
    let keys: Vec<String> = reply.iter().skip(2).map(text).collect();
    c.marks
        .iter()
        .filter(|m| keys.contains(&m.key(model)))
        .map(|m| m.alert(model, left, c.record.time_ms))
        .collect()
}

impl Redis {
    /// Connects and checks the server answers; unreachable: a `LedgerError` naming it.
    pub fn open(topology: RedisTopology, display: String, dir: Option<PathBuf>) -> Result<Self> {
        let tls = match &topology {
            RedisTopology::Standalone(u) => u.starts_with("rediss://"),
            RedisTopology::Cluster(us) => us.iter().any(|u| u.starts_with("rediss://")),
        };
        if tls {
            // rustls needs one process-wide crypto provider; another may be installed.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let me = Self {
            display,
            topology,
            conn: Mutex::new(None),
            script: redis::Script::new(SCRIPT),
            epochs: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            dir,
            spilled: AtomicBool::new(false),
            last_recovery_ms: AtomicI64::new(i64::MIN),
        };
        me.with_conn(|c| redis::cmd("PING").query::<String>(c))?;
        me.spilled
            .store(!me.spill_files().is_empty(), Ordering::Relaxed);
        Ok(me)
    }

    fn err(&self, message: impl Into<String>) -> QuotaError {
        QuotaError::Ledger {
            ledger: self.display.clone(),
            message: message.into(),
        }
    }

    /// A client error as a message: never with a password, whatever the client said.
    fn describe(&self, e: &RedisError) -> String {
        let mut msg = redacted(&e.to_string());
        let urls = match &self.topology {
            RedisTopology::Standalone(u) => vec![u.clone()],
            RedisTopology::Cluster(us) => us.clone(),
        };
        for u in urls {
            if let Some(pw) = redis::IntoConnectionInfo::into_connection_info(u.as_str())
                .ok()
                .and_then(|i| i.redis_settings().password().map(str::to_string))
                .filter(|p| !p.is_empty())
            {
                msg = msg.replace(&pw, "***");
            }
        }
        msg
    }

    fn connect(&self) -> RedisResult<Conn> {
        match &self.topology {
            RedisTopology::Standalone(url) => {
                let client = redis::Client::open(url.as_str())?;
                let con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
                con.set_read_timeout(Some(IO_TIMEOUT))?;
                con.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(Conn::Single(con))
            }
            RedisTopology::Cluster(urls) => {
                let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(IO_TIMEOUT)
                    .build()?;
                Ok(Conn::Cluster(Box::new(client.get_connection()?)))
            }
        }
    }

    /// Runs `f` on this process's connection, opening it (again) when needed: after a
    /// `fork()`, and once more when the connection broke (a restarted server).
    fn with_conn<T>(
        &self,
        mut f: impl FnMut(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> Step<T> {
        let pid = crate::process::pid();
        let mut slot = self.conn.lock();
        let (mut attempt, mut unloaded) = (0, 0);
        loop {
            if slot.as_ref().is_some_and(|(p, _)| *p != pid) {
                // The parent's socket: never read or closed from the child.
                if let Some(inherited) = slot.take() {
                    std::mem::forget(inherited);
                }
            }
            if slot.is_none() {
                let c = self.connect().map_err(|e| {
                    StepError::Down(
                        self.err(format!("cannot reach the server: {}", self.describe(&e))),
                    )
                })?;
                *slot = Some((pid, c));
            }
            let (_, c) = slot.as_mut().expect("connected above");
            match f(c.as_dyn()) {
                Ok(v) => return Ok(v),
                Err(e) if is_down(&e) => {
                    *slot = None;
                    attempt += 1;
                    if attempt == 2 {
                        return Err(StepError::Down(self.err(format!(
                            "lost the connection to the server: {}",
                            self.describe(&e)
                        ))));
                    }
                }
                // The script was flushed between its reload and its run (`Script::invoke`
                // reloads once): it did not run, so running it again is safe.
                Err(e)
                    if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && unloaded < NOSCRIPT_RETRIES =>
                {
                    unloaded += 1;
                }
                Err(e) => return Err(StepError::Other(self.err(self.describe(&e)))),
            }
        }
    }

    fn epoch_file(&self, account: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| {
            d.join(format!(
                "redis-epoch-{}",
                fnv(&format!("{}\n{account}", self.display))
            ))
        })
    }

    /// The epoch of `account` this process knows, asking the server the first time.
    fn epoch(&self, account: &str) -> Step<String> {
        if let Some(e) = self.epochs.lock().get(account) {
            return Ok(e.clone());
        }
        let remembered = self
            .epoch_file(account)
            .and_then(|f| fs::read_to_string(f).ok())
            .unwrap_or_default();
        let fresh = format!("{}-{:x}", system_now_ms(), super::fresh_id());
        let key = format!("{}epoch", prefix(account));
        let reply: Vec<Value> = self.with_conn(|c| {
            self.script
                .key(&key)
                .arg("hello")
                .arg("")
                .arg("")
                .arg(&fresh)
                .arg(remembered.trim())
                .invoke(c)
        })?;
        let epoch = reply.get(1).map(text).unwrap_or_default();
        self.adopt(account, &epoch);
        if reply.first().map(text).as_deref() == Some("LOST") {
            return Err(StepError::Other(self.lost()));
        }
        Ok(epoch)
    }

    fn adopt(&self, account: &str, epoch: &str) {
        self.epochs
            .lock()
            .insert(account.to_string(), epoch.to_string());
        if let Some(f) = self.epoch_file(account) {
            let _ = write_private(&f, epoch.as_bytes(), false);
        }
    }

    fn lost(&self) -> QuotaError {
        self.err(
            "the server lost its data (restarted without persistence, or flushed): every \
             quota, reservation and record it held is gone. Models are refused under Free \
             Quota Only until they are granted or synced again; turn on persistence (AOF)",
        )
    }

    /// One atomic step: the script with `op` and its arguments.
    fn step(&self, account: &str, op: &str, now: Now, args: &[String]) -> Step<Vec<Value>> {
        let epoch = self.epoch(account)?;
        let key = format!("{}epoch", prefix(account));
        let now = now_arg(now);
        let reply: Vec<Value> = self.with_conn(|c| {
            let mut inv = self.script.prepare_invoke();
            inv.key(&key).arg(op).arg(&epoch).arg(&now);
            for a in args {
                inv.arg(a);
            }
            inv.invoke(c)
        })?;
        if reply.first().map(text).as_deref() == Some("LOST") {
            self.adopt(account, &reply.get(1).map(text).unwrap_or_default());
            return Err(StepError::Other(self.lost()));
        }
        Ok(reply)
    }

    fn see(&self, account: &str, model: &str, q: Option<QuotaRow>) {
        self.seen
            .lock()
            .insert((account.to_string(), model.to_string()), q);
    }

    // ---- settles ----

    /// One try at a settle: the token step (committing at once when it goes as
    /// predicted), else the commit of what it took.
    fn settle_once(&self, r: &TakeRequest, finish: &Finish<'_>) -> Step<Settled> {
        let acct = r.account.as_str();
        let seen = self
            .seen
            .lock()
            .get(&(r.account.clone(), r.model.clone()))
            .copied();
        let usage = r.input_tokens + r.output_tokens;
        // The prediction: within its worst case, a call draws on its own free hold.
        let prediction = match (seen, r.reservation) {
            (Some(q), Some(_)) if usage <= r.held_worst => {
                let free = if r.covered { usage.min(r.held_free) } else { 0 };
                let t = Taken {
                    free,
                    quota: q,
                    lease_expired: false,
                    time_ms: r.now.ms(),
                };
                Some((t, finish(r, &t)?))
            }
            _ => None,
        };
        let payload = serde_json::to_string(r).map_err(|e| QuotaError::Invalid(e.to_string()))?;
        let mut args = vec![
            r.model.clone(),
            r.reservation.map_or(String::new(), |id| id.to_string()),
            r.record_id.to_string(),
            r.input_tokens.to_string(),
            r.output_tokens.to_string(),
            b(r.free_region).into(),
            b(r.covered).into(),
        ];
        match &prediction {
            Some((t, c)) => {
                args.push(t.free.to_string());
                match t.quota {
                    Some(q) => {
                        args.push(q.total.to_string());
                        args.push(q.activated_ms.to_string());
                    }
                    None => args.extend(["-1".to_string(), "0".to_string()]),
                }
                args.push(payload);
                commit_block(&mut args, c, r)?;
            }
            None => args.extend([String::new(), "-1".into(), "0".into(), payload]),
        }
        let reply = self.step(acct, "take", r.now, &args)?;
        match reply.first().map(text).as_deref() {
            Some("COMMITTED") => {
                let (t, c) = prediction.expect("the script commits only a prediction");
                if let Some(q) = t.quota {
                    let mut q = q;
                    q.used = q.total.saturating_sub(reply.get(1).map_or(0, count));
                    self.see(acct, &r.model, Some(q));
                }
                let alerts = fired(&c, &r.model, &reply);
                Ok(Settled {
                    record: c.record,
                    lease_expired: false,
                    alerts,
                })
            }
            Some("TAKEN") => {
                let quota = quota_at(&reply, 4);
                self.see(acct, &r.model, quota);
                let t = Taken {
                    free: reply.get(1).map_or(0, count),
                    quota,
                    lease_expired: reply.get(2).map_or(0, int) == 1,
                    time_ms: r.now.ms(),
                };
                self.commit(r, &t, finish)
            }
            Some("PENDING") => {
                // An earlier try got as far as the token step.
                let (req, t) = self.parse_pending(&text(&reply[1]))?;
                self.commit(&req, &t, finish)
            }
            Some("DONE") => self.find_record(r),
            other => Err(StepError::Other(
                self.err(format!("unexpected answer to a settle: {other:?}")),
            )),
        }
    }

    fn commit(&self, r: &TakeRequest, t: &Taken, finish: &Finish<'_>) -> Step<Settled> {
        let c = finish(r, t)?;
        let mut args = vec![r.record_id.to_string()];
        commit_block(&mut args, &c, r)?;
        let reply = self.step(&r.account, "commit", r.now, &args)?;
        if reply.first().map(text).as_deref() == Some("DONE") {
            // Committed by a recovery meanwhile: the record stands as it wrote it.
            return self.find_record(r);
        }
        let alerts = fired(&c, &r.model, &reply);
        Ok(Settled {
            record: c.record,
            lease_expired: t.lease_expired,
            alerts,
        })
    }

    /// A settle an earlier try (or a recovery) already committed: its record.
    fn find_record(&self, r: &TakeRequest) -> Step<Settled> {
        let key = format!("{}rec", prefix(&r.account));
        let rows: Value = self.with_conn(|c| {
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(10_000)
                .query(c)
        })?;
        parse_stream(&rows)
            .into_iter()
            .find(|rec| rec.id == r.record_id)
            .map(|record| Settled {
                record,
                lease_expired: false,
                alerts: Vec::new(),
            })
            .ok_or_else(|| {
                StepError::Other(self.err(format!(
                    "settle {} was recorded, but its record is no longer in the stream",
                    r.record_id
                )))
            })
    }

    fn parse_pending(&self, v: &str) -> Step<(TakeRequest, Taken)> {
        let mut parts = v.rsplitn(3, SEP);
        let expired = parts.next().unwrap_or("0") == "1";
        let free = parts.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let json = parts.next().unwrap_or("");
        let req: TakeRequest = serde_json::from_str(json)
            .map_err(|e| self.err(format!("a pending settle cannot be read: {e}")))?;
        let quota = self
            .quota_step(&req.account, &req.model, req.now)?
            .map(|(q, _)| q);
        let t = Taken {
            free,
            quota,
            lease_expired: expired,
            time_ms: req.now.ms(),
        };
        Ok((req, t))
    }

    fn quota_step(&self, account: &str, model: &str, now: Now) -> Step<Option<(QuotaRow, u64)>> {
        let reply = self.step(account, "quota", now, &[model.to_string()])?;
        Ok(quota_rows(&reply)
            .into_iter()
            .next()
            .map(|(_, q, h)| (q, h)))
    }

    // ---- spills ----

    fn spill_path(&self) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("redis-spill-{}.jsonl", fnv(&self.display))))
    }

    fn spill_files(&self) -> Vec<PathBuf> {
        let (Some(dir), Some(main)) = (&self.dir, self.spill_path()) else {
            return Vec::new();
        };
        // The spill itself (`….jsonl`) and the files replays claimed (`….replaying-PID`),
        // also those of a replay that died half-way: a settle replayed twice counts once.
        let stem = main
            .file_stem()
            .map(|n| format!("{}.", n.to_string_lossy()))
            .unwrap_or_default();
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().starts_with(&stem))
                    .unwrap_or(false)
            })
            .collect();
        out.sort();
        out
    }

    fn spill(&self, r: &TakeRequest) -> Result<PathBuf> {
        let path = self.spill_path().ok_or_else(|| {
            self.err("no directory to spill to: set $HOME or $QUOTAGUARD_SPILL_DIR")
        })?;
        if let Some(d) = path.parent() {
            super::files::create_private_dir(d).map_err(|e| {
                self.err(format!("cannot create {:?}: {e}", d.display().to_string()))
            })?;
        }
        let mut line = serde_json::to_string(r).map_err(|e| QuotaError::Invalid(e.to_string()))?;
        line.push('\n');
        write_private(&path, line.as_bytes(), true).map_err(|e| {
            self.err(format!(
                "cannot spill to {:?}: {e}",
                path.display().to_string()
            ))
        })?;
        self.spilled.store(true, Ordering::Relaxed);
        Ok(path)
    }

    /// Replays every spilled settle. A file is claimed by renaming it, so that two
    /// processes do not both read it; a settle replayed twice is recognised by the
    /// server all the same.
    fn replay_spills(&self, finish: &Finish<'_>) -> Step<Vec<Settled>> {
        let mut out = Vec::new();
        for file in self.spill_files() {
            let claimed = if file.extension().is_some_and(|e| e == "jsonl") {
                let c = file.with_extension(format!("replaying-{}", std::process::id()));
                if fs::rename(&file, &c).is_err() {
                    continue;
                }
                c
            } else {
                file
            };
            let Ok(body) = fs::read_to_string(&claimed) else {
                continue;
            };
            let mut left = String::new();
            for line in body.lines().filter(|l| !l.trim().is_empty()) {
                let Ok(req) = serde_json::from_str::<TakeRequest>(line) else {
                    // A line this version cannot read is kept aside, never dropped.
                    if let Some(p) = self.spill_path() {
                        let aside = p.with_file_name(format!(
                            "redis-unreadable-{}.jsonl",
                            fnv(&self.display)
                        ));
                        let _ = write_private(&aside, format!("{line}\n").as_bytes(), true);
                    }
                    continue;
                };
                match self.settle_once(&req, finish) {
                    Ok(s) => out.push(s),
                    Err(StepError::Down(e)) => {
                        // Still down: keep this and the rest for the next time.
                        left.push_str(line);
                        left.push('\n');
                        let rest = body.lines().skip_while(|l| *l != line).skip(1);
                        for l in rest {
                            left.push_str(l);
                            left.push('\n');
                        }
                        let _ = fs::remove_file(&claimed);
                        if let Some(p) = self.spill_path() {
                            let _ = write_private(&p, left.as_bytes(), true);
                        }
                        return Err(StepError::Down(e));
                    }
                    Err(StepError::Other(_)) => {
                        left.push_str(line);
                        left.push('\n');
                    }
                }
            }
            let _ = fs::remove_file(&claimed);
            if !left.is_empty() {
                if let Some(p) = self.spill_path() {
                    let _ = write_private(&p, left.as_bytes(), true);
                }
            }
        }
        self.spilled
            .store(!self.spill_files().is_empty(), Ordering::Relaxed);
        Ok(out)
    }
}

/// Writes (or appends to) a file readable by its owner only.
fn write_private(path: &Path, data: &[u8], append: bool) -> std::io::Result<()> {
    let mut oo = fs::OpenOptions::new();
    oo.create(true);
    if append {
        oo.append(true);
    } else {
        oo.write(true).truncate(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut oo, 0o600);
    let mut f = oo.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// The quota rows of a `quota` reply: model, held, then the row.
fn quota_rows(reply: &[Value]) -> Vec<(String, QuotaRow, u64)> {
    let mut out = Vec::new();
    let mut i = 2;
    while i + 9 <= reply.len() {
        let model = text(&reply[i]);
        let held = count(&reply[i + 1]);
        if let Some(q) = quota_at(reply, i + 2) {
            out.push((model, q, held));
        }
        i += 9;
    }
    out
}

/// The records of an `XRANGE` / `XREVRANGE` answer.
fn parse_stream(v: &Value) -> Vec<UsageRecord> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries {
        let Value::Array(pair) = e else { continue };
        let Some(Value::Array(fields)) = pair.get(1) else {
            continue;
        };
        for kv in fields.chunks(2) {
            if kv.len() == 2 && text(&kv[0]) == "r" {
                if let Ok(r) = serde_json::from_str::<UsageRecord>(&text(&kv[1])) {
                    out.push(r);
                }
            }
        }
    }
    out
}

fn stream_ids(v: &Value) -> Vec<(String, UsageRecord)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let Value::Array(pair) = e else { return None };
            let id = text(pair.first()?);
            let rec = parse_stream(&Value::Array(vec![e.clone()])).pop()?;
            Some((id, rec))
        })
        .collect()
}

/// One hour's totals: (model, kind) -> field -> value.
type HourTotals = BTreeMap<(String, String), HashMap<String, String>>;

impl Redis {
    fn hours(&self, account: &str, from_ms: i64, to_ms: i64) -> Step<Vec<(i64, HourTotals)>> {
        let p = prefix(account);
        let hours: Vec<i64> = self.with_conn(|c| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(format!("{p}hours"))
                .arg(from_ms)
                .arg(format!("({to_ms}"))
                .query(c)
        })?;
        let mut out = Vec::new();
        for h in hours {
            let all: Vec<(String, String)> =
                self.with_conn(|c| redis::cmd("HGETALL").arg(format!("{p}tot:{h}")).query(c))?;
            out.push((h, hour_totals(all)));
        }
        Ok(out)
    }
}

/// An hour's totals from its hash: (model, kind) -> field -> value.
fn hour_totals(all: Vec<(String, String)>) -> HourTotals {
    let mut t: HourTotals = BTreeMap::new();
    for (k, v) in all {
        let mut parts = k.split(SEP);
        let (Some(m), Some(kind), Some(field)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        t.entry((m.to_string(), kind.to_string()))
            .or_default()
            .insert(field.to_string(), v);
    }
    t
}

/// A flat `[k1, v1, k2, v2, …]` reply as pairs.
fn pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (text(&c[0]), text(&c[1])))
            .collect(),
        Value::Map(m) => m.iter().map(|(k, v)| (text(k), text(v))).collect(),
        _ => Vec::new(),
    }
}

/// Hours of totals added up to CST days.
fn days_of(hours: Vec<(i64, HourTotals)>) -> Vec<DailyRow> {
    let mut days: BTreeMap<(chrono::NaiveDate, String, Kind), DailyRow> = BTreeMap::new();
    for (hour, totals) in hours {
        for ((model, kind), f) in totals {
            if field_u64(&f, "records") == 0 {
                continue;
            }
            let kind = Kind::parse(&kind).unwrap_or(Kind::Realtime);
            let day = cst_day(hour);
            let currency = f
                .get("currency")
                .and_then(|c| Currency::parse(c).ok())
                .unwrap_or(Currency::Cny);
            let hour_row = DailyRow {
                calls: field_u64(&f, "records"),
                input_tokens: field_u64(&f, "input_tokens"),
                output_tokens: field_u64(&f, "output_tokens"),
                free_tokens: field_u64(&f, "free_tokens"),
                billable_input_tokens: field_u64(&f, "billable_input"),
                billable_output_tokens: field_u64(&f, "billable_output"),
                cost: f
                    .get("cost")
                    .and_then(|c| c.parse::<i128>().ok())
                    .unwrap_or(0),
                unpriced_calls: field_u64(&f, "unpriced_calls"),
                ..DailyRow::new(day, model.clone(), kind, currency)
            };
            days.entry((day, model, kind))
                .or_insert_with(|| DailyRow::new(day, hour_row.model.clone(), kind, currency))
                .absorb(&hour_row);
        }
    }
    days.into_values().collect()
}

fn field_u64(f: &HashMap<String, String>, k: &str) -> u64 {
    f.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl Ledger for Redis {
    fn name(&self) -> &str {
        &self.display
    }

    fn grant(&self, a: &GrantArgs<'_>) -> Result<QuotaRow> {
        let expires = a.activated_ms + i64::from(a.valid_days) * DAY_MS;
        let args = [
            a.model.to_string(),
            a.total.to_string(),
            a.activated_ms.to_string(),
            a.valid_days.to_string(),
            expires.to_string(),
        ];
        let reply = self.step(a.account, "grant", Now::System(system_now_ms()), &args)?;
        let q = quota_at(&reply, 1).ok_or_else(|| self.err("a grant was not stored"))?;
        self.see(a.account, a.model, Some(q));
        Ok(q)
    }

    fn quota(&self, account: &str, model: &str, now: Now) -> Result<Option<(QuotaRow, u64)>> {
        let q = self.quota_step(account, model, now)?;
        self.see(account, model, q.map(|(q, _)| q));
        Ok(q)
    }

    fn quotas(&self, account: &str, now: Now) -> Result<Vec<(String, QuotaRow, u64)>> {
        let reply = self.step(account, "quota", now, &["*".to_string()])?;
        Ok(quota_rows(&reply))
    }

    fn set_free_only(&self, account: &str, models: &[String], enable: bool) -> Result<Vec<String>> {
        let mut args = vec![b(enable).to_string()];
        args.extend(models.iter().cloned());
        let reply = self.step(account, "free_only", Now::System(system_now_ms()), &args)?;
        Ok(reply.iter().skip(1).map(text).collect())
    }

    fn reconcile(&self, account: &str, model: &str, op: Reconcile, now: Now) -> Result<QuotaRow> {
        let mut args = vec![model.to_string()];
        match op {
            Reconcile::Console {
                remaining,
                total,
                force,
            } => args.extend([
                if force { "force" } else { "lower" }.into(),
                total.to_string(),
                (total - remaining).to_string(),
            ]),
            Reconcile::Depleted => args.extend(["deplete".into(), String::new(), String::new()]),
        }
        let at = now.ms();
        args.extend([
            at.to_string(),
            CUTOVER_DAYS.to_string(),
            (at + i64::from(CUTOVER_DAYS) * DAY_MS).to_string(),
        ]);
        let reply = self.step(account, "reconcile", now, &args)?;
        let q = quota_at(&reply, 1).ok_or_else(|| self.err("a reconciliation was not stored"))?;
        self.see(account, model, Some(q));
        Ok(q)
    }

    fn reserve(&self, r: &HoldRequest<'_>) -> Result<Hold> {
        let id = super::fresh_id();
        let args = [
            r.model.to_string(),
            id.to_string(),
            r.kind.as_str().to_string(),
            b(r.thinking).into(),
            r.input_tokens.to_string(),
            r.worst.to_string(),
            b(r.free_region).into(),
            b(r.covered).into(),
            b(r.may_pay).into(),
            r.lease_ms.to_string(),
            hour_start(r.now.ms()).to_string(),
        ];
        let reply = self.step(r.account, "reserve", r.now, &args)?;
        match reply.first().map(text).as_deref() {
            Some("HELD") => {
                self.see(r.account, r.model, quota_at(&reply, 4));
                Ok(Hold::Held(ReservationRow {
                    id,
                    account: r.account.to_string(),
                    model: r.model.to_string(),
                    kind: r.kind,
                    thinking: r.thinking,
                    input_tokens: r.input_tokens,
                    worst: r.worst,
                    free_part: reply.get(1).map_or(0, count),
                    created_ms: reply.get(2).map_or(0, int),
                    expires_ms: reply.get(3).map_or(0, int),
                }))
            }
            Some("REFUSED") => {
                let quota = quota_at(&reply, 4);
                self.see(r.account, r.model, quota);
                Ok(Hold::Refused(Snapshot {
                    quota,
                    held: reply.get(1).map_or(0, count),
                    overdue: reply.get(2).map_or(0, int) == 1,
                    blocked: reply.get(3).map_or(0, int) == 1,
                }))
            }
            other => Err(self.err(format!("unexpected answer to a reserve: {other:?}"))),
        }
    }

    fn settle(&self, r: &TakeRequest, finish: &Finish<'_>) -> Result<Settled> {
        let mut last = None;
        for wait in SETTLE_RETRIES {
            std::thread::sleep(Duration::from_millis(wait));
            match self.settle_once(r, finish) {
                Ok(s) => return Ok(s),
                Err(StepError::Other(e)) => return Err(e),
                Err(StepError::Down(e)) => last = Some(e),
            }
        }
        // The call happened: its record must not be lost. Keep it for a replay.
        let cause = last.map(|e| e.to_string()).unwrap_or_default();
        match self.spill(r) {
            Ok(path) => Err(self.err(format!(
                "the usage of this call could not be recorded ({cause}); it was kept in {:?} \
                 and is recorded, once, when the server is reachable again",
                path.display().to_string()
            ))),
            Err(e) => Err(self.err(format!(
                "the usage of this call could not be recorded ({cause}), nor kept: {e}"
            ))),
        }
    }

    fn release(
        &self,
        account: &str,
        model: &str,
        id: i64,
        failed: bool,
        now: Now,
    ) -> Result<Release> {
        let args = [
            model.to_string(),
            id.to_string(),
            b(failed).into(),
            hour_start(now.ms()).to_string(),
        ];
        let reply = self.step(account, "release", now, &args)?;
        Ok(match reply.first().map(text).as_deref() {
            Some("RELEASED") => Release::Released,
            _ => Release::Unknown,
        })
    }

    fn account(&self, account: &str) -> Result<AccountRow> {
        self.account_step(account, &["get".into()])
    }

    fn update_account(&self, account: &str, op: AccountOp) -> Result<AccountRow> {
        let args: Vec<String> = match op {
            AccountOp::SetBalance(b) => {
                let a = super::apply_account_op(AccountRow::default(), op)?;
                vec!["set".into(), b.to_string(), u8::from(a.overdue).to_string()]
            }
            AccountOp::TopUp(amount) => vec!["top_up".into(), amount.to_string()],
            AccountOp::MarkOverdue => vec!["overdue".into()],
        };
        self.account_step(account, &args)
    }

    fn set_blocked(&self, account: &str, reason: Option<&str>) -> Result<()> {
        let args = [reason.unwrap_or("").to_string()];
        self.step(account, "block", Now::System(system_now_ms()), &args)?;
        Ok(())
    }

    fn blocked(&self, account: &str) -> Result<Option<String>> {
        let reply = self.step(account, "blocked", Now::System(system_now_ms()), &[])?;
        Ok(reply.get(1).map(text))
    }

    fn fire_once(&self, account: &str, keys: &[String], _now_ms: i64) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self.step(account, "fire", Now::System(system_now_ms()), keys)?;
        Ok(reply.iter().skip(1).map(|v| int(v) == 1).collect())
    }

    fn day_cost(&self, account: &str, day: chrono::NaiveDate, model: Option<&str>) -> Result<i128> {
        let next = day.succ_opt().unwrap_or(day);
        Ok(self
            .daily(account, day, next)?
            .iter()
            .filter(|r| model.is_none_or(|m| m == r.model))
            .map(|r| r.cost)
            .sum())
    }

    fn records(&self, q: &RecordQuery) -> Result<Vec<UsageRecord>> {
        let key = format!("{}rec", prefix(&q.account));
        let rows: Value =
            self.with_conn(|c| redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query(c))?;
        let mut out: Vec<UsageRecord> = parse_stream(&rows)
            .into_iter()
            .filter(|r| q.matches(r))
            .collect();
        out.sort_by_key(|r| (r.time_ms, r.id));
        if let Some(n) = q.limit {
            out.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        }
        Ok(out)
    }

    fn daily(
        &self,
        account: &str,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<Vec<DailyRow>> {
        let (from_ms, to_ms) = super::day_bounds(from, to);
        Ok(days_of(self.hours(account, from_ms, to_ms)?))
    }

    fn hourly(
        &self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>> {
        let since = since_ms.map_or(i64::MIN, hour_start);
        let mut rows: BTreeMap<(i64, String), HourRow> = BTreeMap::new();
        for (hour, totals) in self.hours(account, since.max(-(1i64 << 52)), 1i64 << 52)? {
            for ((m, _kind), f) in totals {
                if model.is_some_and(|x| x != m) {
                    continue;
                }
                let h = rows.entry((hour, m.clone())).or_insert_with(|| HourRow {
                    hour_ms: hour,
                    model: m.clone(),
                    ..Default::default()
                });
                h.calls += field_u64(&f, "calls");
                h.refusals += field_u64(&f, "refusals");
                h.failures += field_u64(&f, "failures");
                h.input_tokens += field_u64(&f, "input_tokens");
                h.output_tokens += field_u64(&f, "output_tokens");
            }
        }
        Ok(rows.into_values().collect())
    }

    fn compact(&self, account: &str, before_ms: i64) -> Result<u64> {
        // Remembered first: a check then never takes a compacted record for a lost one.
        let mark = format!("{}compacted", prefix(account));
        let old: Option<i64> = self.with_conn(|c| redis::cmd("GET").arg(&mark).query(c))?;
        if old.is_none_or(|o| o < before_ms) {
            self.with_conn(|c| redis::cmd("SET").arg(&mark).arg(before_ms).query::<()>(c))?;
        }
        let key = format!("{}rec", prefix(account));
        let rows: Value =
            self.with_conn(|c| redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query(c))?;
        let entries = stream_ids(&rows);
        // The old records that lead the stream go with one XTRIM MINID; any older one
        // further on (written by a machine with a slower clock) with XDEL.
        let lead = entries
            .iter()
            .take_while(|(_, r)| r.time_ms < before_ms)
            .count();
        let mut dropped = 0u64;
        if lead > 0 {
            let min_id = entries.get(lead).map_or_else(
                || {
                    let last = &entries[lead - 1].0;
                    let (ms, seq) = last.split_once('-').unwrap_or((last, "0"));
                    format!("{ms}-{}", seq.parse::<u64>().unwrap_or(0) + 1)
                },
                |(id, _)| id.clone(),
            );
            let n: u64 = self.with_conn(|c| {
                redis::cmd("XTRIM")
                    .arg(&key)
                    .arg("MINID")
                    .arg(&min_id)
                    .query(c)
            })?;
            dropped += n;
        }
        let stragglers: Vec<&String> = entries
            .iter()
            .skip(lead)
            .filter(|(_, r)| r.time_ms < before_ms)
            .map(|(id, _)| id)
            .collect();
        for chunk in stragglers.chunks(500) {
            let n: u64 = self.with_conn(|c| redis::cmd("XDEL").arg(&key).arg(chunk).query(c))?;
            dropped += n;
        }
        Ok(dropped)
    }

    fn recover(&self, account: &str, finish: &Finish<'_>) -> Result<Vec<Settled>> {
        self.last_recovery_ms
            .store(system_now_ms(), Ordering::Relaxed);
        let mut out = self.replay_spills(finish)?;
        let reply = self.step(
            account,
            "pending",
            Now::System(system_now_ms()),
            &[PENDING_AGE_MS.to_string()],
        )?;
        for v in reply.iter().skip(1) {
            let (req, t) = self.parse_pending(&text(v))?;
            out.push(self.commit(&req, &t, finish)?);
        }
        Ok(out)
    }

    fn recovery_due(&self) -> bool {
        self.spilled.load(Ordering::Relaxed)
            || system_now_ms().saturating_sub(self.last_recovery_ms.load(Ordering::Relaxed))
                > RECOVERY_EVERY_MS
    }

    fn inspect(&self, account: &str, now: Now) -> Result<Inspection> {
        let reply = self.step(account, "inspect", now, &[])?;
        let arr = |i: usize| match reply.get(i) {
            Some(Value::Array(v)) => v.clone(),
            _ => Vec::new(),
        };
        let mut out = Inspection::default();
        let now_ms = match now {
            Now::Caller(ms) => ms,
            // The server's clock judges leases; its reading is close enough to ours here.
            Now::System(ms) => ms,
        };
        for entry in arr(1) {
            let Value::Array(parts) = entry else { continue };
            let model = parts.first().map(text).unwrap_or_default();
            let fields: HashMap<String, String> = parts
                .get(1)
                .map(pairs)
                .unwrap_or_default()
                .into_iter()
                .collect();
            let f = |k: &str| {
                fields
                    .get(k)
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
            };
            let q = QuotaRow {
                total: u64::try_from(f("total")).unwrap_or(0),
                used: u64::try_from(f("used")).unwrap_or(0),
                activated_ms: f("act"),
                valid_days: u32::try_from(f("days")).unwrap_or(0),
                free_only: f("fo") == 1,
                configured: f("cfg") == 1,
            };
            out.adjusted.insert(model.clone(), f("adj"));
            let mut held = 0u64;
            for (id, v) in parts.get(2).map(pairs).unwrap_or_default() {
                // exp,free,worst,created,input,kind,thinking
                let v_parts: Vec<&str> = v.split(',').collect();
                let n = |i: usize| v_parts.get(i).and_then(|x| x.parse::<i64>().ok());
                let (Some(exp), Some(free), Some(worst), Some(created), Some(input)) =
                    (n(0), n(1), n(2), n(3), n(4))
                else {
                    out.problems.push(format!(
                        "reservation {id} of {model:?} cannot be read ({v:?}); it holds nothing"
                    ));
                    continue;
                };
                let row = ReservationRow {
                    id: id.parse().unwrap_or(0),
                    account: account.to_string(),
                    model: model.clone(),
                    kind: v_parts
                        .get(5)
                        .and_then(|k| Kind::parse(k).ok())
                        .unwrap_or(Kind::Realtime),
                    thinking: v_parts.get(6) == Some(&"1"),
                    input_tokens: u64::try_from(input).unwrap_or(0),
                    worst: u64::try_from(worst).unwrap_or(0),
                    free_part: u64::try_from(free).unwrap_or(0),
                    created_ms: created,
                    expires_ms: exp,
                };
                if row.expires_ms > now_ms {
                    held += row.free_part;
                }
                out.reservations.push(row);
            }
            if fields.contains_key("total") {
                out.quotas.push((model, q, held));
            }
        }
        out.quotas.sort_by(|a, b| a.0.cmp(&b.0));
        let mut hours = Vec::new();
        for entry in arr(2) {
            let Value::Array(parts) = entry else { continue };
            let hour = parts.first().map_or(0, int);
            hours.push((
                hour,
                hour_totals(parts.get(1).map(pairs).unwrap_or_default()),
            ));
        }
        out.daily = days_of(hours);
        let mut records = parse_stream(&Value::Array(arr(3)));
        records.sort_by_key(|r| (r.time_ms, r.id));
        out.records = records;
        for (_, v) in pairs(&Value::Array(arr(4))) {
            if let Ok((req, t)) = self.parse_pending(&v) {
                *out.pending.entry(req.model).or_insert(0) += t.free;
            }
        }
        out.compacted_before = reply.get(5).map(text).and_then(|c| c.parse().ok());
        Ok(out)
    }
}

impl Redis {
    fn account_step(&self, account: &str, args: &[String]) -> Result<AccountRow> {
        let reply = self.step(account, "account", Now::System(system_now_ms()), args)?;
        let balance = reply.get(1).map(text).unwrap_or_default();
        Ok(AccountRow {
            overdue: reply.get(2).map_or(0, int) == 1,
            balance: if balance.is_empty() {
                None
            } else {
                Some(
                    balance
                        .parse()
                        .map_err(|_| self.err(format!("balance {balance:?} is not an integer")))?,
                )
            },
        })
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub fn prefix(account: &str) -> String {
        super::prefix(account)
    }
}
