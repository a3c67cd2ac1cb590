//! A pcap-writing tap around any port, for debugging (hot path shaped, but it does I/O: a debug
//! tool, not for production traffic).
//!
//! Every packet received or sent through the wrapped port is appended to a pcap file with its
//! direction in the interface-description-less classic format (Ethernet link type), readable by
//! tcpdump and tshark.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

use super::{Port, PortStats};
use crate::frame::{FrameMem, FreeFrames, Pkt};

/// Which directions to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapDirection {
    /// Received packets only.
    Rx,
    /// Sent packets only.
    Tx,
    /// Both.
    Both,
}

/// A port whose traffic is also written to a pcap file.
#[derive(Debug)]
pub struct PcapTap<P> {
    inner: P,
    writer: PcapWriter<BufWriter<File>>,
    direction: TapDirection,
    write_errors: u64,
}

impl<P: Port> PcapTap<P> {
    /// Wrap `inner`, creating (truncating) the pcap file at `path`.
    ///
    /// # Errors
    /// The file cannot be created or its header written.
    pub fn new(inner: P, path: &Path, direction: TapDirection) -> io::Result<Self> {
        let file = BufWriter::new(File::create(path)?);
        let header = PcapHeader { datalink: DataLink::ETHERNET, ..Default::default() };
        let writer = PcapWriter::with_header(file, header).map_err(io::Error::other)?;
        Ok(PcapTap { inner, writer, direction, write_errors: 0 })
    }

    /// The wrapped port.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Packets that could not be written to the file.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    fn record(&mut self, bytes: &[u8]) {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let pkt = PcapPacket::new(ts, bytes.len() as u32, bytes);
        if self.writer.write_packet(&pkt).is_err() {
            self.write_errors += 1;
        }
    }

    /// Finish the pcap file and give the wrapped port back. (Dropping the tap also flushes the file,
    /// silently.)
    ///
    /// # Errors
    /// The file could not be flushed.
    pub fn finish(self) -> io::Result<P> {
        let mut file = self.writer.into_writer();
        io::Write::flush(&mut file)?;
        Ok(self.inner)
    }
}

impl<P: Port> Port for PcapTap<P> {
    type Mem = P::Mem;

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn recv(&mut self, mem: &mut Self::Mem, out: &mut [Pkt]) -> usize {
        let n = self.inner.recv(mem, out);
        if self.direction != TapDirection::Tx {
            for p in &out[..n] {
                self.record(mem.bytes(*p));
            }
        }
        n
    }

    fn send(&mut self, mem: &mut Self::Mem, pkts: &[Pkt]) -> usize {
        // Record before handing over: after `send` the frame belongs to the port.
        let n = self.inner.send(mem, pkts);
        if self.direction != TapDirection::Rx {
            for p in &pkts[..n] {
                self.record(mem.bytes(*p));
            }
        }
        n
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    fn reclaim(&mut self, free: &mut FreeFrames) -> usize {
        self.inner.reclaim(free)
    }

    fn refill(&mut self, free: &mut FreeFrames) -> usize {
        self.inner.refill(free)
    }

    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.poll_fd()
    }

    fn frames_held(&self) -> usize {
        self.inner.frames_held()
    }

    fn release(self, free: &mut FreeFrames) {
        self.inner.release(free);
    }

    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
}
