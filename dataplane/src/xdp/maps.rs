//! Byte layouts of the configuration maps of ferry's XDP programs (setup side).
//!
//! Each function here produces exactly the bytes of one C struct in `dataplane/bpf/`; the loader
//! checks the sizes against the map definitions in the compiled object before writing, so a change
//! on one side without the other fails loudly at load time. Addresses and ports are in network
//! order, as the programs compare them with packet fields directly.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// `struct uplink_config` (bpf/uplink.c).
pub(crate) const UPLINK_CONFIG_SIZE: usize = 24;
/// `struct pod_config` (bpf/pod.c).
pub(crate) const POD_CONFIG_SIZE: usize = 24;
/// `struct lpm4_key` (bpf/pod.c).
pub(crate) const LPM4_KEY_SIZE: usize = 8;
/// `struct lpm6_key` (bpf/pod.c).
pub(crate) const LPM6_KEY_SIZE: usize = 20;

/// `struct service_key` (bpf/service_key.h): the uplinks' `frontends` and the pods' `backends`.
pub(crate) const SERVICE_KEY_SIZE: usize = 20;

/// `struct service_key { struct in6_addr addr; be16 port; u8 proto; u8 pad; }`: the address
/// IPv4-mapped, or all zeros for a node port (any of the node's addresses).
pub(crate) fn service_key(addr: Option<std::net::IpAddr>, port: u16, proto: u8) -> [u8; SERVICE_KEY_SIZE] {
    let mut b = [0u8; SERVICE_KEY_SIZE];
    match addr {
        Some(std::net::IpAddr::V4(a)) => b[0..16].copy_from_slice(&a.to_ipv6_mapped().octets()),
        Some(std::net::IpAddr::V6(a)) => b[0..16].copy_from_slice(&a.octets()),
        None => {}
    }
    b[16..18].copy_from_slice(&port.to_be_bytes());
    b[18] = proto;
    b
}

/// `struct uplink_config { u8 has_v4; u8 has_v6; be16 port; be32 addr4; struct in6_addr addr6; }`.
pub(crate) fn uplink_config(port: u16, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> [u8; UPLINK_CONFIG_SIZE] {
    let mut b = [0u8; UPLINK_CONFIG_SIZE];
    b[0] = u8::from(v4.is_some());
    b[1] = u8::from(v6.is_some());
    b[2..4].copy_from_slice(&port.to_be_bytes());
    if let Some(a) = v4 {
        b[4..8].copy_from_slice(&a.octets());
    }
    if let Some(a) = v6 {
        b[8..24].copy_from_slice(&a.octets());
    }
    b
}

/// `struct pod_config { u8 has_gw4; u8 has_gw6; u8 pad[2]; be32 gw4; struct in6_addr gw6; }`.
pub(crate) fn pod_config(gw4: Option<Ipv4Addr>, gw6: Option<Ipv6Addr>) -> [u8; POD_CONFIG_SIZE] {
    let mut b = [0u8; POD_CONFIG_SIZE];
    b[0] = u8::from(gw4.is_some());
    b[1] = u8::from(gw6.is_some());
    if let Some(a) = gw4 {
        b[4..8].copy_from_slice(&a.octets());
    }
    if let Some(a) = gw6 {
        b[8..24].copy_from_slice(&a.octets());
    }
    b
}

/// `struct lpm4_key { u32 prefixlen; be32 addr; }`: the prefix length in host order, as the kernel's
/// LPM trie reads it, then the network address.
pub(crate) fn lpm4_key(net: Ipv4Net) -> [u8; LPM4_KEY_SIZE] {
    let mut b = [0u8; LPM4_KEY_SIZE];
    b[..4].copy_from_slice(&u32::from(net.prefix_len()).to_ne_bytes());
    b[4..].copy_from_slice(&net.network().octets());
    b
}

/// `struct lpm6_key { u32 prefixlen; struct in6_addr addr; }`.
pub(crate) fn lpm6_key(net: Ipv6Net) -> [u8; LPM6_KEY_SIZE] {
    let mut b = [0u8; LPM6_KEY_SIZE];
    b[..4].copy_from_slice(&u32::from(net.prefix_len()).to_ne_bytes());
    b[4..].copy_from_slice(&net.network().octets());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_config_layout() {
        let b = uplink_config(4789, Some(Ipv4Addr::new(10, 0, 0, 1)), Some("fd00::1".parse().expect("addr")));
        assert_eq!(&b[..8], &[1, 1, 0x12, 0xb5, 10, 0, 0, 1]);
        assert_eq!(b[8], 0xfd);
        assert_eq!(b[23], 1);
        let b = uplink_config(6081, None, None);
        assert_eq!(b, [0, 0, 0x17, 0xc1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn service_key_layout() {
        let b = service_key(Some("192.0.2.7".parse().expect("addr")), 30080, 6);
        assert_eq!(&b[..16], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]);
        assert_eq!(&b[16..], &[0x75, 0x80, 6, 0]);
        assert_eq!(service_key(None, 53, 17)[..18], [0u8; 16].iter().chain(&[0, 53]).copied().collect::<Vec<_>>()[..]);
    }

    #[test]
    fn pod_config_layout() {
        let b = pod_config(Some(Ipv4Addr::new(169, 254, 1, 1)), None);
        assert_eq!(&b[..8], &[1, 0, 0, 0, 169, 254, 1, 1]);
        assert!(b[8..].iter().all(|&x| x == 0));
    }

    #[test]
    fn lpm_keys_hold_the_network_not_the_host_bits() {
        let k = lpm4_key("10.244.3.7/16".parse().expect("net"));
        assert_eq!(u32::from_ne_bytes([k[0], k[1], k[2], k[3]]), 16);
        assert_eq!(&k[4..], &[10, 244, 0, 0]);
        let k = lpm6_key("fd00:10:244::5/48".parse().expect("net"));
        assert_eq!(u32::from_ne_bytes([k[0], k[1], k[2], k[3]]), 48);
        assert_eq!(&k[4..10], &[0xfd, 0, 0, 0x10, 0x02, 0x44]);
        assert!(k[10..].iter().all(|&x| x == 0));
    }
}
