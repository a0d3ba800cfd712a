//! The embedded default ledger: one SQLite file shared by every thread,
//! process and guard that opens it. WAL mode, `BEGIN IMMEDIATE` around each
//! read-decide-write step, a busy timeout, and a versioned schema.
use std::cell::Cell;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};

use super::{
    files, AccountRow, Backend, DailyRow, HourRow, Lease, RecordQuery, ReservationRow, Snapshot,
    StatsDelta, Tx, UsageRecord, STALE_RESERVATION_MS,
};
use crate::clock::{cst_day, hour_start, system_now_ms};
use crate::error::{QuotaError, Result};
use crate::money::Currency;
use crate::quota::QuotaRow;
use crate::rules::{CostType, Kind};

/// The schema this build writes. Each entry of `MIGRATIONS` moves one version up.
pub const SCHEMA_VERSION: i64 = 4;

/// `PRAGMA application_id` of a quotaguard ledger ("QGLD"): a database without it that
/// is not an older quotaguard ledger is another application's, and is never written.
pub const APPLICATION_ID: u32 = 0x5147_4c44;

/// How long a step waits for a ledger another process holds locked.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// A wait for the lock runs in slices this long; between them the caller may interrupt.
const BUSY_SLICE: Duration = Duration::from_millis(50);

pub(crate) const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE quotas (
        account TEXT NOT NULL, model TEXT NOT NULL,
        total INTEGER NOT NULL, used INTEGER NOT NULL,
        activated_ms INTEGER NOT NULL, valid_days INTEGER NOT NULL,
        free_only INTEGER NOT NULL, configured INTEGER NOT NULL,
        PRIMARY KEY (account, model)) WITHOUT ROWID;
    CREATE TABLE accounts (
        account TEXT PRIMARY KEY, overdue INTEGER NOT NULL, balance INTEGER) WITHOUT ROWID;
    CREATE TABLE reservations (
        account TEXT NOT NULL, model TEXT NOT NULL, id INTEGER NOT NULL,
        kind TEXT NOT NULL, input_tokens INTEGER NOT NULL, worst INTEGER NOT NULL,
        free_part INTEGER NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
        PRIMARY KEY (account, model, id)) WITHOUT ROWID;
    CREATE TABLE records (
        account TEXT NOT NULL, time_ms INTEGER NOT NULL, id INTEGER NOT NULL,
        user TEXT NOT NULL, workspace TEXT, model TEXT NOT NULL,
        kind TEXT NOT NULL, request_id TEXT,
        input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL, thinking INTEGER NOT NULL,
        free_tokens INTEGER NOT NULL, billable_input INTEGER NOT NULL,
        billable_output INTEGER NOT NULL, cost INTEGER, currency TEXT NOT NULL,
        cost_type TEXT NOT NULL,
        PRIMARY KEY (account, time_ms, id)) WITHOUT ROWID;
    -- Running totals per hour, model and kind: call statistics and (summed by CST
    -- day) bills, so neither ever scans the records.
    CREATE TABLE totals (
        account TEXT NOT NULL, hour_ms INTEGER NOT NULL, model TEXT NOT NULL, kind TEXT NOT NULL,
        calls INTEGER NOT NULL DEFAULT 0, refusals INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0, records INTEGER NOT NULL DEFAULT 0,
        free_tokens INTEGER NOT NULL DEFAULT 0, billable_input INTEGER NOT NULL DEFAULT 0,
        billable_output INTEGER NOT NULL DEFAULT 0,
        -- pico-units as decimal text: a sum may pass what a 64-bit integer holds
        cost TEXT NOT NULL DEFAULT '0',
        unpriced_calls INTEGER NOT NULL DEFAULT 0, currency TEXT,
        PRIMARY KEY (account, hour_ms, model, kind)) WITHOUT ROWID;
    CREATE TABLE alerts (
        account TEXT NOT NULL, key TEXT NOT NULL, fired_ms INTEGER NOT NULL,
        PRIMARY KEY (account, key)) WITHOUT ROWID;",
    // 1 -> 2: thinking-mode holds are settled as they were held; in-doubt calls (R9).
    "ALTER TABLE reservations ADD COLUMN thinking INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE records ADD COLUMN in_doubt INTEGER NOT NULL DEFAULT 0;",
    // 2 -> 3: the kill switch (R15), per account.
    "CREATE TABLE blocks (
        account TEXT PRIMARY KEY, reason TEXT NOT NULL, since_ms INTEGER NOT NULL) WITHOUT ROWID;",
    // 3 -> 4: what reconciliation put into each model's `used`, and when records were
    // compacted, so that a check can tell a lost record from a console sync. A ledger
    // upgraded here counts from now: what it held before is taken as reconciled.
    "ALTER TABLE quotas ADD COLUMN adjusted INTEGER NOT NULL DEFAULT 0;
    UPDATE quotas SET adjusted = used - coalesce((SELECT sum(t.free_tokens) FROM totals t
        WHERE t.account = quotas.account AND t.model = quotas.model), 0);
    CREATE TABLE meta (
        account TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
        PRIMARY KEY (account, key)) WITHOUT ROWID;",
];

/// How far a committed step survives: SQLite's `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Durable across a crash of the process (the default).
    Normal,
    /// Durable across a crash of the machine: one fsync per step.
    Full,
}

