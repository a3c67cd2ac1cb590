//! deploy/ferry.yaml against a real kube-apiserver (Debian's 1.20, with RBAC and service-account
//! tokens) and a real etcd:
//!
//! - every manifest passes a server-side dry run and is then created, in file order, and the
//!   server keeps every field the manifest sets (1.20 drops unknown fields without an error, so
//!   "no error" alone would not catch a misspelt field);
//! - the ConfigMap carries deploy/ferry.toml and deploy/cni-conf.json byte for byte, and the
//!   agent accepts that ferry.toml;
//! - least privilege: with a token the server issues for the manifests' ServiceAccount (the
//!   TokenRequest API, as the kubelet gets one for the pod), ferry's control plane lists and
//!   watches Nodes and announces its own, and the same token is refused everything else tried:
//!   Secrets, ConfigMaps, Pods, creating or deleting Nodes, escalating its own role;
//! - stopping: with its DaemonSet present the agent keeps the node wired; with it deleted, or its
//!   service account and role gone, it is told to clean the node; with no server, it keeps it.

mod common;

use std::time::{Duration, Instant};

use common::{Etcd, KubeApiserver, has, is_own, underlay, wait_for};
use ferry_control::deployment::Deployment;
use ferry_control::{ControlConfig, ControlPlane, KubeAuth, KubeConfig};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const MANIFESTS: &str = include_str!("../../deploy/ferry.yaml");
const FERRY_TOML: &str = include_str!("../../deploy/ferry.toml");
const CNI_CONF: &str = include_str!("../../deploy/cni-conf.json");
const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";

/// The resource a manifest names, and whether it lives in a namespace.
fn resource(kind: &str, api_version: &str) -> (ApiResource, bool) {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "ConfigMap" => ("configmaps", true),
        "DaemonSet" => ("daemonsets", true),
        other => panic!("deploy/ferry.yaml has a {other}: teach this test its resource"),
    };
    (ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural), namespaced)
}

/// Every field `want` sets is in `got` with the same value (what the server added is ignored).
fn kept(want: &Value, got: &Value, path: &str, missing: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                match g.get(k) {
                    Some(gv) => kept(v, gv, &format!("{path}.{k}"), missing),
                    None => missing.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                kept(wv, gv, &format!("{path}[{i}]"), missing);
            }
        }
        (w, g) if w == g => {}
        (w, g) => missing.push(format!("{path}: sent {w}, the server kept {g}")),
    }
}

async fn is_forbidden<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) {
    match r {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden for ferry's service account, got {other:?}"),
    }
}

