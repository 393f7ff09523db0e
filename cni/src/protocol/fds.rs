//! Taking ownership of fds received with SCM_RIGHTS without `unsafe`.
//!
//! nix hands received fds over as raw numbers, and turning a raw number into
//! an `OwnedFd` is `unsafe` (the crate forbids it). So each fd is reopened
//! through `/proc/self/fd/N`, which yields a new `OwnedFd` for the same file,
//! and the raw number is closed with nix's safe `close`. Only netns files are
//! accepted: the check runs on the link target before opening it, so a peer
//! cannot make us block opening a FIFO or a FUSE file.

use std::io;
use std::os::fd::{OwnedFd, RawFd};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use nix::sys::statfs::{NSFS_MAGIC, statfs};

/// Returns an owned fd for the same netns file as `raw`; `raw` is always closed.
pub(super) fn take(raw: RawFd) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{raw}");
    let reopened = reopen_nsfs(&path);
    // Errors from close are not actionable: the number is gone either way.
    let _ = nix::unistd::close(raw);
    reopened
}

fn reopen_nsfs(path: &str) -> io::Result<OwnedFd> {
    let fs = statfs(path).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot inspect the received fd ({path}): {e}; is /proc mounted?"),
        )
    })?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the received fd is not a namespace file; send an fd of the pod's netns (CNI_NETNS)",
        ));
    }
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot reopen the received netns fd ({path}): {e}"),
        )
    })
}
