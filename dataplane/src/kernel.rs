//! Kernel exchanges that both the data plane and the agent make (setup side; nothing here runs per
//! packet): one rtnetlink request and its replies, and one ethtool ioctl. The neighbour sync, the
//! XDP setup and `ferry::netlink` (the CNI plugin's and the agent's link operations) all go
//! through these, each building and decoding its own messages.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use netlink_packet_core::{DecodeError, NLM_F_ACK, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR};
use netlink_sys::Socket;

/// A netlink message header's length (`struct nlmsghdr`).
const HEADER_LEN: usize = 16;
/// Receive buffer per datagram: the kernel sizes dump datagrams from the reader's buffer but never
/// above 32 KiB, so 64 KiB holds any of them.
const RECV_BUF: usize = 64 * 1024;

/// Sets `SO_RCVTIMEO` on `fd`: each `recv` waits at most `timeout`.
///
/// # Errors
/// The kernel's, from `setsockopt`.
pub fn set_recv_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `fd` is an open socket; `tv` is a valid timeval and its size is passed.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// One datagram from `socket` into `buf` (replacing what it held), retried when interrupted.
///
/// # Errors
/// The kernel's (`WouldBlock` when the receive timed out or, with `MSG_DONTWAIT`, nothing is
/// queued); `InvalidData` for a datagram larger than the buffer.
pub fn netlink_recv(socket: &Socket, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<usize> {
    buf.clear();
    buf.reserve(RECV_BUF);
    loop {
        // MSG_TRUNC: the datagram's real length, to detect one larger than the buffer.
        match socket.recv(buf, flags | libc::MSG_TRUNC) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(n) if n > buf.len() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a {n}-byte netlink datagram exceeds the {RECV_BUF}-byte buffer"),
                ));
            }
            other => return other,
        }
    }
}

/// The netlink messages in `bytes` (one datagram, or several concatenated): each one's sequence
/// number and bytes.
///
/// # Errors
/// A header whose length does not fit what is left: the stream cannot be framed beyond it.
pub fn netlink_messages(bytes: &[u8]) -> Result<Vec<(u32, &[u8])>, DecodeError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= HEADER_LEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < HEADER_LEN || len > rest.len() {
            return Err(DecodeError::from(format!("netlink message of length {len} with {} bytes left", rest.len())));
        }
        let seq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        out.push((seq, &rest[..len]));
        // Messages are 4-byte aligned; the last one's padding may be missing.
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The flags of the netlink message in `request`.
fn flags(request: &[u8]) -> u16 {
    request.get(6..8).map_or(0, |f| u16::from_ne_bytes([f[0], f[1]]))
}

/// Whether the request in `bytes` is a dump (its replies end with `NLMSG_DONE`).
pub fn is_dump(request: &[u8]) -> bool {
    flags(request) & NLM_F_DUMP == NLM_F_DUMP
}

/// Sends `request` (one rtnetlink message with sequence number `seq`) on `socket` and returns the
/// replies carrying `seq`, concatenated (each padded to 4 bytes), through the one that ends the
/// exchange: `NLMSG_DONE` or `NLMSG_ERROR` (a dump's end, an error, or the acknowledgement a
/// request with `NLM_F_ACK` asked for), or else the first reply. Replies to earlier requests (that
/// timed out) are skipped. The kernel's errors come back as `NLMSG_ERROR` messages, for the caller
/// to decode with the rest.
///
/// Bounded: `socket` must have a receive timeout ([`set_recv_timeout`]), and the exchange ends at
/// `timeout` in all, however many datagrams the answer spans. `buf` is scratch space.
///
/// # Errors
/// The kernel's, from sending or receiving; `TimedOut` when the kernel did not answer or its answer
/// did not end in time; `InvalidData` for replies that cannot be framed.
pub fn netlink_request(
    socket: &Socket,
    request: &[u8],
    seq: u32,
    timeout: Duration,
    buf: &mut Vec<u8>,
) -> io::Result<Vec<u8>> {
    let f = flags(request);
    let until_done_or_error = f & NLM_F_DUMP == NLM_F_DUMP || f & NLM_F_ACK != 0;
    socket.send(request, 0)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match netlink_recv(socket, buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the kernel did not answer"));
            }
            Err(e) => return Err(e),
        }
        let mut end = false;
        for (s, m) in netlink_messages(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))? {
            if s != seq {
                continue;
            }
            out.extend_from_slice(m);
            out.resize(out.len().next_multiple_of(4), 0);
            let kind = u16::from_ne_bytes([m[4], m[5]]);
            end |= !until_done_or_error || kind == NLMSG_DONE || kind == NLMSG_ERROR;
        }
        if end {
            return Ok(out);
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("the kernel's answer did not end within {timeout:?}")))
}

/// `SIOCETHTOOL` for interface `ifname` through `socket` (any socket of the interface's network
/// namespace): the kernel reads the command in `cmd`'s first `u32` and reads and writes the rest
/// of `cmd`.
///
/// # Errors
/// The kernel's (`ENODEV` for an interface that does not exist, also for a name no interface can
/// have).
///
/// # Safety
/// `T` must be the `#[repr(C)]` struct `<linux/ethtool.h>` gives for the command in its first
/// field (`struct ethtool_value`, `struct ethtool_channels`, ...), whole: the kernel writes as
/// many bytes as that command's struct has.
pub unsafe fn ethtool<T>(socket: BorrowedFd<'_>, ifname: &str, cmd: &mut T) -> io::Result<()> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value (and terminates the name).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (cmd as *mut T).cast();
    // SAFETY: SIOCETHTOOL reads `ifr` (a NUL-terminated name and a pointer to `cmd`, which lives
    // through the call) and writes within `*cmd`, which the caller sized for its command.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &raw mut ifr) };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_by_their_headers() {
        let mut bytes = Vec::new();
        for (seq, extra) in [(7u32, 4usize), (9, 2)] {
            let len = HEADER_LEN + extra;
            bytes.extend_from_slice(&(len as u32).to_ne_bytes());
            bytes.extend_from_slice(&[0; 4]);
            bytes.extend_from_slice(&seq.to_ne_bytes());
            bytes.extend_from_slice(&[0; 4]);
            bytes.resize(bytes.len() + extra, 0xab);
            bytes.resize(bytes.len().next_multiple_of(4), 0);
        }
        let m = netlink_messages(&bytes).expect("frames");
        assert_eq!(m.iter().map(|(s, b)| (*s, b.len())).collect::<Vec<_>>(), vec![(7, 20), (9, 18)]);
        bytes[0] = 200;
        assert!(netlink_messages(&bytes).is_err(), "a length beyond the bytes left");
    }

    #[test]
    fn names_no_interface_can_have_are_enodev() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let mut value = [0u32; 2];
        for name in ["", "sixteen-bytes-xx", "a\0b"] {
            // SAFETY: `value` is a `struct ethtool_value`; the call fails before the ioctl anyway.
            let e = unsafe { ethtool(std::os::fd::AsFd::as_fd(&socket), name, &mut value) }.expect_err(name);
            assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{name:?}");
        }
    }
}