pub struct Sqlite {
    name: String,
    path: PathBuf,
    durability: Durability,
    /// This process's connection, with the id of the process that opened it: a child
    /// after `fork()` opens its own and never touches its parent's.
    conn: Mutex<Option<(u32, Connection)>>,
    warnings: Vec<String>,
}

fn ledger_err(name: &str, message: impl Into<String>) -> QuotaError {
    QuotaError::Ledger {
        ledger: name.to_string(),
        message: message.into(),
    }
}

fn db_err(name: &str, e: rusqlite::Error) -> QuotaError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        match f.code {
            ErrorCode::NotADatabase => return ledger_err(
                name,
                "is not a quotaguard ledger (not a SQLite database); the file was left untouched",
            ),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => {
                return ledger_err(
                    name,
                    format!(
                        "is locked by another process and stayed locked past the busy timeout \
                         ({} s)",
                        BUSY_TIMEOUT.as_secs()
                    ),
                )
            }
            ErrorCode::DatabaseCorrupt => {
                return ledger_err(name, format!("is corrupt ({e}); restore it from a copy"))
            }
            ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied => {
                return ledger_err(name, format!("cannot be written ({e})"))
            }
            _ => {}
        }
    }
    // Never the statement's text: one line, whatever SQLite said.
    let text = match &e {
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        other => other.to_string(),
    };
    ledger_err(name, text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// What a file about to be opened as a ledger turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// Nothing there yet, or an empty file or database: made into a ledger.
    Nothing,
    /// A quotaguard ledger (marked, or older and known by its tables).
    Ledger,
    /// Anything else: never written.
    Other(String),
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The tables of the database at `path`, read without writing a byte or creating a
/// file beside it (`immutable=1` reads the main file only); when that shows none and
/// a write-ahead log exists, the log may hold them: a plain read-only look then.
fn table_names(path: &Path) -> rusqlite::Result<Vec<String>> {
    let read = |uri: String| -> rusqlite::Result<Vec<String>> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let c = Connection::open_with_flags(uri, flags)?;
        let mut st =
            c.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
        let names = st.query_map([], |r| r.get::<_, String>(0))?;
        names.collect()
    };
    let uri = file_uri(path);
    let names = read(format!("{uri}?immutable=1"))?;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if names.is_empty() && fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return read(format!("{uri}?mode=ro"));
    }
    Ok(names)
}

/// `path` as a `file:` URI, every byte that is not plainly safe percent-encoded.
fn file_uri(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    #[cfg(unix)]
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(abs.as_os_str()).to_vec();
    #[cfg(not(unix))]
    let bytes = abs.to_string_lossy().replace('\\', "/").into_bytes();
    let mut out = String::from("file://");
    if bytes.first() != Some(&b'/') {
        out.push('/');
    }
    for b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Looks at `path` before anything is written: a quotaguard ledger, nothing yet, or
/// someone else's file.
fn identify(path: &Path, name: &str) -> Result<Found> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(ledger_err(name, format!("cannot be read: {e}"))),
    };
    if !meta.is_file() {
        return Ok(Found::Other("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Ok(Found::Nothing);
    }
    let mut head = [0u8; 100];
    let n = {
        use std::io::Read;
        let mut f =
            fs::File::open(path).map_err(|e| ledger_err(name, format!("cannot be read: {e}")))?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ledger_err(name, format!("cannot be read: {e}"))),
            }
        }
        n
    };
    if n < head.len() || &head[..16] != SQLITE_MAGIC {
        return Ok(Found::Other("not a SQLite database".into()));
    }
    let app = u32::from_be_bytes([head[68], head[69], head[70], head[71]]);
    if app == APPLICATION_ID {
        return Ok(Found::Ledger);
    }
    if app != 0 {
        return Ok(Found::Other(format!(
            "a SQLite database of another application (application_id {app:#010x})"
        )));
    }
    let tables = table_names(path).map_err(|e| {
        ledger_err(
            name,
            format!(
                "is a SQLite database that could not be read ({}); the file was left untouched",
                db_err(name, e)
                    .to_string()
                    .trim_start_matches(&format!("ledger {name}: "))
            ),
        )
    })?;
    if tables.is_empty() {
        return Ok(Found::Nothing);
    }
    let ours = ["quotas", "records", "reservations", "schema_version"];
    if ours.iter().all(|t| tables.iter().any(|n| n == t)) {
        return Ok(Found::Ledger);
    }
    let mut list: Vec<String> = tables.iter().take(5).map(|t| format!("{t:?}")).collect();
    if tables.len() > 5 {
        list.push(format!("and {} more", tables.len() - 5));
    }
    Ok(Found::Other(format!(
        "a SQLite database with other tables ({})",
        list.join(", ")
    )))
}