/// A token for `namespace/name` from the TokenRequest API.
async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": { "expirationSeconds": 3600 },
    });
    let req = http::Request::post(format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("json"))
        .expect("request");
    let resp: Value = client.request(req).await.expect("TokenRequest");
    resp["status"]["token"].as_str().expect("a token").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_apply_to_a_real_server_and_the_service_account_has_least_privilege() {
    common::init_tracing();
    let test = "manifests_apply_to_a_real_server_and_the_service_account_has_least_privilege";
    let Some(etcd_bin) = common::etcd_binary(test) else { return };
    let Some(kube_bin) = common::kube_apiserver_binary(test) else { return };
    let etcd = Etcd::start(&etcd_bin);
    let k = KubeApiserver::start(&kube_bin, &etcd).await;
    let admin = k.client().await;

    let docs: Vec<Value> = serde_saphyr::from_multiple(MANIFESTS).expect("deploy/ferry.yaml parses");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "DaemonSet"
        ],
        "the objects deploy/ferry.yaml is expected to hold, in the order they can be created"
    );

    // The ConfigMap is the repository's files, and the agent takes its ferry.toml.
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("ConfigMap");
    assert_eq!(cm["data"]["ferry.toml"].as_str(), Some(FERRY_TOML), "ConfigMap ferry.toml != deploy/ferry.toml");
    assert_eq!(cm["data"]["cni-conf.json"].as_str(), Some(CNI_CONF), "ConfigMap cni-conf.json != deploy/cni-conf.json");

    // Dry run, then create, each object in order; the server must keep every field sent.
    for doc in &docs {
        let kind = doc["kind"].as_str().expect("kind");
        let (ar, namespaced) = resource(kind, doc["apiVersion"].as_str().expect("apiVersion"));
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(admin.clone(), doc["metadata"]["namespace"].as_str().expect("namespace"), &ar)
        } else {
            Api::all_with(admin.clone(), &ar)
        };
        let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
        let name = doc["metadata"]["name"].as_str().expect("name");
        let dry = PostParams { dry_run: true, field_manager: None };
        api.create(&dry, &obj).await.unwrap_or_else(|e| panic!("dry run of {kind} {name}: {e}"));
        assert!(api.get_opt(name).await.expect("get").is_none(), "the dry run of {kind} {name} created it");
        let created =
            api.create(&PostParams::default(), &obj).await.unwrap_or_else(|e| panic!("create {kind} {name}: {e}"));
        let got = serde_json::to_value(&created).expect("json");
        let mut missing = Vec::new();
        for part in ["metadata", "spec", "data", "rules", "roleRef", "subjects"] {
            if let Some(w) = doc.get(part) {
                kept(w, &got[part], part, &mut missing);
            }
        }
        // The server adds to metadata (uid, ...); only what was sent matters, which `kept` checks.
        assert!(missing.is_empty(), "{kind} {name}: the server did not keep {missing:#?}");
    }

    // Nodes for ferry to find: this one and another.
    let nodes: Api<Node> = Api::all(admin.clone());
    for (name, cidr, ip) in [("self-node", "10.244.1.0/24", "192.0.2.250"), ("other", "10.244.2.0/24", "192.0.2.2")] {
        let n: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": { "name": name },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr] },
            "status": { "addresses": [ { "type": "InternalIP", "address": ip } ] }
        }))
        .expect("node");
        nodes.create(&PostParams::default(), &n).await.expect("create node");
    }

    // The agent's credentials: a token the server issues for ferry-system/ferry.
    let token = service_account_token(&admin, "ferry-system", "ferry").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).expect("token");
    let auth = match k.auth() {
        KubeAuth::Token { server, ca_file, insecure, .. } => KubeAuth::Token { server, token_file, ca_file, insecure },
        other => panic!("the harness gives token credentials, not {other:?}"),
    };
    let sa_auth = auth.clone();
    let sa = ferry_control::source::kube::client(&auth).await.expect("client");

    // What ferry does works: ferry's own control plane, on that token, lists and watches Nodes and
    // announces this node.
    let mut cfg = ControlConfig::new("self-node");
    cfg.public_ip = Some("192.0.2.250".parse().expect("ip"));
    cfg.vtep_mac = Some("02:00:00:00:02:50".parse().expect("mac"));
    cfg.cluster_cidrs = vec!["10.244.0.0/16".parse().expect("net")];
    cfg.kube = Some(KubeConfig { auth, announce: true });
    let (publisher, mut reader) = common::tables();
    let cp = ControlPlane::spawn(cfg, publisher).expect("starts");
    let s = wait_for(&mut reader, WAIT, "the nodes, listed with the service account", |s| {
        is_own(s, "10.244.1.5") && has(s, "10.244.2.5")
    })
    .await;
    assert_eq!(underlay(&s, "10.244.2.5"), Some("192.0.2.2".parse().expect("ip")));
    // The watch: a node created now arrives.
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": { "name": "late" },
        "spec": { "podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"] },
        "status": { "addresses": [ { "type": "InternalIP", "address": "192.0.2.3" } ] }
    }))
    .expect("node");
    nodes.create(&PostParams::default(), &n).await.expect("create node");
    wait_for(&mut reader, WAIT, "a node created while watching", |s| has(s, "10.244.3.5")).await;
    // The announcement (a patch of its own Node's annotations).
    let deadline = Instant::now() + WAIT;
    loop {
        let n = nodes.get("self-node").await.expect("get");
        if n.metadata.annotations.is_some_and(|a| a.contains_key(BACKEND_DATA)) {
            break;
        }
        assert!(Instant::now() < deadline, "self-node was not announced with the service account's token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp.shutdown();

    // Stopping: an update leaves the DaemonSet (keep the node wired); a deletion does not.
    let own = |auth: KubeAuth| async move {
        ferry_control::deployment::own_daemonset(&auth, "ferry-system", "ferry", WAIT).await
    };
    assert_eq!(own(sa_auth.clone()).await, Deployment::Present);
    let unreachable = KubeAuth::Token {
        server: format!("https://127.0.0.1:{}", common::free_port()),
        token_file: dir.path().join("token"),
        ca_file: None,
        insecure: true,
    };
    assert!(matches!(own(unreachable).await, Deployment::Unknown(_)), "no server: keep the node wired");

    // And nothing else.
    let ns = "ferry-system";
    is_forbidden("list Secrets", Api::<Secret>::namespaced(sa.clone(), ns).list(&ListParams::default()).await).await;
    is_forbidden(
        "list Secrets in kube-system",
        Api::<Secret>::namespaced(sa.clone(), "kube-system").list(&ListParams::default()).await,
    )
    .await;
    is_forbidden("get its own ConfigMap", Api::<ConfigMap>::namespaced(sa.clone(), ns).get("ferry-config").await).await;
    // Pods are listed and watched (NetworkPolicy), never read one by one or changed.
    is_forbidden("get a Pod", Api::<Pod>::namespaced(sa.clone(), "default").get("some-pod").await).await;
    is_forbidden(
        "delete Pods",
        Api::<Pod>::namespaced(sa.clone(), "default")
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await,
    )
    .await;
    is_forbidden("get a Node", Api::<Node>::all(sa.clone()).get("other").await).await;
    is_forbidden("delete a Node", Api::<Node>::all(sa.clone()).delete("other", &DeleteParams::default()).await).await;
    is_forbidden("create a Node", Api::<Node>::all(sa.clone()).create(&PostParams::default(), &n).await).await;
    is_forbidden(
        "get another DaemonSet",
        Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(sa.clone(), "kube-system").get("kube-proxy").await,
    )
    .await;
    is_forbidden(
        "widen its own ClusterRole",
        Api::<ClusterRole>::all(sa.clone())
            .patch(
                "ferry",
                &PatchParams::default(),
                &Patch::Merge(json!({"rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]})),
            )
            .await,
    )
    .await;

    // `kubectl delete -f`: the DaemonSet goes (then the service account and its role): the agent
    // stopping now cleans the node.
    let ds_ar = resource("DaemonSet", "apps/v1").0;
    Api::<DynamicObject>::namespaced_with(admin.clone(), "ferry-system", &ds_ar)
        .delete("ferry", &DeleteParams::default())
        .await
        .expect("delete the DaemonSet");
    let gone = own(sa_auth.clone()).await;
    assert!(matches!(&gone, Deployment::Removed(why) if why.contains("no longer exists")), "{gone:?}");
    // Then the service account and the role binding: the agent's credentials stop working (the
    // server caches a good token for up to 10 s, and RBAC follows its informers: poll, bounded).
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), "ferry-system")
        .delete("ferry", &DeleteParams::default())
        .await
        .expect("delete the service account");
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), "ferry-system")
        .delete("ferry", &DeleteParams::default())
        .await
        .expect("delete the role binding");
    let deadline = Instant::now() + WAIT;
    loop {
        match own(sa_auth.clone()).await {
            Deployment::Removed(why) if why.contains("credentials") => break,
            Deployment::Removed(why) if why.contains("no longer exists") => {}
            other => panic!("after deleting the service account: {other:?}"),
        }
        assert!(Instant::now() < deadline, "the deleted service account's token still works after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
