//! Ctrl-C during the demo or bench: xtask itself survives it so its guards can stop the agents
//! and delete the namespaces; the children get the signal, fail, and the run unwinds.

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
