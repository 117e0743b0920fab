//! A child process owned by the testbed: stopped by pid (SIGTERM, then SIGKILL) when dropped.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("waiting for {name} (pid {pid}): {source}")]
    Wait {
        name: String,
        pid: u32,
        source: std::io::Error,
    },
    #[error("{name} (pid {pid}) did not exit within {timeout:?} of SIGTERM")]
    NoExit {
        name: String,
        pid: u32,
        timeout: Duration,
    },
}

#[derive(Debug)]
pub struct Spawned {
    name: String,
    child: Option<Child>,
}

impl Spawned {
    pub fn new(name: impl Into<String>, child: Child) -> Self {
        Self {
            name: name.into(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Some(status)` once the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        self.signal_and_wait(libc::SIGTERM, timeout)
    }

    /// Sends SIGKILL and waits up to `timeout` for the exit status.
    pub fn kill(&mut self, timeout: Duration) -> Result<ExitStatus, ProcessError> {
        self.signal_and_wait(libc::SIGKILL, timeout)
    }

    fn signal_and_wait(
        &mut self,
        sig: libc::c_int,
        timeout: Duration,
    ) -> Result<ExitStatus, ProcessError> {
        let pid = self.pid();
        let Some(child) = self.child.as_mut() else {
            return Err(ProcessError::NoExit {
                name: self.name.clone(),
                pid,
                timeout,
            });
        };
        signal(pid, sig);
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(ProcessError::NoExit {
                        name: self.name.clone(),
                        pid,
                        timeout,
                    });
                }
                Err(source) => {
                    return Err(ProcessError::Wait {
                        name: self.name.clone(),
                        pid,
                        source,
                    });
                }
            }
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid > 0 {
        // SAFETY: kill(2) on the pid of a child this guard spawned and has not reaped.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let pid = self.pid();
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            signal(pid, libc::SIGKILL);
            let _ = child.wait();
        }
    }
}
