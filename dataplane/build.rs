//! Compiles ferry's XDP programs (`bpf/*.c`) with clang into BPF objects in `OUT_DIR`, which
//! `src/xdp` embeds with `include_bytes!`.
//!
//! Needs clang (any version that targets BPF; 14 is tested), the kernel's UAPI headers
//! (`linux-libc-dev`) and libbpf's BPF headers (`libbpf-dev`). `CLANG` overrides the compiler.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: [&str; 4] = ["uplink", "pod", "sink", "offload"];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=bpf");

    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    for prog in PROGRAMS {
        let src = format!("bpf/{prog}.c");
        let obj = out.join(format!("{prog}.bpf.o"));
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!(
                "clang failed ({s}) compiling {src}: see its messages above; missing headers come from the \
                 Debian packages linux-libc-dev and libbpf-dev"
            ),
            Err(e) => panic!(
                "cannot run `{clang}` ({e}) to compile ferry's XDP programs: install clang (Debian: apt-get \
                 install clang) or set CLANG to a clang that targets BPF"
            ),
        }
    }
}
