//! A minimal HTTP/1.0 GET from inside a network namespace, for the agents'
//! admin servers and Prometheus' API (both live inside the virtual cluster).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

pub struct Response {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A TCP connection made from inside `netns`: only the connecting thread
/// enters it; the socket stays in it afterwards.
pub fn connect_in_netns(netns: &Path, addr: SocketAddr) -> Result<TcpStream> {
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<TcpStream> {
        let ns =
            std::fs::File::open(&netns).with_context(|| format!("opening {}", netns.display()))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", netns.display()))?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr} in {}", netns.display()))
    })
    .join()
    .map_err(|_| anyhow!("the netns thread panicked"))?
}

/// HTTP/1.0, so the server closes after the response and never chunks it.
pub fn get(netns: &Path, addr: SocketAddr, path: &str, accept: Option<&str>) -> Result<Response> {
    let mut s = connect_in_netns(netns, addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).context("the response is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers in {text:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = match status_line.split_whitespace().nth(1).map(str::parse) {
        Some(Ok(s)) => s,
        _ => bail!("bad status line {status_line:?}"),
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// Percent-encodes a query parameter value.
pub fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
