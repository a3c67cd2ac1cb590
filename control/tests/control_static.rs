//! The static file source end to end (no servers needed): load, reload on change (including an
//! editor-style rename over the file), a broken file keeps the last good table, and the metrics
//! endpoint serves what happened. Published through the production publisher into the data
//! plane's tables, read as a worker reads them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{has, http_get, is_own, underlay, wait_for};
use ferry_control::{ControlConfig, ControlPlane, SourceKind};

const WAIT: Duration = Duration::from_secs(10);

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn static_file_loads_reloads_and_keeps_last_good_on_errors() {
    common::init_tracing();
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        r#"
        cluster_cidrs = ["10.244.0.0/16"]
        [[node]]
        name = "me"
        pod_cidrs = ["10.244.9.0/24"]
        [[node]]
        name = "a"
        pod_cidrs = ["10.244.1.0/24"]
        underlay = "192.0.2.1"
        "#,
    )
    .expect("write");
    let mut cfg = ControlConfig::new("me");
    cfg.static_file = Some(path.clone());
    cfg.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts");

    let s = wait_for(&mut reader, WAIT, "initial load", |s| is_own(s, "10.244.9.7")).await;
    assert_eq!(underlay(&s, "10.244.1.7"), Some("192.0.2.1".parse().expect("ip")));

    // Edit in place: a moves, b appears, and b2 lies outside the cluster network (rejected alone).
    std::fs::write(
        &path,
        r#"
        cluster_cidrs = ["10.244.0.0/16"]
        [[node]]
        name = "me"
        pod_cidrs = ["10.244.9.0/24"]
        [[node]]
        name = "a"
        pod_cidrs = ["10.244.1.0/24"]
        underlay = "192.0.2.11"
        [[node]]
        name = "b"
        pod_cidrs = ["10.244.2.0/24"]
        underlay = "192.0.2.2"
        [[node]]
        name = "b2"
        pod_cidrs = ["10.99.2.0/24"]
        underlay = "192.0.2.22"
        "#,
    )
    .expect("write");
    let s = wait_for(&mut reader, WAIT, "in-place edit", |s| {
        underlay(s, "10.244.1.1").is_some_and(|u| u.to_string() == "192.0.2.11")
    })
    .await;
    assert_eq!(
        underlay(&s, "10.244.2.1"),
        Some("192.0.2.2".parse().expect("ip")),
        "b appeared in the same publication"
    );
    assert!(!has(&s, "10.99.2.1"));
    assert_eq!(cp.metrics().rejected_total(SourceKind::Static, "pod_cidrs"), 1);

    // Editor-style save (write a temp file, rename over): a is gone.
    write_atomically(
        &path,
        "[[node]]\nname = \"me\"\npod_cidrs = [\"10.244.9.0/24\"]\n[[node]]\nname = \"b\"\npod_cidrs = [\"10.244.2.0/24\"]\nunderlay = \"192.0.2.2\"\n",
    );
    let s = wait_for(&mut reader, WAIT, "rename-over reload", |s| !has(s, "10.244.1.1")).await;
    assert!(has(&s, "10.244.2.1") && is_own(&s, "10.244.9.1"));
    let generation = s.generation();

    // A broken file: the table stays, one warning is counted.
    write_atomically(&path, "[[node]\nname = ");
    common::wait_until(WAIT, "the broken file to be counted", || {
        cp.metrics().rejected_total(SourceKind::Static, "file") == 1
    })
    .await;
    let s = reader.load();
    assert_eq!(s.generation(), generation, "nothing published for a broken file");
    assert!(has(s, "10.244.2.1") && is_own(s, "10.244.9.1"));
    assert_eq!(cp.metrics().source_up(SourceKind::Static), Some(false));

    // The metrics endpoint serves the counters and the convergence histogram.
    let addr = cp.metrics_addr().expect("metrics enabled");
    let (status, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await.expect("join").expect("GET");
    assert!(status.contains("200"), "{status}");
    for needle in [
        "ferry_control_routes_installed{next_hop=\"local\"} 1",
        "ferry_control_routes_installed{next_hop=\"tunnel\"} 1",
        "ferry_control_rejected_objects_total{source=\"static\",field=\"file\"} 1",
        "ferry_control_source_up{source=\"static\"} 0",
        "ferry_control_convergence_seconds_count",
    ] {
        assert!(body.contains(needle), "metrics lack {needle:?}:\n{body}");
    }
    let (status, _) = tokio::task::spawn_blocking(move || http_get(addr, "/other")).await.expect("join").expect("GET");
    assert!(status.contains("404"), "{status}");
    cp.shutdown();
}

/// In-place rewrites (truncate, then write a moment later), seen through inotify: the truncated
/// file (empty, which parses) is never published; node `a`, in every full version of the file,
/// keeps its route throughout, and the last version lands. (A poll landing inside a rewrite, with
/// inotify silent, as seen under `ip netns exec`, is the unit test
/// `a_read_is_taken_once_two_reads_agree`.)
#[tokio::test]
async fn in_place_rewrites_never_publish_a_truncated_file() {
    common::init_tracing();
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("routes.toml");
    let text = |b: u8| {
        format!(
            "[[node]]\nname = \"me\"\npod_cidrs = [\"10.244.9.0/24\"]\n\
             [[node]]\nname = \"a\"\npod_cidrs = [\"10.244.1.0/24\"]\nunderlay = \"192.0.2.1\"\n\
             [[node]]\nname = \"b\"\npod_cidrs = [\"10.244.2.0/24\"]\nunderlay = \"192.0.2.{b}\"\n"
        )
    };
    std::fs::write(&path, text(100)).expect("write");
    let mut cfg = ControlConfig::new("me");
    cfg.static_file = Some(path.clone());
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts");
    wait_for(&mut reader, WAIT, "initial load", |s| has(s, "10.244.1.7")).await;

    // 40 rewrites, each leaving the file empty for 30 ms (shorter than the source's settle
    // time, longer than its sampling here); b's underlay changes each time, so each is a reload.
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            for i in 0..40u8 {
                let f = std::fs::File::create(&path).expect("truncate");
                std::thread::sleep(Duration::from_millis(30));
                std::io::Write::write_all(&mut &f, text(101 + i).as_bytes()).expect("write");
                drop(f);
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let (mut samples, mut withdrawn) = (0u32, 0u32);
    while !writer.is_finished() {
        samples += 1;
        if !has(reader.load(), "10.244.1.7") {
            withdrawn += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.join().expect("writer");
    assert!(samples > 100, "sampled the tables {samples} times only");
    assert_eq!(withdrawn, 0, "node a's route was withdrawn in {withdrawn} of {samples} samples");
    let s = wait_for(&mut reader, WAIT, "the last version", |s| {
        underlay(s, "10.244.2.1").is_some_and(|u| u.to_string() == "192.0.2.140")
    })
    .await;
    assert!(has(&s, "10.244.1.7"));
    cp.shutdown();
}

#[test]
fn metrics_are_off_unless_asked_and_a_bad_source_is_refused() {
    let dir = tempfile::TempDir::new().expect("dir");
    let mut cfg = ControlConfig::new("me");
    cfg.static_file = Some(dir.path().join("absent.toml"));
    let (publisher, _reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts with a missing file (waits for it)");
    assert_eq!(cp.metrics_addr(), None);
    drop(cp);

    let (publisher, _reader) = common::tables();
    let err = ControlPlane::spawn(ControlConfig::new("me"), publisher).expect_err("no source");
    assert!(err.to_string().contains("no route source"), "{err}");
}
