//! Setup checks and error classification against a fake kernel and plain errno values.

use super::error::{classify_bind, classify_probe, classify_umem};
use super::*;
use crate::xdp::sys::fake::FakeSys;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

#[test]
fn missing_interface() {
    let sys = FakeSys::default();
    let err = check_queue(&sys, "eth9", 0).expect_err("no eth9");
    assert!(matches!(err, XskError::NoSuchInterface { .. }), "{err:?}");
    assert!(err.to_string().contains("`eth9` does not exist"), "{err}");
}

#[test]
fn queue_out_of_range_names_the_count_and_the_fix() {
    let sys = FakeSys::default();
    assert_eq!(check_queue(&sys, "eth0", 3).expect("queue 3 of 4"), Some(4));
    let err = check_queue(&sys, "eth0", 4).expect_err("queue 4 of 4");
    let msg = err.to_string();
    assert!(msg.contains("has 4 queue(s) (0 to 3), so queue 4 does not exist"), "{msg}");
    assert!(msg.contains("ethtool -L eth0"), "{msg}");
}

#[test]
fn unknown_queue_count_defers_to_the_kernel() {
    let sys = FakeSys { interfaces: vec![("tun0", 3, Err(libc::EOPNOTSUPP))], ..Default::default() };
    assert_eq!(check_queue(&sys, "tun0", 9).expect("no count, no verdict"), None);
    let err = classify_bind(errno(libc::EINVAL), "tun0", 9, None, None);
    assert!(matches!(err, XskError::QueueRefused { queue: 9, .. }), "{err:?}");
    assert!(err.to_string().contains("ethtool -l tun0"), "{err}");
    let err = classify_bind(errno(libc::EINVAL), "eth0", 9, Some(2), None);
    assert!(matches!(err, XskError::QueueOutOfRange { queues: 2, .. }), "{err:?}");
}

#[test]
fn bind_errors_say_what_to_do() {
    let err = classify_bind(errno(libc::EOPNOTSUPP), "veth0", 0, Some(1), Some("zero-copy mode is configured"));
    assert!(matches!(err, XskError::ZeroCopyUnsupported { .. }), "{err:?}");
    assert!(err.to_string().contains("use copy or automatic mode"), "{err}");
    let err = classify_bind(errno(libc::EPERM), "eth0", 0, Some(1), None);
    assert!(matches!(err, XskError::NotPermitted { .. }), "{err:?}");
    assert!(err.to_string().contains("run ferry as root"), "{err}");
    let err = classify_bind(errno(libc::ENODEV), "eth0", 0, Some(1), None);
    assert!(matches!(err, XskError::NoSuchInterface { .. }), "{err:?}");
}

#[test]
fn no_af_xdp_in_the_kernel() {
    let err = classify_probe(errno(libc::EAFNOSUPPORT));
    assert!(matches!(err, XskError::NoAfXdp), "{err:?}");
    assert!(err.to_string().contains("CONFIG_XDP_SOCKETS"), "{err}");
    let sys = FakeSys { probe: Err(libc::EAFNOSUPPORT), ..Default::default() };
    let err = XskMem::new_with(&sys, XskMemConfig::default()).expect_err("no AF_XDP");
    assert!(matches!(err, XskError::NoAfXdp), "{err:?}");
}

#[test]
fn not_root() {
    let sys = FakeSys { probe: Err(libc::EPERM), ..Default::default() };
    let err = XskMem::new_with(&sys, XskMemConfig::default()).expect_err("EPERM");
    assert!(matches!(err, XskError::NotPermitted { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("CAP_NET_RAW") && msg.contains("run ferry as root"), "{msg}");
}

#[test]
fn umem_refused_names_memlock_and_the_fixes() {
    for e in [libc::ENOBUFS, libc::EPERM] {
        let err = classify_umem(errno(e), 16 << 20, false);
        assert!(matches!(err, XskError::UmemRefused { mib: 16, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("16 MiB") && msg.contains("RLIMIT_MEMLOCK"), "{msg}");
        assert!(msg.contains("CAP_IPC_LOCK") && msg.contains("as root") && msg.contains("smaller UMEM"), "{msg}");
    }
    let err = classify_umem(errno(libc::ENOMEM), 1 << 30, true);
    assert!(err.to_string().contains("vm.nr_hugepages"), "{err}");
}

#[test]
fn busy_poll_sets_all_three_options() {
    let sys = FakeSys::default();
    let bp = BusyPoll { usecs: 50, budget: 16, defer_hard_irqs: 3, gro_flush_timeout_ns: 50_000 };
    set_busy_poll(&sys, 7, "eth0", bp).expect("options set");
    let sol = libc::SOL_SOCKET;
    assert_eq!(
        sys.calls(),
        vec![
            format!("set_sockopt 7 {sol} {SO_PREFER_BUSY_POLL} 1"),
            format!("set_sockopt 7 {sol} {SO_BUSY_POLL} 50"),
            format!("set_sockopt 7 {sol} {SO_BUSY_POLL_BUDGET} 16"),
        ]
    );
    let sys = FakeSys { set_sockopt: Err(libc::EPERM), ..Default::default() };
    let err = set_busy_poll(&sys, 7, "eth0", BusyPoll::default()).expect_err("refused");
    assert!(err.to_string().contains("SO_PREFER_BUSY_POLL"), "{err}");
}

#[test]
fn interrupt_deferral_writes_both_device_attributes() {
    let sys = FakeSys::default();
    let bp = BusyPoll { usecs: 50, budget: 16, defer_hard_irqs: 3, gro_flush_timeout_ns: 50_000 };
    defer_interrupts_with(&sys, "eth0", &bp).expect("attributes set");
    assert_eq!(
        sys.calls(),
        vec![
            "set_net_attr eth0 napi_defer_hard_irqs 3".to_owned(),
            "set_net_attr eth0 gro_flush_timeout 50000".to_owned()
        ]
    );
    let sys = FakeSys { set_net_attr: Err(libc::EACCES), ..Default::default() };
    let err = defer_interrupts_with(&sys, "eth0", &BusyPoll::default()).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("/sys/class/net/eth0/napi_defer_hard_irqs") && msg.contains("CAP_NET_ADMIN"), "{msg}");
}