impl Sqlite {
    /// Opens (creating if needed, mode 0600) the ledger file at `path`. A file that is
    /// not a quotaguard ledger is refused before a byte of it is written; a directory
    /// another user controls is refused; what this process owns is tightened to 0600.
    pub fn open(path: &Path, durability: Durability) -> Result<Self> {
        let name = path.display().to_string();
        let mut warnings = Vec::new();
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from);
        if let Some(d) = &dir {
            if !d.is_dir() {
                return Err(ledger_err(
                    &name,
                    format!("directory {:?} does not exist", d.display().to_string()),
                ));
            }
        }
        let here = dir.clone().unwrap_or_else(|| PathBuf::from("."));
        match files::check_dir(&here) {
            Ok(files::DirVerdict::Refuse(why)) => return Err(ledger_err(&name, why)),
            Ok(files::DirVerdict::Warn(w)) => warnings.push(w),
            Ok(files::DirVerdict::Fine) | Err(_) => {}
        }
        match identify(path, &name)? {
            Found::Other(what) => {
                return Err(ledger_err(
                    &name,
                    format!("is not a quotaguard ledger ({what}); the file was left untouched"),
                ))
            }
            Found::Nothing => {
                // Create the file ourselves so it is born 0600.
                let mut oo = fs::OpenOptions::new();
                oo.read(true).append(true).create(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut oo, 0o600);
                oo.open(path)
                    .map_err(|e| ledger_err(&name, format!("cannot be opened or created: {e}")))?;
            }
            Found::Ledger => {}
        }
        // SQLite makes the -wal and -shm files with the database's mode: tightened first.
        for f in [
            path.to_path_buf(),
            side_file(path, "-wal"),
            side_file(path, "-shm"),
        ] {
            warnings.extend(files::tighten_file(&f));
        }
        let conn = connect(path, durability, &name)?;
        let me = Self {
            name,
            path: path.to_path_buf(),
            durability,
            conn: Mutex::new(Some((crate::process::pid(), conn))),
            warnings,
        };
        me.migrate()?;
        Ok(me)
    }

    /// This process's connection (opened again in a child after `fork()`), locked.
    fn connection(&self) -> Result<MappedMutexGuard<'_, Connection>> {
        let pid = crate::process::pid();
        let mut slot = self.conn.lock();
        if slot.as_ref().is_some_and(|(p, _)| *p != pid) {
            // The parent's connection: SQLite forbids using it in a child, and closing it
            // here could disturb the parent's locks. It is left alone, unreachable.
            if let Some(inherited) = slot.take() {
                std::mem::forget(inherited);
            }
        }
        if slot.is_none() {
            *slot = Some((pid, connect(&self.path, self.durability, &self.name)?));
        }
        Ok(MutexGuard::map(slot, |s| {
            &mut s.as_mut().expect("connected above").1
        }))
    }

    /// Runs `f` inside a transaction begun with `begin`. Waiting for a lock another
    /// process holds goes in short slices with no lock of ours held between them, so
    /// that the caller may interrupt it ([`crate::interrupt`]); an interrupted step began
    /// no transaction and recorded nothing.
    fn transaction<R>(&self, begin: &str, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let started = Instant::now();
        let conn = loop {
            let conn = self.connection()?;
            let begun = waiting_at_most(BUSY_SLICE, || exec_cached(&conn, begin));
            match begun {
                Ok(()) => break conn,
                Err(e) if is_busy(&e) && started.elapsed() < BUSY_TIMEOUT => {
                    drop(conn);
                    if crate::interrupt::interrupted() {
                        return Err(QuotaError::Interrupted(format!(
                            "interrupted while waiting for ledger {} (locked by another \
                             process); nothing was recorded",
                            self.name
                        )));
                    }
                }
                Err(e) => return Err(db_err(&self.name, e)),
            }
        };
        match f(&conn) {
            Ok(v) => match exec_cached(&conn, "COMMIT") {
                Ok(()) => Ok(v),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    Err(db_err(&self.name, e))
                }
            },
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn migrate(&self) -> Result<()> {
        let name = self.name.as_str();
        let e = |e| db_err(name, e);
        self.transaction("BEGIN IMMEDIATE", |c| {
            c.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                .map_err(e)?;
            let current: Option<i64> = c
                .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
                .map_err(e)?;
            let current = current.unwrap_or(0);
            if current > SCHEMA_VERSION {
                return Err(ledger_err(
                    name,
                    format!(
                        "was written by schema version {current}, newer than this quotaguard understands \
                         ({SCHEMA_VERSION}); upgrade quotaguard"
                    ),
                ));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
                c.execute_batch(sql).map_err(e)?;
                c.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [i as i64 + 1],
                )
                .map_err(e)?;
            }
            let app: u32 = c
                .query_row("PRAGMA application_id", [], |r| r.get::<_, i64>(0))
                .map_err(e)? as u32;
            if app != APPLICATION_ID {
                c.execute_batch(&format!("PRAGMA application_id = {}", APPLICATION_ID as i32))
                    .map_err(e)?;
            }
            // Reservations whose lease ended long ago only take space.
            c.execute(
                "DELETE FROM reservations WHERE expires_ms < ?1",
                [system_now_ms() - STALE_RESERVATION_MS],
            )
            .map_err(e)?;
            Ok(())
        })
    }

    fn step<R>(&self, begin: &str, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.transaction(begin, |conn| {
            let mut tx = SqliteTx {
                conn,
                name: &self.name,
            };
            f(&mut tx)
        })
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        // A parent's connection dropped in a forked child is forgotten, never closed:
        // closing it could checkpoint or unlock on the parent's behalf.
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

fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

thread_local! {
    /// How long a wait for a lock may last on this thread, and when the current one began.
    static WAIT: Cell<(Duration, Option<Instant>)> = const { Cell::new((BUSY_TIMEOUT, None)) };
}

/// Runs `f` with waits for a lock of at most `limit` each (else [`BUSY_TIMEOUT`]).
fn waiting_at_most<R>(limit: Duration, f: impl FnOnce() -> R) -> R {
    WAIT.with(|w| w.set((limit, None)));
    let out = f();
    WAIT.with(|w| w.set((BUSY_TIMEOUT, None)));
    out
}

/// SQLite's busy handler: called while another process holds the lock, with the number
/// of calls so far in this wait; true to try again. A step holds the lock for tens of
/// microseconds, so a waiter yields, then sleeps from 10 µs doubling up to 1 ms, where
/// SQLite's own timeout would sleep a millisecond at once and let the lock sit idle.
fn busy_wait(count: i32) -> bool {
    let now = Instant::now();
    let (limit, began) = WAIT.with(|w| w.get());
    let began = match began {
        Some(b) if count > 0 => b,
        _ => now,
    };
    WAIT.with(|w| w.set((limit, Some(began))));
    if now.duration_since(began) >= limit {
        return false;
    }
    match count {
        0..=2 => std::thread::yield_now(),
        n => std::thread::sleep(
            Duration::from_micros(10 << (n - 3).min(7)).min(Duration::from_millis(1)),
        ),
    }
    true
}

/// Runs one statement without rows, parsed once per connection (`BEGIN`, `COMMIT`).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// A connection to the ledger file at `path`, set up for quotaguard's steps.
fn connect(path: &Path, durability: Durability, name: &str) -> Result<Connection> {
    // No SQLITE_OPEN_URI: a path is a path, never read as a URI.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(|e| db_err(name, e))?;
    conn.busy_handler(Some(busy_wait))
        .map_err(|e| db_err(name, e))?;
    // Small pages for a new file: every step rewrites a handful of pages in the WAL,
    // so each page written costs a quarter of the default's bytes.
    conn.execute_batch("PRAGMA page_size=1024")
        .map_err(|e| db_err(name, e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| db_err(name, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ledger_err(
            name,
            format!("could not switch to WAL mode (got {mode:?})"),
        ));
    }
    let sync_sql = match durability {
        Durability::Normal => "PRAGMA synchronous=NORMAL",
        Durability::Full => "PRAGMA synchronous=FULL",
    };
    conn.execute_batch(sync_sql).map_err(|e| db_err(name, e))?;
    // Checkpoint (and fsync) every 8,192 pages of WAL rather than every 1,000, and
    // keep the WAL file from growing without bound.
    conn.execute_batch("PRAGMA wal_autocheckpoint=8192; PRAGMA journal_size_limit=67108864")
        .map_err(|e| db_err(name, e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl Backend for Sqlite {
    fn name(&self) -> &str {
        &self.name
    }

    fn write<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.step("BEGIN IMMEDIATE", f)
    }

    fn read<R>(&self, f: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        self.step("BEGIN", f)
    }

    fn integrity(&self) -> Result<Vec<String>> {
        let name = self.name.as_str();
        let mut out = Vec::new();
        let (report, app) = self.transaction("BEGIN", |c| {
            let mut st = c
                .prepare("PRAGMA integrity_check(20)")
                .map_err(|e| db_err(name, e))?;
            let lines = st
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| db_err(name, e))?
                .collect::<rusqlite::Result<Vec<String>>>()
                .map_err(|e| db_err(name, e))?;
            let app: i64 = c
                .query_row("PRAGMA application_id", [], |r| r.get(0))
                .map_err(|e| db_err(name, e))?;
            Ok((lines, app as u32))
        })?;
        if report != ["ok"] {
            out.push(format!(
                "SQLite's integrity check failed: {}; restore the ledger from a copy",
                report.join("; ")
            ));
        }
        if app != APPLICATION_ID {
            out.push(format!(
                "the ledger is not marked as quotaguard's (application_id {app:#010x})"
            ));
        }
        let here = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), PathBuf::from);
        match files::check_dir(&here) {
            Ok(files::DirVerdict::Refuse(w)) | Ok(files::DirVerdict::Warn(w)) => out.push(w),
            Ok(files::DirVerdict::Fine) => {}
            Err(e) => out.push(format!(
                "directory {:?} cannot be read: {e}",
                here.display().to_string()
            )),
        }
        for f in [
            self.path.clone(),
            side_file(&self.path, "-wal"),
            side_file(&self.path, "-shm"),
        ] {
            out.extend(files::loose_file(&f));
        }
        Ok(out)
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }
}

pub struct SqliteTx<'a> {
    conn: &'a Connection,
    name: &'a str,
}

