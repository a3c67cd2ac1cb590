//! `ferry-cni`: the CNI plugin kubelet/containerd call to wire a pod into ferry's network.

fn main() -> std::process::ExitCode {
    ferry::cni::main()
}
