//! One question to the node agent over its unix socket.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::protocol::{Request, Response, read_response, send_request};

#[derive(Debug)]
pub enum AskError {
    /// Nothing listens on the socket: the agent is not running (yet).
    NotRunning(io::Error),
    /// The agent did not answer in time.
    TimedOut,
    /// Anything else (permissions, a garbled answer, a reset connection).
    Failed(io::Error),
}

/// Sends `request` (with `netns` as SCM_RIGHTS) and waits at most `timeout` overall.
pub fn ask(
    socket_path: &str,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Response, AskError> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_within(socket_path, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => AskError::NotRunning(e),
        _ => classify(e),
    })?;
    send_request(&stream, request, netns).map_err(classify)?;
    stream
        .set_read_timeout(Some(remaining(deadline)))
        .map_err(AskError::Failed)?;
    read_response(&mut stream).map_err(classify)
}

/// A unix connect blocks while the listener's backlog is full (a stuck
/// agent), for as long as SO_SNDTIMEO allows; std's connect sets no timeout.
/// The same timeout then bounds the send.
fn connect_within(path: &str, timeout: Duration) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let millis = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(millis))?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

fn classify(e: io::Error) -> AskError {
    match e.kind() {
        // SO_RCVTIMEO/SO_SNDTIMEO expiry is EAGAIN on Linux.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AskError::TimedOut,
        _ => AskError::Failed(e),
    }
}

fn remaining(deadline: Instant) -> Duration {
    // A zero read timeout is an error, not "expired": keep a minimum.
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}
