//! The bed's node: a real kubelet on containerd 2.x in a network namespace of the bed registers a
//! Ready Node, runs Pods from locally imported images, gives them the `kubernetes` Service, lets
//! the apiserver reach them through a Service, and leaves nothing behind when it stops.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use support::TestBed;
use support::node::{self, NODE_NAME, Node};

/// Runs `kubectl` on the bed; panics with stderr and the node's log tails unless it succeeds.
fn kubectl(bed: &TestBed, args: &[&str]) -> String {
    let out = bed.kubectl(args);
    if !out.status.success() {
        panic!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            diagnostics(bed)
        );
    }
    String::from_utf8(out.stdout).expect("utf-8")
}

fn kubectl_stdin(bed: &TestBed, args: &[&str], stdin: &str) -> String {
    let out = bed.kubectl_stdin(args, stdin);
    if !out.status.success() {
        panic!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            diagnostics(bed)
        );
    }
    String::from_utf8(out.stdout).expect("utf-8")
}

fn diagnostics(bed: &TestBed) -> String {
    bed.node()
        .as_ref()
        .map(Node::diagnostics)
        .unwrap_or_default()
}

fn json(bed: &TestBed, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(bed, &args)).expect("kubectl printed JSON")
}

/// Polls `check` every 250 ms for up to `timeout`; panics with `what`, the last observation and
/// the node's log tails.
fn wait_for(bed: &TestBed, what: &str, timeout: Duration, mut check: impl FnMut() -> (bool, String)) {
    let deadline = Instant::now() + timeout;
    loop {
        let (done, seen) = check();
        if done {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last seen: {seen}{}",
                diagnostics(bed)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Writes an OCI archive of the bed's pause program tagged `reference` and imports it.
fn import_pause_as(bed: &TestBed, reference: &str) {
    let archive = bed.test_dir("images").join(format!(
        "{}.tar",
        reference.replace(['/', ':'], "_")
    ));
    let pause = bed.tools.pause.clone().expect("the pause program is built");
    node::write_image_archive(&pause, reference, &archive).expect("writing the image archive");
    let guard = bed.node();
    let node = guard.as_ref().expect("the bed has a node");
    node.import_image(&archive).expect("importing the image");
}

fn pod_phase(bed: &TestBed, name: &str) -> (String, String) {
    let pod = json(bed, &["get", "pod", name]);
    let phase = pod["status"]["phase"].as_str().unwrap_or_default().to_owned();
    (phase, pod["status"].to_string())
}

#[test]
fn node_registers_ready_with_containerd_and_cgroupfs() {
    let bed = support::with_node();
    let node_ip = bed.node().as_ref().expect("node").network.node_ip;
    let object = json(bed, &["get", "node", NODE_NAME]);
    let info = &object["status"]["nodeInfo"];
    assert_eq!(info["kubeletVersion"], bed.tools.versions.kubernetes.as_str());
    let runtime = info["containerRuntimeVersion"].as_str().unwrap_or_default();
    let containerd = bed.tools.versions.containerd.trim_start_matches('v');
    assert_eq!(runtime, format!("containerd://{containerd}"), "{info}");
    let ready = object["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Ready")
        .expect("a Ready condition");
    assert_eq!(ready["status"], "True", "{ready}");
    let addresses = object["status"]["addresses"].to_string();
    assert!(
        addresses.contains(&format!("\"InternalIP\",") ) || addresses.contains(&node_ip.to_string()),
        "{addresses}"
    );
    assert!(addresses.contains(&node_ip.to_string()), "{addresses}");
    // The kubelet's live configuration, read through the apiserver's node proxy (which also
    // proves the apiserver reaches the kubelet in its namespace).
    let configz: Value = serde_json::from_str(&kubectl(
        bed,
        &["get", "--raw", &format!("/api/v1/nodes/{NODE_NAME}/proxy/configz")],
    ))
    .expect("configz is JSON");
    let config = &configz["kubeletconfig"];
    assert_eq!(config["cgroupDriver"], "cgroupfs", "{config}");
    assert_eq!(config["failCgroupV1"], false, "{config}");
    assert_eq!(config["failSwapOn"], false, "{config}");
    let cgroup_root = bed.node().as_ref().expect("node").cgroup_root.clone();
    assert_eq!(config["cgroupRoot"], format!("/{cgroup_root}"), "{config}");
    // The QoS cgroups exist under the node's own root (cgroup v1, cgroupfs).
    assert!(
        Path::new("/sys/fs/cgroup/memory")
            .join(&cgroup_root)
            .join("kubepods")
            .is_dir(),
        "no kubepods cgroup under /{cgroup_root}"
    );
    // The sandbox image is the bed's own, imported, not pulled.
    let images = bed
        .node()
        .as_ref()
        .expect("node")
        .ctr(&["-n", "k8s.io", "images", "ls", "-q"])
        .expect("ctr images ls");
    assert!(images.lines().any(|l| l == node::PAUSE_IMAGE), "{images}");
}