fn kind_of(text: &str) -> Kind {
    Kind::parse(text).unwrap_or(Kind::Realtime)
}

fn currency_of(text: &str) -> Currency {
    Currency::parse(text).unwrap_or(Currency::Cny)
}

/// A running money total stored as decimal text.
fn pico_sum(text: Option<&str>) -> i128 {
    text.and_then(|t| t.parse().ok()).unwrap_or(0)
}

/// A count read back from a column: a negative value is a corrupt row, not a zero.
fn count_at(r: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = r.get(idx)?;
    u64::try_from(v).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Integer,
            format!("negative count {v}").into(),
        )
    })
}

/// A count as SQLite stores it (a signed 64-bit integer): larger values are refused,
/// never clamped.
fn sql_count(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| {
        QuotaError::Invalid(format!(
            "{what} {v} is more than the ledger stores ({})",
            i64::MAX
        ))
    })
}

/// A quota row from the first six columns.
fn quota_at(r: &Row<'_>) -> rusqlite::Result<Option<QuotaRow>> {
    Ok(Some(QuotaRow {
        total: count_at(r, 0)?,
        used: count_at(r, 1)?,
        activated_ms: r.get(2)?,
        valid_days: r.get::<_, u32>(3)?,
        free_only: r.get(4)?,
        configured: r.get(5)?,
    }))
}

