//! Attach logic against a fake kernel: mode fallback, stale and foreign programs, error messages.

use super::sys::XdpProgIds;
use super::sys::fake::FakeSys;
use super::*;

const DRV: u32 = xdp_flags::DRV_MODE;
const SKB: u32 = xdp_flags::SKB_MODE;

fn attach(sys: &FakeSys, mode: XdpMode) -> Result<AttachMode, XdpError> {
    attach_with(sys, 42, "eth0", mode).map(|(ifindex, _link, mode)| {
        assert_eq!(ifindex, 2);
        mode
    })
}

fn links(sys: &FakeSys) -> Vec<String> {
    sys.calls().into_iter().filter(|c| c.starts_with("xdp_link") || c.starts_with("xdp_detach")).collect()
}

#[test]
fn auto_prefers_native() {
    let sys = FakeSys::default();
    assert_eq!(attach(&sys, XdpMode::Auto).expect("attaches"), AttachMode::Native);
    assert_eq!(links(&sys), vec![format!("xdp_link 2 42 {DRV}")]);
}

#[test]
fn auto_falls_back_to_generic() {
    let sys = FakeSys { link_native: Err(libc::EOPNOTSUPP), ..Default::default() };
    assert_eq!(attach(&sys, XdpMode::Auto).expect("attaches"), AttachMode::Generic);
    assert_eq!(links(&sys), vec![format!("xdp_link 2 42 {DRV}"), format!("xdp_link 2 42 {SKB}")]);
}

