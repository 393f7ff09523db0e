//! Plain TCP forwarding with splice(2): bytes move socket -> pipe -> socket
//! inside the kernel and never enter the agent's memory.
//!
//! Half-close is carried through: EOF from one side becomes
//! `shutdown(SHUT_WR)` on the other, and each direction ends on its own.
//!
//! A direction holds a pipe only while bytes are in it: it takes one from a
//! shared pool when its source has data and gives it back once the bytes
//! are written on, so an idle connection costs its two sockets, not six
//! descriptors.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::{Mutex, PoisonError},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

use super::metrics::ByteCount;

/// Pipe capacity per direction; larger pipes mean fewer syscalls in bulk.
const PIPE_SIZE: usize = 256 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe not yet written out.
    queued: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Best effort: a smaller pipe still works, just with more syscalls.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Self {
            read,
            write,
            queued: 0,
        })
    }
}

/// Empty pipes kept for reuse (beyond this many, they are closed).
const POOLED_PIPES: usize = 256;
static PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

fn take_pipe() -> io::Result<Pipe> {
    let pooled = PIPES.lock().unwrap_or_else(PoisonError::into_inner).pop();
    match pooled {
        Some(p) => Ok(p),
        None => Pipe::new(),
    }
}

/// An empty pipe back to the pool.
fn give_back(pipe: Pipe) {
    debug_assert_eq!(pipe.queued, 0);
    let mut pool = PIPES.lock().unwrap_or_else(PoisonError::into_inner);
    if pool.len() < POOLED_PIPES {
        pool.push(pipe);
    }
}

/// Forwards both ways until both directions reached EOF, or one failed.
/// Returns the bytes sent a->b and b->a; each chunk is also added to
/// `count_ab` / `count_ba` as it is written, so metrics show progress.
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    count_ab: &ByteCount,
    count_ba: &ByteCount,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, count_ab), one_way(b, a, count_ba))
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

async fn one_way(src: &TcpStream, dst: &TcpStream, count: &ByteCount) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        // Held while bytes are in it; a pipe with bytes left in it after an
        // error is closed with the connection, never pooled.
        let mut pipe = take_pipe()?;
        // Fill the pipe from the source; not ready after all (readiness can
        // be stale): the pipe goes back while this direction waits.
        let n = match src.try_io(Interest::READABLE, || {
            splice(src.as_fd(), None, &pipe.write, None, PIPE_SIZE, FLAGS).map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back(pipe);
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            give_back(pipe);
            // EOF: pass the half-close on; the other direction goes on.
            match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(e),
            }
            return Ok(total);
        }
        pipe.queued += n;
        // Drain it into the destination.
        while pipe.queued > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst.as_fd(), None, pipe.queued, FLAGS)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    pipe.queued -= n;
                    total += n as u64;
                    count.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        give_back(pipe);
    }
}