fn reservation_from(r: &Row<'_>) -> rusqlite::Result<ReservationRow> {
    let kind: String = r.get(3)?;
    Ok(ReservationRow {
        id: r.get(0)?,
        account: r.get(1)?,
        model: r.get(2)?,
        kind: kind_of(&kind),
        input_tokens: count_at(r, 4)?,
        worst: count_at(r, 5)?,
        free_part: count_at(r, 6)?,
        created_ms: r.get(7)?,
        expires_ms: r.get(8)?,
        thinking: r.get(9)?,
    })
}

const RECORD_COLUMNS: &str = "id, time_ms, account, user, workspace, model, kind, request_id, \
     input_tokens, output_tokens, cached_tokens, thinking, free_tokens, billable_input, \
     billable_output, cost, currency, cost_type, in_doubt";

fn record_from(r: &Row<'_>) -> rusqlite::Result<UsageRecord> {
    let kind: String = r.get(6)?;
    let currency: String = r.get(16)?;
    let cost_type: String = r.get(17)?;
    Ok(UsageRecord {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        account: r.get(2)?,
        user: r.get(3)?,
        workspace: r.get(4)?,
        model: r.get(5)?,
        kind: kind_of(&kind),
        request_id: r.get(7)?,
        input_tokens: count_at(r, 8)?,
        output_tokens: count_at(r, 9)?,
        cached_tokens: count_at(r, 10)?,
        thinking: r.get(11)?,
        free_tokens: count_at(r, 12)?,
        billable_input_tokens: count_at(r, 13)?,
        billable_output_tokens: count_at(r, 14)?,
        cost: r.get(15)?,
        currency: currency_of(&currency),
        cost_type: CostType::parse(&cost_type).unwrap_or(CostType::Unpriced),
        in_doubt: r.get(18)?,
    })
}

impl SqliteTx<'_> {
    fn err(&self, e: rusqlite::Error) -> QuotaError {
        db_err(self.name, e)
    }
}

