//! The messages between the CNI plugin and the node agent.
//!
//! One connection carries one request and one response. The request is a
//! single JSON line sent with one `sendmsg`; on ADD the pod's netns fd rides
//! along as `SCM_RIGHTS`, so the agent needs no access to the runtime's netns
//! paths (they live in mount namespaces the agent may not see). Because data
//! and fd come in one message, the receiver reads both with one `recvmsg`,
//! which also works from a non-blocking socket (the agent's tokio side).
//! The response is one JSON line.

mod fds;
#[cfg(test)]
mod tests;

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/nodemesh/cni.sock";
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The most fds the kernel passes in one message (SCM_MAX_FD). Sizing the
/// control buffer for that many means a peer sending too many fds cannot
/// truncate the control data, so every fd it sent reaches us and is closed.
const SCM_MAX_FD: usize = 253;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub command: Command,
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The netns path as the runtime gave it (CNI_NETNS); may be empty on DEL.
    #[serde(default)]
    pub netns: String,
    /// The pod's addresses from the previous plugin's result (prefix lengths stripped).
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// How long the plugin waits for the answer; the agent answers before that.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Enrolled,
    NotMeshed,
    Removed,
    Ready,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub outcome: Outcome,
    #[serde(default)]
    pub message: String,
}

/// Sends one request as a single sendmsg (JSON + '\n'), with `netns` as SCM_RIGHTS when given.
pub fn send_request(
    socket: &UnixStream,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the request is {} bytes, over the protocol's limit of {MAX_MESSAGE_BYTES}",
                line.len()
            ),
        ));
    }
    let fds: Vec<RawFd> = netns.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    let iov = [IoSlice::new(&line)];
    let sent = loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    // The receiver reads the request with one recvmsg, so a partial send
    // (only possible on a signal or send timeout) cannot be completed later.
    if sent != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent only {sent} of the request's {} bytes", line.len()),
        ));
    }
    Ok(())
}

/// Receives one request from a connected stream socket fd with one recvmsg (MSG_CMSG_CLOEXEC):
/// returns the request and the fd it carried. Errors (io::ErrorKind::InvalidData with a clear message) on:
/// more than one fd, a fd on any command but Add, no fd on Add, truncated control data (MSG_CTRUNC), a message
/// over MAX_MESSAGE_BYTES or without the trailing newline in that one read, bad JSON, an unsupported version.
/// Any fds received are closed on error (they are OwnedFd). WouldBlock is passed through unchanged.
pub fn recv_request(socket: BorrowedFd<'_>) -> io::Result<(Request, Option<OwnedFd>)> {
    // One byte more than the limit tells "exactly the limit" from "over it".
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD], nix::sys::socket::UnixCredentials);
    let (len, truncated, raw_fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            // EAGAIN becomes io::ErrorKind::WouldBlock, which tokio's try_io needs.
            other => other?,
        };
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let mut raw_fds = Vec::new();
        // nix refuses to walk truncated control data; with the buffer sized
        // for SCM_MAX_FD that takes a peer sending other cmsgs we never asked for.
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    raw_fds.extend(fds);
                }
            }
        }
        break (msg.bytes, truncated, raw_fds);
    };
    // Take ownership first, so every early return below closes them.
    let fds: Vec<io::Result<OwnedFd>> = raw_fds.into_iter().map(fds::take).collect();

    if truncated {
        return Err(invalid(
            "the request's control data was truncated (MSG_CTRUNC)",
        ));
    }
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection without sending a request",
        ));
    }
    if len > MAX_MESSAGE_BYTES {
        return Err(invalid(format!(
            "the request is over the protocol's limit of {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    let Some(line) = buf[..len].strip_suffix(b"\n") else {
        return Err(invalid(
            "the request did not end with a newline in one message; send it with a single sendmsg",
        ));
    };
    if fds.len() > 1 {
        return Err(invalid(format!(
            "the request carried {} fds; at most one (the pod's netns) is allowed",
            fds.len()
        )));
    }
    let request: Request = serde_json::from_slice(line).map_err(|e| {
        invalid(format!(
            "the request is not valid JSON for this protocol: {e}"
        ))
    })?;
    if request.version != PROTOCOL_VERSION {
        return Err(invalid(format!(
            "the request uses protocol version {}, this side speaks {PROTOCOL_VERSION}; \
             update the CNI plugin and the agent together",
            request.version
        )));
    }
    match (request.command, fds.len()) {
        (Command::Add, 0) => {
            return Err(invalid(
                "an add request must carry the pod's netns fd (SCM_RIGHTS)",
            ));
        }
        (Command::Add, _) | (_, 0) => {}
        (command, _) => {
            return Err(invalid(format!(
                "a {command:?} request must not carry an fd; only add does"
            )));
        }
    }
    let fd = fds.into_iter().next().transpose()?;
    Ok((request, fd))
}

/// Response framing: one JSON line.
pub fn encode_response(r: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(r).expect("a Response always serialises");
    line.push(b'\n');
    line
}

/// Reads one response line (at most MAX_MESSAGE_BYTES) and parses it.
pub fn read_response(socket: &mut UnixStream) -> io::Result<Response> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match socket.read(&mut chunk) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without answering",
            ));
        }
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_MESSAGE_BYTES {
            return Err(invalid(format!(
                "the agent's answer is over {MAX_MESSAGE_BYTES} bytes without a newline"
            )));
        }
    }
    serde_json::from_slice(&line)
        .map_err(|e| invalid(format!("the agent's answer is not a valid response: {e}")))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}
