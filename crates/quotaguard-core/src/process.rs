//! This process's id, read without a system call on every step: a child after `fork()`
//! sees its own at once (an at-fork handler, registered on first use, updates it), so
//! that connections and id prefixes of the parent are never used in a child.
use std::sync::atomic::{AtomicU32, Ordering};

static PID: AtomicU32 = AtomicU32::new(0);

#[cfg(unix)]
extern "C" fn after_fork_in_child() {
    // getpid is async-signal-safe, as a handler run in a forked child must be.
    // SAFETY: no preconditions.
    PID.store(unsafe { libc::getpid() } as u32, Ordering::Release);
}

/// The id of this process (of the child, after a fork).
pub fn pid() -> u32 {
    let p = PID.load(Ordering::Acquire);
    if p != 0 {
        return p;
    }
    #[cfg(unix)]
    {
        use std::sync::atomic::AtomicBool;
        static HOOKED: AtomicBool = AtomicBool::new(false);
        if !HOOKED.swap(true, Ordering::AcqRel) {
            // SAFETY: registers a handler that only stores an atomic; no lock involved.
            unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        }
    }
    let p = std::process::id();
    PID.store(p, Ordering::Release);
    p
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pid_is_this_processs() {
        assert_eq!(super::pid(), std::process::id());
        assert_eq!(super::pid(), std::process::id());
    }
}