impl Tx for SqliteTx<'_> {
    fn quota(&mut self, account: &str, model: &str) -> Result<Option<QuotaRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT total, used, activated_ms, valid_days, free_only, configured \
                 FROM quotas WHERE account = ?1 AND model = ?2",
            )
            .map_err(|e| self.err(e))?;
        st.query_row(params![account, model], |r| {
            Ok(QuotaRow {
                total: count_at(r, 0)?,
                used: count_at(r, 1)?,
                activated_ms: r.get(2)?,
                valid_days: r.get::<_, u32>(3)?,
                free_only: r.get(4)?,
                configured: r.get(5)?,
            })
        })
        .optional()
        .map_err(|e| self.err(e))
    }

    fn put_quota(&mut self, account: &str, model: &str, q: &QuotaRow) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT INTO quotas \
                 (account, model, total, used, activated_ms, valid_days, free_only, configured) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (account, model) DO UPDATE SET \
                   total = excluded.total, used = excluded.used, \
                   activated_ms = excluded.activated_ms, valid_days = excluded.valid_days, \
                   free_only = excluded.free_only, configured = excluded.configured",
            )
            .map_err(|e| self.err(e))?;
        st.execute(params![
            account,
            model,
            sql_count("total", q.total)?,
            sql_count("used", q.used)?,
            q.activated_ms,
            q.valid_days,
            q.free_only,
            q.configured
        ])
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn snapshot(&mut self, account: &str, model: &str, now_ms: i64) -> Result<Snapshot> {
        // One statement for the four reads of a reserve, on a model with a quota row (a
        // plain lookup of it: a statement whose plan rests on a bound value, as a join on
        // a constant row's would, is prepared anew at every step).
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT total, used, activated_ms, valid_days, free_only, configured, \
                 (SELECT coalesce(sum(free_part), 0) FROM reservations \
                  WHERE account = ?1 AND model = ?2 AND expires_ms > ?3), \
                 (SELECT overdue FROM accounts WHERE account = ?1), \
                 (SELECT count(*) FROM blocks WHERE account = ?1) \
                 FROM quotas WHERE account = ?1 AND model = ?2",
            )
            .map_err(|e| self.err(e))?;
        let found = st
            .query_row(params![account, model, now_ms], |r| {
                let quota = quota_at(r)?;
                let held: i64 = r.get(6)?;
                let overdue: Option<bool> = r.get(7)?;
                let blocked: i64 = r.get(8)?;
                Ok((quota, held, overdue.unwrap_or(false), blocked > 0))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((quota, held, overdue, blocked)) = found else {
            return Ok(Snapshot {
                quota: None,
                held: self.reserved(account, model, now_ms, None)?,
                overdue: self.account(account)?.overdue,
                blocked: self.blocked(account)?.is_some(),
            });
        };
        let held = u64::try_from(held)
            .map_err(|_| ledger_err(self.name, format!("negative tokens held: {held}")))?;
        Ok(Snapshot {
            quota,
            held,
            overdue,
            blocked,
        })
    }

    fn quota_held(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<(Option<QuotaRow>, u64)> {
        // One statement for the two reads of a settle, on a model with a quota row.
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT total, used, activated_ms, valid_days, free_only, configured, \
                 (SELECT coalesce(sum(free_part), 0) FROM reservations \
                  WHERE account = ?1 AND model = ?2 AND id != ?4 AND expires_ms > ?3) \
                 FROM quotas WHERE account = ?1 AND model = ?2",
            )
            .map_err(|e| self.err(e))?;
        let found = st
            .query_row(params![account, model, now_ms, except.unwrap_or(-1)], |r| {
                Ok((quota_at(r)?, r.get::<_, i64>(6)?))
            })
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((quota, held)) = found else {
            return Ok((None, self.reserved(account, model, now_ms, except)?));
        };
        let held = u64::try_from(held)
            .map_err(|_| ledger_err(self.name, format!("negative tokens held: {held}")))?;
        Ok((quota, held))
    }

    fn set_used(&mut self, account: &str, model: &str, used: u64) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached("UPDATE quotas SET used = ?3 WHERE account = ?1 AND model = ?2")
            .map_err(|e| self.err(e))?;
        st.execute(params![account, model, sql_count("used", used)?])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn quota_models(&mut self, account: &str) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT model FROM quotas WHERE account = ?1 ORDER BY model")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([account], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
            .map_err(|e| self.err(e))
    }

    fn reserved(
        &mut self,
        account: &str,
        model: &str,
        now_ms: i64,
        except: Option<i64>,
    ) -> Result<u64> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT coalesce(sum(free_part), 0) FROM reservations \
                 WHERE account = ?1 AND model = ?2 AND id != ?4 AND expires_ms > ?3",
            )
            .map_err(|e| self.err(e))?;
        let v: i64 = st
            .query_row(params![account, model, now_ms, except.unwrap_or(-1)], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))?;
        u64::try_from(v).map_err(|_| ledger_err(self.name, format!("negative tokens held: {v}")))
    }

    fn insert_reservation(&mut self, r: &ReservationRow) -> Result<i64> {
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO reservations \
                 (account, model, id, kind, input_tokens, worst, free_part, created_ms, expires_ms, \
                  thinking) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(|e| self.err(e))?;
        // Random ids: never reused across processes, and no shared counter page to write.
        let mut id = r.id;
        loop {
            let n = st
                .execute(params![
                    r.account,
                    r.model,
                    id,
                    r.kind.as_str(),
                    sql_count("input_tokens", r.input_tokens)?,
                    sql_count("worst", r.worst)?,
                    sql_count("free_part", r.free_part)?,
                    r.created_ms,
                    r.expires_ms,
                    r.thinking
                ])
                .map_err(|e| self.err(e))?;
            if n == 1 {
                return Ok(id);
            }
            id = super::fresh_id();
        }
    }

    fn take_reservation(&mut self, account: &str, model: &str, id: i64) -> Result<Option<Lease>> {
        let mut st = self
            .conn
            .prepare_cached(
                "DELETE FROM reservations WHERE account = ?1 AND model = ?2 AND id = ?3 \
                 RETURNING kind, worst, expires_ms",
            )
            .map_err(|e| self.err(e))?;
        st.query_row(params![account, model, id], |r| {
            let kind: String = r.get(0)?;
            Ok(Lease {
                kind: kind_of(&kind),
                worst: count_at(r, 1)?,
                expires_ms: r.get(2)?,
            })
        })
        .optional()
        .map_err(|e| self.err(e))
    }

    fn account(&mut self, account: &str) -> Result<AccountRow> {
        let mut st = self
            .conn
            .prepare_cached("SELECT overdue, balance FROM accounts WHERE account = ?1")
            .map_err(|e| self.err(e))?;
        let row = st
            .query_row([account], |r| {
                Ok(AccountRow {
                    overdue: r.get(0)?,
                    balance: r.get(1)?,
                })
            })
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.unwrap_or_default())
    }

    fn blocked(&mut self, account: &str) -> Result<Option<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT reason FROM blocks WHERE account = ?1")
            .map_err(|e| self.err(e))?;
        st.query_row([account], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    fn set_blocked(&mut self, account: &str, reason: Option<&str>, now_ms: i64) -> Result<()> {
        let r = match reason {
            Some(reason) => self.conn.execute(
                "INSERT OR REPLACE INTO blocks (account, reason, since_ms) VALUES (?1, ?2, ?3)",
                params![account, reason, now_ms],
            ),
            None => self
                .conn
                .execute("DELETE FROM blocks WHERE account = ?1", [account]),
        };
        r.map(|_| ()).map_err(|e| self.err(e))
    }

    fn put_account(&mut self, account: &str, a: &AccountRow) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT OR REPLACE INTO accounts (account, overdue, balance) VALUES (?1, ?2, ?3)",
            )
            .map_err(|e| self.err(e))?;
        st.execute(params![account, a.overdue, a.balance])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn append_record(&mut self, r: &mut UsageRecord, d: &StatsDelta) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO records (account, time_ms, id, user, workspace, model, kind, \
                 request_id, input_tokens, output_tokens, cached_tokens, thinking, free_tokens, \
                 billable_input, billable_output, cost, currency, cost_type, in_doubt) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
                 ?19)",
            )
            .map_err(|e| self.err(e))?;
        loop {
            let n = st
                .execute(params![
                    r.account,
                    r.time_ms,
                    r.id,
                    r.user,
                    r.workspace,
                    r.model,
                    r.kind.as_str(),
                    r.request_id,
                    sql_count("input_tokens", r.input_tokens)?,
                    sql_count("output_tokens", r.output_tokens)?,
                    sql_count("cached_tokens", r.cached_tokens)?,
                    r.thinking,
                    sql_count("free_tokens", r.free_tokens)?,
                    sql_count("billable_input_tokens", r.billable_input_tokens)?,
                    sql_count("billable_output_tokens", r.billable_output_tokens)?,
                    r.cost,
                    r.currency.code(),
                    r.cost_type.as_str(),
                    r.in_doubt
                ])
                .map_err(|e| self.err(e))?;
            if n == 1 {
                break;
            }
            r.id = super::fresh_id();
        }
        let hour = hour_start(r.time_ms);
        // A call that cost nothing leaves the hour's money as it is: no need to read it.
        let add = i128::from(r.cost.unwrap_or(0));
        let cost = if add == 0 {
            0
        } else {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT cost FROM totals WHERE account = ?1 AND hour_ms = ?2 AND model = ?3 AND kind = ?4",
                )
                .map_err(|e| self.err(e))?;
            let old: Option<String> = st
                .query_row(params![r.account, hour, r.model, r.kind.as_str()], |row| {
                    row.get(0)
                })
                .optional()
                .map_err(|e| self.err(e))?;
            pico_sum(old.as_deref()) + add
        };
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT INTO totals (account, hour_ms, model, kind, records, free_tokens, \
                 billable_input, billable_output, cost, unpriced_calls, currency, \
                 calls, refusals, failures, input_tokens, output_tokens) \
                 VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
                 ON CONFLICT (account, hour_ms, model, kind) DO UPDATE SET \
                   calls = calls + excluded.calls, refusals = refusals + excluded.refusals, \
                   failures = failures + excluded.failures, \
                   input_tokens = input_tokens + excluded.input_tokens, \
                   output_tokens = output_tokens + excluded.output_tokens, \
                   records = records + 1, \
                   free_tokens = free_tokens + excluded.free_tokens, \
                   billable_input = billable_input + excluded.billable_input, \
                   billable_output = billable_output + excluded.billable_output, \
                   cost = CASE WHEN ?16 THEN excluded.cost ELSE cost END, \
                   unpriced_calls = unpriced_calls + excluded.unpriced_calls, \
                   currency = excluded.currency",
            )
            .map_err(|e| self.err(e))?;
        st.execute(params![
            r.account,
            hour,
            r.model,
            r.kind.as_str(),
            sql_count("free_tokens", r.free_tokens)?,
            sql_count("billable_input_tokens", r.billable_input_tokens)?,
            sql_count("billable_output_tokens", r.billable_output_tokens)?,
            cost.to_string(),
            i64::from(r.cost_type == CostType::Unpriced),
            r.currency.code(),
            sql_count("calls", d.calls)?,
            sql_count("refusals", d.refusals)?,
            sql_count("failures", d.failures)?,
            sql_count("input_tokens", d.input_tokens)?,
            sql_count("output_tokens", d.output_tokens)?,
            add != 0
        ])
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn bump_hour(
        &mut self,
        account: &str,
        model: &str,
        kind: Kind,
        hour_ms: i64,
        d: &StatsDelta,
    ) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT INTO totals (account, hour_ms, model, kind, calls, refusals, failures, \
                 input_tokens, output_tokens) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (account, hour_ms, model, kind) DO UPDATE SET \
                   calls = calls + excluded.calls, refusals = refusals + excluded.refusals, \
                   failures = failures + excluded.failures, \
                   input_tokens = input_tokens + excluded.input_tokens, \
                   output_tokens = output_tokens + excluded.output_tokens",
            )
            .map_err(|e| self.err(e))?;
        st.execute(params![
            account,
            hour_ms,
            model,
            kind.as_str(),
            sql_count("calls", d.calls)?,
            sql_count("refusals", d.refusals)?,
            sql_count("failures", d.failures)?,
            sql_count("input_tokens", d.input_tokens)?,
            sql_count("output_tokens", d.output_tokens)?
        ])
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn fire_once(&mut self, account: &str, key: &str, now_ms: i64) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO alerts (account, key, fired_ms) VALUES (?1, ?2, ?3)",
            )
            .map_err(|e| self.err(e))?;
        let n = st
            .execute(params![account, key, now_ms])
            .map_err(|e| self.err(e))?;
        Ok(n == 1)
    }

    fn day_cost(&mut self, account: &str, day: NaiveDate, model: Option<&str>) -> Result<i128> {
        let (from, to) = super::day_bounds(day, day.succ_opt().unwrap_or(day));
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT cost FROM totals \
                 WHERE account = ?1 AND hour_ms >= ?2 AND hour_ms < ?3 AND (?4 IS NULL OR model = ?4)",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![account, from, to, model], |r| r.get::<_, String>(0))
            .map_err(|e| self.err(e))?;
        let mut total = 0i128;
        for c in rows {
            total += pico_sum(Some(&c.map_err(|e| self.err(e))?));
        }
        Ok(total)
    }

    fn records(&mut self, q: &RecordQuery) -> Result<Vec<UsageRecord>> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM records
             WHERE account = ?1 AND time_ms >= ?2 AND time_ms < ?3
               AND (?4 IS NULL OR model = ?4) AND (?5 IS NULL OR user = ?5)
               AND (?6 IS NULL OR workspace = ?6) AND (?7 IS NULL OR kind = ?7)
             ORDER BY time_ms, id LIMIT ?8"
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(|e| self.err(e))?;
        let rows = st
            .query_map(
                params![
                    q.account,
                    q.since_ms.unwrap_or(i64::MIN),
                    q.until_ms.unwrap_or(i64::MAX),
                    q.model,
                    q.user,
                    q.workspace,
                    q.kind.map(|k| k.as_str()),
                    q.limit.map_or(Ok(-1), |n| sql_count("limit", n))?
                ],
                record_from,
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn daily(&mut self, account: &str, from: NaiveDate, to: NaiveDate) -> Result<Vec<DailyRow>> {
        let (from_ms, to_ms) = super::day_bounds(from, to);
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT hour_ms, model, kind, records, input_tokens, output_tokens, free_tokens, \
                 billable_input, billable_output, cost, unpriced_calls, currency \
                 FROM totals WHERE account = ?1 AND hour_ms >= ?2 AND hour_ms < ?3 AND records > 0",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![account, from_ms, to_ms], |r| {
                let hour: i64 = r.get(0)?;
                let kind: String = r.get(2)?;
                let cost: String = r.get(9)?;
                let currency: Option<String> = r.get(11)?;
                Ok(DailyRow {
                    day: cst_day(hour),
                    model: r.get(1)?,
                    kind: kind_of(&kind),
                    calls: count_at(r, 3)?,
                    input_tokens: count_at(r, 4)?,
                    output_tokens: count_at(r, 5)?,
                    free_tokens: count_at(r, 6)?,
                    billable_input_tokens: count_at(r, 7)?,
                    billable_output_tokens: count_at(r, 8)?,
                    cost: pico_sum(Some(&cost)),
                    unpriced_calls: count_at(r, 10)?,
                    currency: currency_of(currency.as_deref().unwrap_or("CNY")),
                })
            })
            .map_err(|e| self.err(e))?;
        // Hours add up to CST days here, in 128-bit money.
        let mut days: BTreeMap<(NaiveDate, String, &'static str), DailyRow> = BTreeMap::new();
        for row in rows {
            let row = row.map_err(|e| self.err(e))?;
            match days.entry((row.day, row.model.clone(), row.kind.as_str())) {
                Entry::Vacant(v) => {
                    v.insert(row);
                }
                Entry::Occupied(mut o) => o.get_mut().absorb(&row),
            }
        }
        Ok(days.into_values().collect())
    }

    fn hourly(
        &mut self,
        account: &str,
        model: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<HourRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT hour_ms, model, sum(calls), sum(refusals), sum(failures), sum(input_tokens), \
                 sum(output_tokens) \
                 FROM totals WHERE account = ?1 AND (?2 IS NULL OR model = ?2) AND hour_ms >= ?3 \
                 GROUP BY hour_ms, model ORDER BY hour_ms, model",
            )
            .map_err(|e| self.err(e))?;
        let since = since_ms.map_or(i64::MIN, hour_start);
        let rows = st
            .query_map(params![account, model, since], |r| {
                Ok(HourRow {
                    hour_ms: r.get(0)?,
                    model: r.get(1)?,
                    calls: count_at(r, 2)?,
                    refusals: count_at(r, 3)?,
                    failures: count_at(r, 4)?,
                    input_tokens: count_at(r, 5)?,
                    output_tokens: count_at(r, 6)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    fn compact(&mut self, account: &str, before_ms: i64) -> Result<u64> {
        let n = self
            .conn
            .execute(
                "DELETE FROM records WHERE account = ?1 AND time_ms < ?2",
                params![account, before_ms],
            )
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "INSERT INTO meta (account, key, value) VALUES (?1, 'compacted_before', ?2)
                 ON CONFLICT (account, key) DO UPDATE SET value = max(value, excluded.value)",
                params![account, before_ms],
            )
            .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    fn adjust(&mut self, account: &str, model: &str, delta: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE quotas SET adjusted = adjusted + ?3 WHERE account = ?1 AND model = ?2",
                params![account, model, delta],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn adjustments(&mut self, account: &str) -> Result<BTreeMap<String, i64>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT model, adjusted FROM quotas WHERE account = ?1")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([account], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<BTreeMap<String, i64>>>()
            .map_err(|e| self.err(e))
    }

    fn compacted_before(&mut self, account: &str) -> Result<Option<i64>> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE account = ?1 AND key = 'compacted_before'",
                [account],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn reservations(&mut self, account: &str) -> Result<Vec<ReservationRow>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT id, account, model, kind, input_tokens, worst, free_part, created_ms, \
                 expires_ms, thinking FROM reservations WHERE account = ?1 ORDER BY model, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([account], reservation_from)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }
}
