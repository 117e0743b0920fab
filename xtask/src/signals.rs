//! Ctrl-C while the demo or bench runs: xtask survives it and waits, so the child (which handles
//! the interrupt by unwinding its guards) can stop agents and delete namespaces first.

extern "C" fn on_interrupt(_: libc::c_int) {}

pub fn survive_interrupt() {
    // SAFETY: installs an async-signal-safe handler that does nothing.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}
