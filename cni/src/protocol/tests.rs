use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::stat::fstat;

use super::*;

fn request(command: Command) -> Request {
    Request {
        version: PROTOCOL_VERSION,
        command,
        container_id: "c0ffee".into(),
        pod_namespace: "shop".into(),
        pod_name: "cart-7d9f".into(),
        pod_uid: Some("1b2c-uid".into()),
        netns: "/var/run/netns/cni-1234".into(),
        ips: vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        timeout_ms: 10_000,
    }
}

fn netns() -> File {
    File::open("/proc/self/ns/net").unwrap()
}

/// Sends raw bytes with any fds in one sendmsg, bypassing send_request's checks.
fn send_raw(socket: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(sent, bytes.len());
}

fn expect_invalid(result: io::Result<(Request, Option<OwnedFd>)>, needle: &str) {
    let err = result.expect_err("the request should be rejected");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains(needle), "{err:?} lacks {needle:?}");
}

#[test]
fn add_round_trips_with_the_same_netns() {
    let (a, b) = UnixStream::pair().unwrap();
    let ns = netns();
    let sent = request(Command::Add);
    send_request(&a, &sent, Some(ns.as_fd())).unwrap();
    let (got, fd) = recv_request(b.as_fd()).unwrap();
    assert_eq!(got, sent);
    let (want, have) = (fstat(&ns).unwrap(), fstat(fd.unwrap()).unwrap());
    assert_eq!((want.st_dev, want.st_ino), (have.st_dev, have.st_ino));
}

#[test]
fn del_round_trips_without_fd_and_with_defaults() {
    let (a, b) = UnixStream::pair().unwrap();
    send_raw(
        &a,
        b"{\"version\":1,\"command\":\"del\",\"timeoutMs\":5}\n",
        &[],
    );
    let (got, fd) = recv_request(b.as_fd()).unwrap();
    assert!(fd.is_none());
    assert_eq!(got.command, Command::Del);
    assert_eq!((got.netns.as_str(), got.pod_uid), ("", None));
}

#[test]
fn rejects_fd_on_del() {
    let (a, b) = UnixStream::pair().unwrap();
    let ns = netns();
    send_request(&a, &request(Command::Del), Some(ns.as_fd())).unwrap();
    expect_invalid(recv_request(b.as_fd()), "must not carry an fd");
}

#[test]
fn rejects_two_fds() {
    let (a, b) = UnixStream::pair().unwrap();
    let (ns1, ns2) = (netns(), netns());
    let mut line = serde_json::to_vec(&request(Command::Add)).unwrap();
    line.push(b'\n');
    send_raw(&a, &line, &[ns1.as_raw_fd(), ns2.as_raw_fd()]);
    expect_invalid(recv_request(b.as_fd()), "carried 2 fds");
}

#[test]
fn rejects_add_without_fd() {
    let (a, b) = UnixStream::pair().unwrap();
    send_request(&a, &request(Command::Add), None).unwrap();
    expect_invalid(recv_request(b.as_fd()), "must carry the pod's netns fd");
}

#[test]
fn rejects_fd_that_is_not_a_netns() {
    let (a, b) = UnixStream::pair().unwrap();
    let file = File::open("/proc/self/status").unwrap();
    send_request(&a, &request(Command::Add), Some(file.as_fd())).unwrap();
    expect_invalid(recv_request(b.as_fd()), "not a namespace file");
}

#[test]
fn rejects_oversized_message() {
    let (a, b) = UnixStream::pair().unwrap();
    // A writer thread: the kernel may need the reader to drain before it takes it all.
    let writer = std::thread::spawn(move || {
        let mut a = a;
        let _ = a.write_all(&vec![b' '; MAX_MESSAGE_BYTES + 100]);
    });
    let err = recv_request(b.as_fd()).expect_err("oversized");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    drop(b);
    writer.join().unwrap();
}

#[test]
fn send_refuses_oversized_request() {
    let (a, _b) = UnixStream::pair().unwrap();
    let mut big = request(Command::Del);
    big.pod_name = "x".repeat(MAX_MESSAGE_BYTES);
    let err = send_request(&a, &big, None).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn rejects_missing_newline() {
    let (a, b) = UnixStream::pair().unwrap();
    send_raw(
        &a,
        b"{\"version\":1,\"command\":\"del\",\"timeoutMs\":5}",
        &[],
    );
    expect_invalid(recv_request(b.as_fd()), "newline");
}

#[test]
fn rejects_bad_json_and_unknown_fields() {
    let (a, b) = UnixStream::pair().unwrap();
    let ns = netns();
    send_raw(
        &a,
        b"{\"version\":1,\"command\":\"add\"\n",
        &[ns.as_raw_fd()],
    );
    expect_invalid(recv_request(b.as_fd()), "not valid JSON");
    send_raw(
        &a,
        b"{\"version\":1,\"command\":\"del\",\"timeoutMs\":1,\"x\":0}\n",
        &[],
    );
    expect_invalid(recv_request(b.as_fd()), "unknown field");
}

#[test]
fn rejects_wrong_version() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut req = request(Command::Check);
    req.version = 2;
    send_request(&a, &req, None).unwrap();
    expect_invalid(recv_request(b.as_fd()), "protocol version 2");
}

#[test]
fn would_block_passes_through() {
    let (_a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let fd: BorrowedFd<'_> = b.as_fd();
    let err = recv_request(fd).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
}

#[test]
fn eof_is_reported() {
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    let err = recv_request(b.as_fd()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn response_round_trips() {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let sent = Response {
        outcome: Outcome::NotMeshed,
        message: "namespace not meshed".into(),
    };
    let line = encode_response(&sent);
    assert_eq!(line.last(), Some(&b'\n'));
    assert!(String::from_utf8_lossy(&line).contains("\"not_meshed\""));
    a.write_all(&line).unwrap();
    assert_eq!(read_response(&mut b).unwrap(), sent);
    drop(a);
    assert_eq!(
        read_response(&mut b).unwrap_err().kind(),
        io::ErrorKind::UnexpectedEof
    );
}

#[test]
fn request_wire_format_is_camel_case() {
    let json = serde_json::to_value(request(Command::Add)).unwrap();
    assert_eq!(json["command"], "add");
    assert_eq!(json["podNamespace"], "shop");
    assert_eq!(json["timeoutMs"], 10_000);
    assert_eq!(json["ips"][1], "fd00::7");
}
