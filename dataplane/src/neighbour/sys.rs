//! The kernel behind the neighbour sync, in one place (control side; nothing here runs on a
//! worker): the rtnetlink sockets and the probe datagram.
//!
//! [`NeighbourSys`] is everything the sync asks of the kernel; [`KernelSys`] is the kernel. Unit
//! tests put a fake in its place that answers requests with canned netlink messages (the idea of
//! aya's `sys/fake.rs`), so the whole sync, including the encoding and decoding of messages, is
//! tested without privileges.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::kernel::{self, netlink_recv, set_recv_timeout};

/// The discard port (RFC 863): a probe datagram is ignored by whoever receives it.
const DISCARD_PORT: u16 = 9;
/// How long one `recv` waits for the kernel (`SO_RCVTIMEO`).
const RECV_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one request may take in all, however many datagrams its answer spans.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Notification datagrams read per call at most (the rest stay queued for the next call).
const MAX_NOTIFICATION_READS: usize = 1024;
/// Socket receive buffer for notifications: a burst of neighbour changes (a switch reboot) must
/// not overflow it between two syncs. Overflowing only costs a full dump.
const NOTIFICATION_RCVBUF: libc::c_int = 4 << 20;

/// What the neighbour sync asks of the kernel. Every method is one kernel interaction (or a short
/// bounded sequence of them).
pub(crate) trait NeighbourSys: Send + fmt::Debug {
    /// Send one rtnetlink request (one message with sequence number `seq`) and return the reply
    /// messages carrying `seq`, concatenated, through the one that ends the exchange (as
    /// [`kernel::netlink_request`] says).
    fn request(&mut self, request: &[u8], seq: u32) -> io::Result<Vec<u8>>;

    /// Append to `out` the neighbour notifications already queued, without blocking. `ENOBUFS`
    /// when the kernel dropped some because the queue was full (the caller then dumps).
    fn notifications(&mut self, out: &mut Vec<u8>) -> io::Result<()>;

    /// Send a one-byte UDP datagram to `to`'s discard port from a socket bound to the uplink.
    fn send_datagram(&mut self, to: IpAddr) -> io::Result<()>;

    /// The descriptor that turns readable when a notification is queued, if subscribed.
    fn notification_fd(&self) -> Option<BorrowedFd<'_>>;
}

/// The kernel: rtnetlink sockets in the caller's network namespace.
#[derive(Debug)]
pub(crate) struct KernelSys {
    requests: Socket,
    notifications: Option<Socket>,
    /// The datagram probes' sockets, when that method is used; an error (as text: `io::Error`
    /// is not `Clone`) for a family whose socket could not be opened (a host without IPv6).
    udp4: Result<UdpSocket, String>,
    udp6: Result<UdpSocket, String>,
    buf: Vec<u8>,
}

/// Which socket [`KernelSys::open`] could not set up.
#[derive(Debug)]
pub(crate) struct OpenError {
    pub(crate) what: &'static str,
    pub(crate) source: io::Error,
}

fn open_err(what: &'static str) -> impl FnOnce(io::Error) -> OpenError {
    move |source| OpenError { what, source }
}

/// A non-blocking UDP socket on `any`'s family bound to interface `ifname`.
fn bound_udp(any: SocketAddr, ifname: &str) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(any)?;
    socket.set_nonblocking(true)?;
    let name = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = name.as_bytes_with_nul();
    // SAFETY: an open socket; `bytes` is a NUL-terminated name valid for its length.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            bytes.as_ptr().cast(),
            bytes.len() as libc::socklen_t,
        )
    };
    if ret == 0 { Ok(socket) } else { Err(io::Error::last_os_error()) }
}

impl KernelSys {
    /// Open the request socket, with `subscribe` a socket receiving the neighbour notifications
    /// (`RTNLGRP_NEIGH`), and with `datagrams` the UDP sockets of the datagram probes. All of them
    /// belong to the calling thread's network namespace, whatever thread uses them later. None
    /// needs a privilege; netlink probes need `CAP_NET_ADMIN` when they are sent.
    pub(crate) fn open(ifname: &str, subscribe: bool, datagrams: bool) -> Result<Self, OpenError> {
        let mut requests = Socket::new(NETLINK_ROUTE).map_err(open_err("an rtnetlink socket"))?;
        requests.bind_auto().map_err(open_err("an rtnetlink socket"))?;
        set_recv_timeout(requests.as_fd(), RECV_TIMEOUT).map_err(open_err("an rtnetlink socket"))?;
        let notifications = if subscribe {
            let what = "the neighbour notification socket";
            let mut s = Socket::new(NETLINK_ROUTE).map_err(open_err(what))?;
            s.bind_auto().map_err(open_err(what))?;
            s.add_membership(libc::RTNLGRP_NEIGH).map_err(open_err(what))?;
            s.set_non_blocking(true).map_err(open_err(what))?;
            // Best effort: the default buffer only means an earlier full dump after a burst.
            let _ = s.set_rx_buf_sz(NOTIFICATION_RCVBUF);
            Some(s)
        } else {
            None
        };
        let (udp4, udp6) = if datagrams {
            let udp4 = bound_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), ifname)
                .map_err(open_err("the IPv4 probe socket (SO_BINDTODEVICE)"))?;
            let udp6 = bound_udp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), ifname)
                .map_err(|e| format!("the IPv6 probe socket could not be opened: {e}"));
            (Ok(udp4), udp6)
        } else {
            let off = || Err("datagram probes are not configured".to_owned());
            (off(), off())
        };
        Ok(KernelSys { requests, notifications, udp4, udp6, buf: Vec::new() })
    }
}

impl NeighbourSys for KernelSys {
    fn request(&mut self, request: &[u8], seq: u32) -> io::Result<Vec<u8>> {
        kernel::netlink_request(&self.requests, request, seq, REQUEST_TIMEOUT, &mut self.buf)
    }

    fn notifications(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let Some(socket) = &self.notifications else { return Ok(()) };
        for _ in 0..MAX_NOTIFICATION_READS {
            match netlink_recv(socket, &mut self.buf, libc::MSG_DONTWAIT) {
                Ok(_) => {
                    out.extend_from_slice(&self.buf);
                    out.resize(out.len().next_multiple_of(4), 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn send_datagram(&mut self, to: IpAddr) -> io::Result<()> {
        let socket = match to {
            IpAddr::V4(_) => &self.udp4,
            IpAddr::V6(_) => &self.udp6,
        };
        socket.as_ref().map_err(|e| io::Error::other(e.clone()))?.send_to(&[0], (to, DISCARD_PORT)).map(drop)
    }

    fn notification_fd(&self) -> Option<BorrowedFd<'_>> {
        self.notifications.as_ref().map(AsFd::as_fd)
    }
}
