//! A packet capture for tests, with an AF_PACKET socket: what crosses the
//! node-to-node link, and whether a plaintext canary is among it.
use std::{
    io::Read as _,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

const ETH_P_ALL: u16 = 0x0003;

/// Captures every frame in the current netns for `secs`, counting TCP
/// segments by port and looking for `canary` in any frame.
pub fn run(secs: f64, canary: &str, ports: &[u16]) -> Result<Value> {
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
    )?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    // The caller waits for this line before sending traffic.
    println!("{}", json!({"listening": "capture"}));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut buf = vec![0u8; 65_536];
    let (mut frames, mut canary_frames) = (0u64, 0u64);
    let mut by_port = vec![0u64; ports.len()];
    let needle = canary.as_bytes();
    while Instant::now() < deadline {
        let n = match (&socket).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let frame = &buf[..n];
        frames += 1;
        if !needle.is_empty() && frame.windows(needle.len()).any(|w| w == needle) {
            canary_frames += 1;
        }
        if let Some((sport, dport)) = tcp_ports(frame) {
            for (i, p) in ports.iter().enumerate() {
                if sport == *p || dport == *p {
                    by_port[i] += 1;
                }
            }
        }
    }
    let ports: serde_json::Map<String, Value> = ports
        .iter()
        .zip(by_port)
        .map(|(p, n)| (p.to_string(), n.into()))
        .collect();
    Ok(json!({"frames": frames, "canary_frames": canary_frames, "tcp_by_port": ports}))
}

/// TCP ports of an Ethernet frame carrying IPv4 or IPv6.
fn tcp_ports(f: &[u8]) -> Option<(u16, u16)> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (proto, l4) = match ethertype {
        0x0800 => {
            let ihl = usize::from(f.get(14)? & 0x0f) * 4;
            (*f.get(14 + 9)?, 14 + ihl)
        }
        0x86dd => (*f.get(14 + 6)?, 14 + 40),
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    Some((
        u16::from_be_bytes([*f.get(l4)?, *f.get(l4 + 1)?]),
        u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]),
    ))
}
