//! The data plane's Prometheus metrics (setup side): a prometheus-client [`Collector`] that reads
//! the workers' published counters at each scrape (summed over workers) and encodes them under
//! `ferry_dataplane_`. Label values (interface names, pod ids) are escaped by the encoder.
//!
//! | metric | labels | meaning |
//! | --- | --- | --- |
//! | `ferry_dataplane_{rx,tx}_{packets,bytes}_total` | `port`, `ifname`, `kind` | per port |
//! | `ferry_dataplane_socket_drops_total` | `port`, `ifname`, `why` | dropped by the kernel at an AF_XDP socket |
//! | `ferry_dataplane_drops_total` | `reason` | dropped by ferry |
//! | `ferry_dataplane_icmp_errors_total` | | ICMP errors sent |
//! | `ferry_dataplane_double_frees_total` | | frames freed twice (a bug if not 0) |
//! | `ferry_dataplane_headroom_moves_total` | | packets moved for headroom |
//! | `ferry_dataplane_frames` | `state` (`free`, `held`, `unaccounted`) | the workers' frames (gauge) |
//! | `ferry_dataplane_flows_total` | `namespace`, `verdict` | flows seen, by the source pod's namespace |
//! | `ferry_dataplane_flow_drops_total` | `namespace`, `reason` | dropped packets of recorded flows |
//! | `ferry_dataplane_flow_records_exported_total` | | flow records taken from the workers' export rings |
//! | `ferry_dataplane_flow_records_lost_total` | | flow records lost to a full export ring |
//! | `ferry_dataplane_flow_drop_events_lost_total` | | drop events lost to a full export ring |

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::{Shared, lock};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PortLabels {
    port: u16,
    ifname: String,
    kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SocketLabels {
    port: u16,
    ifname: String,
    why: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlowLabels {
    namespace: String,
    verdict: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FlowDropLabels {
    namespace: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Reads the agent's counters at each scrape.
#[derive(Debug)]
pub(super) struct DataplaneCollector(pub(super) Arc<Shared>);

/// One counter family: its descriptor, then one sample per label set.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter without labels.
fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let Some(c) = ferry_dataplane::counters::sum(shared.counters.iter().map(|a| &**a)) else { return Ok(()) };
        let ports: Vec<(u16, crate::admin::proto::PortInfo)> =
            lock(&shared.ports).iter().map(|(id, info)| (*id, info.clone())).collect();
        let label = |id: u16, info: &crate::admin::proto::PortInfo| PortLabels {
            port: id,
            ifname: info.ifname.clone(),
            kind: info.kind.clone(),
        };
        let families: [(&str, &str, bool, bool); 4] = [
            ("ferry_dataplane_rx_packets", "Packets received, by port", true, true),
            ("ferry_dataplane_rx_bytes", "Bytes received, by port", true, false),
            ("ferry_dataplane_tx_packets", "Packets transmitted, by port", false, true),
            ("ferry_dataplane_tx_bytes", "Bytes transmitted, by port", false, false),
        ];
        for (name, help, rx, packets) in families {
            let samples = ports.iter().map(|(id, info)| {
                let flow = if rx { c.rx.get(usize::from(*id)) } else { c.tx.get(usize::from(*id)) };
                let v = flow.map_or(0, |f| if packets { f.packets } else { f.bytes });
                (label(*id, info), v)
            });
            counters(&mut encoder, name, help, samples)?;
        }
        let socket = ports.iter().flat_map(|(id, info)| {
            let s = c.port.get(usize::from(*id)).copied().unwrap_or_default();
            [
                ("rx_ring_full", s.rx_ring_full),
                ("rx_no_frame", s.rx_no_frame),
                ("rx_dropped", s.rx_dropped),
                ("invalid_descs", s.invalid_descs),
            ]
            .map(|(why, v)| (SocketLabels { port: *id, ifname: info.ifname.clone(), why }, v))
        });
        counters(
            &mut encoder,
            "ferry_dataplane_socket_drops",
            "Frames the kernel dropped at a port's AF_XDP socket before ferry saw them",
            socket,
        )?;
        let drops = ferry_encap::DropReason::ALL.iter().map(|r| (ReasonLabels { reason: r.name() }, c.drops(*r)));
        counters(&mut encoder, "ferry_dataplane_drops", "Packets dropped, by reason", drops)?;
        counter(&mut encoder, "ferry_dataplane_icmp_errors", "ICMP errors sent", c.pipeline.icmp_errors)?;
        counter(
            &mut encoder,
            "ferry_dataplane_double_frees",
            "Frames given back twice to a worker's free list and refused (a bug if not 0)",
            c.double_frees,
        )?;
        counter(
            &mut encoder,
            "ferry_dataplane_headroom_moves",
            "Packets moved within their frame to make room for the tunnel headers (a copy of the whole packet; 0 on AF_XDP ports)",
            c.pipeline.headroom_moves,
        )?;
        let f = c.frames;
        let mut family = encoder.encode_descriptor(
            "ferry_dataplane_frames",
            "The workers' frames: free, held by ports, neither (leaked: 0 unless ferry has a bug)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (state, v) in [("free", f.free), ("held", f.held), ("unaccounted", f.unaccounted())] {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(family.encode_family(&StateLabels { state })?)?;
        }
        if shared.flows.enabled() {
            let (counts, lost, drops_lost) = shared.flows.counts();
            let flows =
                counts.flows.into_iter().map(|((namespace, verdict), v)| (FlowLabels { namespace, verdict }, v));
            counters(
                &mut encoder,
                "ferry_dataplane_flows",
                "Flows seen, by the source pod's namespace and verdict",
                flows,
            )?;
            let drops =
                counts.drops.into_iter().map(|((namespace, reason), v)| (FlowDropLabels { namespace, reason }, v));
            counters(
                &mut encoder,
                "ferry_dataplane_flow_drops",
                "Dropped packets of recorded flows, by namespace and reason",
                drops,
            )?;
            counter(
                &mut encoder,
                "ferry_dataplane_flow_records_exported",
                "Flow records taken from the workers' export rings",
                counts.records,
            )?;
            counter(
                &mut encoder,
                "ferry_dataplane_flow_records_lost",
                "Flow records lost to a full export ring",
                lost,
            )?;
            counter(
                &mut encoder,
                "ferry_dataplane_flow_drop_events_lost",
                "Drop events lost to a full export ring",
                drops_lost,
            )?;
        }
        Ok(())
    }
}
