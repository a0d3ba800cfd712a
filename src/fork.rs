//! A gate between detached core work and `os.fork()`. Work with the interpreter
//! detached (ledger I/O, loading the vocabulary) passes through it; `os.fork()` closes
//! it first and waits until no thread is inside, so that no thread is in SQLite, in a
//! ledger's connection or in any lock of the core when the process forks, and the
//! child finds every lock free. The child then opens connections of its own (the
//! ledgers check their pid). Atomics only: no lock of the gate's own can be held
//! across a fork.
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLOSED: u64 = 1 << 63;
/// The high bit: closed; the rest: threads inside.
static STATE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// How deep this thread is inside the gate: a thread inside enters again freely
    /// (a signal handler run during a wait may call the guard).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Inside the gate while alive.
pub struct Pass(());

impl Drop for Pass {
    fn drop(&mut self) {
        STATE.fetch_sub(1, Ordering::AcqRel);
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Enters the gate, waiting while a fork is being prepared.
pub fn enter() -> Pass {
    let nested = DEPTH.with(|d| d.get() > 0);
    loop {
        let s = STATE.load(Ordering::Acquire);
        if s & CLOSED != 0 && !nested {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        if STATE
            .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            break;
        }
    }
    DEPTH.with(|d| d.set(d.get() + 1));
    Pass(())
}

/// Closes the gate and waits (at most `limit`) until no thread is inside; true when it
/// emptied. The gate stays closed either way, until [`open`].
pub fn close(limit: Duration) -> bool {
    STATE.fetch_or(CLOSED, Ordering::AcqRel);
    let start = Instant::now();
    while STATE.load(Ordering::Acquire) & !CLOSED != 0 {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// Opens the gate (in the parent, after a fork).
pub fn open() {
    STATE.fetch_and(!CLOSED, Ordering::AcqRel);
}

/// Opens the gate in a child after a fork: of the threads inside, only this one (if
/// it was) exists here.
pub fn reset_in_child() {
    let mine = DEPTH.with(|d| u64::from(d.get()));
    STATE.store(mine, Ordering::Release);
}
