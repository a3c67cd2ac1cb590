//! A pcap-writing tap around any port, for debugging (hot path shaped, but it does I/O: a debug
//! tool, not for production traffic).
//!
//! Every packet received or sent through the wrapped port is appended to a pcap file in the
//! classic format (Ethernet link type), readable by tcpdump and tshark. A sent packet is recorded
//! as it was handed to the port: the bytes are copied before the send, because once sent the frame
//! belongs to the port (which may reuse or move it), and only the packets the port took are
//! written.

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
    /// The bytes of the packets being sent, copied before the send, back to back.
    staged: Vec<u8>,
    /// Where each staged packet ends in `staged`.
    staged_ends: Vec<usize>,
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
        Ok(PcapTap { inner, writer, direction, write_errors: 0, staged: Vec::new(), staged_ends: Vec::new() })
    }

    /// The wrapped port.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Packets that could not be written to the file.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
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

/// Append one packet to the file, counting a failure.
fn record(writer: &mut PcapWriter<BufWriter<File>>, write_errors: &mut u64, bytes: &[u8]) {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let pkt = PcapPacket::new(ts, bytes.len() as u32, bytes);
    if writer.write_packet(&pkt).is_err() {
        *write_errors += 1;
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
                record(&mut self.writer, &mut self.write_errors, mem.bytes(*p));
            }
        }
        n
    }

    fn send(&mut self, mem: &mut Self::Mem, pkts: &[Pkt]) -> usize {
        if self.direction == TapDirection::Rx {
            return self.inner.send(mem, pkts);
        }
        // Copy before handing over: after `send` the frame belongs to the port, which may have
        // moved the bytes. Which packets it takes is known only afterwards.
        self.staged.clear();
        self.staged_ends.clear();
        for p in pkts {
            self.staged.extend_from_slice(mem.bytes(*p));
            self.staged_ends.push(self.staged.len());
        }
        let n = self.inner.send(mem, pkts);
        let mut start = 0;
        for &end in &self.staged_ends[..n] {
            record(&mut self.writer, &mut self.write_errors, &self.staged[start..end]);
            start = end;
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

#[cfg(test)]
mod tests {
    use pcap_file::pcap::PcapReader;

    use super::*;
    use crate::frame::HeapMem;
    use crate::port::mem::{MemPort, MemPortConfig};

    fn recorded(path: &Path) -> Vec<Vec<u8>> {
        let mut reader = PcapReader::new(File::open(path).expect("pcap file")).expect("pcap header");
        let mut out = Vec::new();
        while let Some(p) = reader.next_packet() {
            out.push(p.expect("pcap record").data.into_owned());
        }
        out
    }

    #[test]
    fn records_only_the_packets_the_port_took() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("tap.pcap");
        let mut mem = HeapMem::new(8, 2048);
        let mut free = FreeFrames::all(8);
        let port = MemPort::new("p0", MemPortConfig { tx_ring: 1, ..MemPortConfig::default() });
        let mut tap = PcapTap::new(port, &path, TapDirection::Tx).expect("pcap file");
        // Two packets at offsets other than 0; a one-slot ring takes the first only.
        let mut pkts = Vec::new();
        for (payload, offset) in [(&b"first"[..], 50u16), (&b"second"[..], 70)] {
            let id = free.pop().expect("free frame");
            let o = usize::from(offset);
            mem.frame_mut(id)[o..o + payload.len()].copy_from_slice(payload);
            pkts.push(Pkt { frame: id, offset, len: payload.len() as u16 });
        }
        assert_eq!(tap.send(&mut mem, &pkts), 1);
        tap.finish().expect("flush");
        assert_eq!(recorded(&path), vec![b"first".to_vec()]);
    }
}
