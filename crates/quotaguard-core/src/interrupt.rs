//! Waits a caller can cut short. A wait inside the core (a SQLite ledger locked by
//! another process) runs in short slices and, between them, asks the check the caller
//! installed for this thread whether to give up: the Python bindings install one that
//! runs the interpreter's signal handlers, so Ctrl-C ends the wait. The check is asked
//! with no lock of the core held.
use std::cell::RefCell;
use std::rc::Rc;

type Check = Rc<dyn Fn() -> bool>;

thread_local! {
    static CHECK: RefCell<Option<Check>> = const { RefCell::new(None) };
}

/// Runs `f` with `check` asked by every interruptible wait inside it, on this thread.
pub fn with_check<R>(check: impl Fn() -> bool + 'static, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Check>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let old = self.0.take();
            CHECK.with(|c| *c.borrow_mut() = old);
        }
    }
    let new: Check = Rc::new(check);
    let _restore = Restore(CHECK.with(|c| c.borrow_mut().replace(new)));
    f()
}

/// Whether the caller asked to stop waiting (false when no check is installed).
pub fn interrupted() -> bool {
    // Cloned out first: the check may run code that waits again on this thread.
    let check = CHECK.with(|c| c.borrow().clone());
    check.is_some_and(|c| c())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_check_holds_inside_its_scope_only() {
        assert!(!interrupted());
        let calls = Rc::new(Cell::new(0));
        let seen = calls.clone();
        let out = with_check(
            move || {
                seen.set(seen.get() + 1);
                true
            },
            || {
                let inner = with_check(|| false, interrupted);
                (interrupted(), inner)
            },
        );
        assert_eq!(out, (true, false));
        assert_eq!(calls.get(), 1);
        assert!(!interrupted());
    }
}