#[test]
fn auto_reports_both_failures() {
    let sys = FakeSys { link_native: Err(libc::EOPNOTSUPP), link_generic: Err(libc::ERANGE), ..Default::default() };
    let err = attach(&sys, XdpMode::Auto).expect_err("no mode works");
    assert!(matches!(err, XdpError::Unsupported { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("`eth0`") && msg.contains("native mode failed") && msg.contains("generic mode failed"),
        "{msg}"
    );
    assert!(msg.contains("MTU"), "the fix is named: {msg}");
}

#[test]
fn forced_native_does_not_fall_back() {
    let sys = FakeSys { link_native: Err(libc::EOPNOTSUPP), ..Default::default() };
    let err = attach(&sys, XdpMode::Native).expect_err("native only");
    assert!(matches!(err, XdpError::Attach { mode: "native", .. }), "{err:?}");
    assert_eq!(links(&sys), vec![format!("xdp_link 2 42 {DRV}")]);
    assert!(err.to_string().contains("use auto or generic mode"), "{err}");
}

#[test]
fn forced_generic_uses_skb_mode() {
    let sys = FakeSys::default();
    assert_eq!(attach(&sys, XdpMode::Generic).expect("attaches"), AttachMode::Generic);
    assert_eq!(links(&sys), vec![format!("xdp_link 2 42 {SKB}")]);
}

#[test]
fn permission_errors_do_not_fall_back() {
    let sys = FakeSys { link_native: Err(libc::EPERM), ..Default::default() };
    let err = attach(&sys, XdpMode::Auto).expect_err("not permitted");
    assert!(matches!(err, XdpError::NotPermitted { .. }), "{err:?}");
    assert_eq!(links(&sys).len(), 1);
    let msg = err.to_string();
    assert!(msg.contains("CAP_BPF") && msg.contains("CAP_NET_ADMIN") && msg.contains("root"), "{msg}");
}

#[test]
fn missing_interface_is_named() {
    let sys = FakeSys::default();
    let err = attach_with(&sys, 42, "eth9", XdpMode::Auto).expect_err("no eth9");
    assert!(matches!(err, XdpError::NoSuchInterface { .. }), "{err:?}");
    assert!(err.to_string().contains("`eth9` does not exist") && err.to_string().contains("ip link show"), "{err}");
    assert!(links(&sys).is_empty());
}

#[test]
fn stale_ferry_program_is_replaced() {
    let sys = FakeSys {
        attached: XdpProgIds { generic: 7, ..Default::default() },
        names: vec![(7, "ferry_uplink")],
        ..Default::default()
    };
    assert_eq!(attach(&sys, XdpMode::Auto).expect("attaches"), AttachMode::Native);
    assert_eq!(links(&sys), vec![format!("xdp_detach_legacy 2 {SKB}"), format!("xdp_link 2 42 {DRV}")]);
}

#[test]
fn foreign_program_is_left_alone() {
    let sys = FakeSys {
        attached: XdpProgIds { native: 9, ..Default::default() },
        names: vec![(9, "xdp_firewall")],
        ..Default::default()
    };
    let err = attach(&sys, XdpMode::Auto).expect_err("foreign program");
    assert!(matches!(err, XdpError::ForeignProgram { id: 9, .. }), "{err:?}");
    assert!(links(&sys).is_empty(), "nothing detached or attached: {:?}", sys.calls());
    let msg = err.to_string();
    assert!(msg.contains("xdp_firewall") && msg.contains("ip link set dev eth0 xdp off"), "{msg}");
}

#[test]
fn live_ferry_is_not_disturbed() {
    let sys = FakeSys {
        attached: XdpProgIds { native: 5, ..Default::default() },
        names: vec![(5, "ferry_pod")],
        legacy_detach: Err(libc::EBUSY),
        ..Default::default()
    };
    let err = attach(&sys, XdpMode::Auto).expect_err("held by a link");
    assert!(matches!(err, XdpError::InUse { id: 5, .. }), "{err:?}");
    assert!(err.to_string().contains("stop that ferry first"), "{err}");
    assert_eq!(links(&sys), vec![format!("xdp_detach_legacy 2 {DRV}")]);
}

#[test]
fn queue_count_distinguishes_missing_from_unknown() {
    let sys =
        FakeSys { interfaces: vec![("eth0", 2, Ok(8)), ("tun0", 3, Err(libc::EOPNOTSUPP))], ..Default::default() };
    assert_eq!(queue_count_with(&sys, "eth0").expect("known"), Some(8));
    assert_eq!(queue_count_with(&sys, "tun0").expect("unknown is not an error"), None);
    let err = queue_count_with(&sys, "eth7").expect_err("missing");
    assert!(matches!(err, XdpError::NoSuchInterface { .. }), "{err:?}");
}

#[test]
fn program_names_fit_the_kernel() {
    // The kernel keeps 15 bytes of a program name; stale detection compares whole names.
    for kind in [ProgramKind::Uplink, ProgramKind::Pod, ProgramKind::Sink] {
        assert!(kind.name().len() <= 15, "{}", kind.name());
        assert!(is_ferry_program(kind.name()));
        assert_eq!(kind.c_name().to_str().ok(), Some(kind.name()));
    }
    assert!(!is_ferry_program("ferry"));
    assert!(!is_ferry_program("xsk_def_prog"));
}

#[test]
fn embedded_objects_are_bpf_elf() {
    for kind in [ProgramKind::Uplink, ProgramKind::Pod, ProgramKind::Sink] {
        let obj = kind.object();
        assert_eq!(&obj[..4], b"\x7fELF", "{kind:?}");
        // e_machine (offset 18, little endian) is EM_BPF = 247.
        assert_eq!(u16::from_le_bytes([obj[18], obj[19]]), 247, "{kind:?}");
        assert_eq!(obj.as_ptr() as usize % 8, 0, "libelf wants the object aligned");
    }
}

#[test]
fn config_errors_name_the_fix() {
    let err = XdpProgram::uplink(&UplinkConfig { tunnel_port: 4789, local_v4: None, local_v6: None }, 1)
        .expect_err("no address");
    assert!(err.to_string().contains("underlay IPv4 and/or IPv6 address"), "{err}");
    let err =
        XdpProgram::uplink(&UplinkConfig { tunnel_port: 0, local_v4: Some(Ipv4Addr::LOCALHOST), local_v6: None }, 1)
            .expect_err("port 0");
    assert!(err.to_string().contains("4789"), "{err}");
    let err = XdpProgram::pod(&PodConfig::default(), 1).expect_err("no pod network");
    assert!(err.to_string().contains("pod CIDRs"), "{err}");
}
