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
fn wait_for(
    bed: &TestBed,
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> (bool, String),
) {
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
    let archive = bed
        .test_dir("images")
        .join(format!("{}.tar", reference.replace(['/', ':'], "_")));
    let pause = bed.tools.pause.clone().expect("the pause program is built");
    node::write_image_archive(&pause, reference, &archive).expect("writing the image archive");
    let guard = bed.node();
    let node = guard.as_ref().expect("the bed has a node");
    node.import_image(&archive).expect("importing the image");
}

#[test]
fn node_registers_ready_with_containerd_and_cgroupfs() {
    let bed = support::with_node();
    let node_ip = bed.node().as_ref().expect("node").network.node_ip;
    let object = json(bed, &["get", "node", NODE_NAME]);
    let info = &object["status"]["nodeInfo"];
    assert_eq!(
        info["kubeletVersion"],
        bed.tools.versions.kubernetes.as_str()
    );
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
    let internal_ips: Vec<&str> = object["status"]["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter(|a| a["type"] == "InternalIP")
        .filter_map(|a| a["address"].as_str())
        .collect();
    assert_eq!(internal_ips, [node_ip.to_string()]);
    // The kubelet's live configuration, read through the apiserver's node proxy (which also
    // proves the apiserver reaches the kubelet in its namespace).
    let configz: Value = serde_json::from_str(&kubectl(
        bed,
        &[
            "get",
            "--raw",
            &format!("/api/v1/nodes/{NODE_NAME}/proxy/configz"),
        ],
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

/// Waits until the namespace's `default` ServiceAccount exists (the controller manager creates
/// it; Pods are rejected until then).
fn wait_default_service_account(bed: &TestBed, namespace: &str) {
    wait_for(
        bed,
        "the default ServiceAccount",
        Duration::from_secs(60),
        || {
            let out = bed.kubectl(&["get", "serviceaccount", "default", "-n", namespace]);
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        },
    );
}

#[test]
fn pods_reach_the_apiserver_through_the_service_and_the_apiserver_reaches_pods() {
    let bed = support::with_node();
    let image = "capl.local/node-test/probe:v1";
    import_pause_as(bed, image);
    let netns = bed.node().as_ref().expect("node").network.netns.clone();
    // The node's namespace has no way out: no default route.
    let routes = std::process::Command::new("ip")
        .args(["-n", &netns, "route", "show", "default"])
        .output()
        .expect("ip route");
    assert!(routes.status.success());
    assert!(
        routes.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&routes.stdout)
    );

    kubectl(bed, &["create", "namespace", "node-test"]);
    wait_default_service_account(bed, "node-test");
    kubectl_stdin(
        bed,
        &["apply", "-n", "node-test", "-f", "-"],
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: probe
spec:
  restartPolicy: Never
  containers:
  - name: probe
    image: {image}
    imagePullPolicy: Never
    command: ["/pause", "probe", "90"]
---
apiVersion: v1
kind: Pod
metadata:
  name: echo
  labels:
    app: echo
spec:
  containers:
  - name: echo
    image: {image}
    imagePullPolicy: Never
    command: ["/pause", "serve", "8080"]
    ports:
    - containerPort: 8080
    readinessProbe:
      httpGet:
        port: 8080
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector:
    app: echo
  ports:
  - port: 80
    targetPort: 8080
"#
        ),
    );

    // In-cluster access: the kubelet's KUBERNETES_SERVICE_* variables (the `kubernetes`
    // Service's ClusterIP, through kube-proxy's rules), the mounted CA and the Pod's token.
    wait_for(
        bed,
        "the probe Pod to succeed",
        Duration::from_secs(120),
        || {
            let out = bed.kubectl(&["get", "pod", "probe", "-n", "node-test", "-o", "json"]);
            let pod: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let phase = pod["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert_ne!(
                phase,
                "Failed",
                "the probe failed: {}{}",
                kubectl(bed, &["logs", "probe", "-n", "node-test"]),
                diagnostics(bed)
            );
            (phase == "Succeeded", pod["status"].to_string())
        },
    );
    let logs = kubectl(bed, &["logs", "probe", "-n", "node-test"]);
    let service_ip = support::apiserver::KUBERNETES_SERVICE_IP;
    assert!(
        logs.contains(&format!("https://{service_ip}:443/version answered")),
        "{logs}"
    );
    assert!(logs.contains(&bed.tools.versions.kubernetes), "{logs}");

    // The other way: the apiserver's service proxy reaches the Pod (endpoint IP on the node's
    // bridge, through the host route); the readiness probe proves the kubelet reaches it too.
    wait_for(
        bed,
        "the echo Pod to be Ready",
        Duration::from_secs(90),
        || {
            let out = bed.kubectl(&[
                "get",
                "pod",
                "echo",
                "-n",
                "node-test",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ]);
            (
                out.stdout == b"True",
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        },
    );
    let mut answer = String::new();
    wait_for(
        bed,
        "the apiserver to proxy to the echo Service",
        Duration::from_secs(60),
        || {
            let out = bed.kubectl(&[
                "get",
                "--raw",
                "/api/v1/namespaces/node-test/services/echo:80/proxy/",
            ]);
            answer = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), answer.clone())
        },
    );
    assert_eq!(answer.trim(), "capl-pause echo");
    kubectl(bed, &["delete", "namespace", "node-test", "--wait=false"]);
}

#[test]
fn a_stopped_node_leaves_no_namespace_veth_route_mount_cgroup_or_process() {
    let started = Instant::now();
    let bed = TestBed::start_with_node().expect("a second bed with a node");
    eprintln!(
        "bed with node started in {:?} (node: {:?})",
        started.elapsed(),
        bed.node().as_ref().expect("node").timings
    );
    // A running Pod: sandbox, container, shims, the Pod's network namespace, volume mounts.
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !bed
            .kubectl(&["get", "serviceaccount", "default"])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "no default ServiceAccount");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    kubectl_stdin(
        &bed,
        &["apply", "-f", "-"],
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: sleeper
spec:
  terminationGracePeriodSeconds: 30
  containers:
  - name: sleeper
    image: {}
    imagePullPolicy: Never
"#,
            node::PAUSE_IMAGE
        ),
    );
    wait_for(
        &bed,
        "the sleeper Pod to run",
        Duration::from_secs(90),
        || {
            let out = bed.kubectl(&["get", "pod", "sleeper", "-o", "jsonpath={.status.phase}"]);
            (
                out.stdout == b"Running",
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        },
    );
    let (handle, pod_cidr) = {
        let guard = bed.node();
        let node = guard.as_ref().expect("node");
        (node.handle(), node.network.pod_cidr.clone())
    };
    let mut pids: Vec<u32> = node::namespace_pids(&handle.netns);
    pids.extend(node::cgroup_pids(&handle.cgroup_root));
    pids.extend(handle.processes.iter().map(|(_, pid)| *pid));
    assert!(
        pids.len() >= 6,
        "containerd, kubelet, kube-proxy, 2 shims? {pids:?}"
    );
    assert!(!node::mounts_under(&handle.dir).is_empty());

    let stopping = Instant::now();
    drop(bed.node().take());
    eprintln!("node torn down in {:?}", stopping.elapsed());
    assert_node_gone(&handle, &pids);
    let routes = std::process::Command::new("ip")
        .args(["-4", "route", "show"])
        .output()
        .expect("ip route");
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(!routes.contains(&pod_cidr), "{routes}");
    if let Ok(links) = std::fs::read_dir("/var/log/containers") {
        for link in links.flatten() {
            let target = std::fs::read_link(link.path()).unwrap_or_default();
            assert!(
                !target.starts_with(&handle.dir),
                "{}",
                link.path().display()
            );
        }
    }
    bed.shutdown();
}

/// Child of [`a_test_process_that_dies_leaves_nothing_behind`] (ignored in normal runs): starts
/// the shared bed with a node, runs a Pod, writes the node's handle to
/// `$CAPL_NODE_CHILD_HANDLE`, then dies as `$CAPL_NODE_CHILD` says (`panic` or `kill`).
#[test]
#[ignore = "run by a_test_process_that_dies_leaves_nothing_behind"]
fn child_with_a_node_that_dies() {
    let (Ok(mode), Ok(out)) = (
        std::env::var("CAPL_NODE_CHILD"),
        std::env::var("CAPL_NODE_CHILD_HANDLE"),
    ) else {
        return;
    };
    let bed = support::with_node();
    wait_default_service_account(bed, "default");
    kubectl_stdin(
        bed,
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: doomed\nspec:\n  containers:\n  - name: c\n    image: {}\n    imagePullPolicy: Never\n",
            node::PAUSE_IMAGE
        ),
    );
    wait_for(
        bed,
        "the doomed Pod to run",
        Duration::from_secs(90),
        || {
            let out = bed.kubectl(&["get", "pod", "doomed", "-o", "jsonpath={.status.phase}"]);
            (
                out.stdout == b"Running",
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        },
    );
    let handle = bed.node().as_ref().expect("node").handle();
    std::fs::write(&out, serde_json::to_vec(&handle).expect("json")).expect("writing the handle");
    std::fs::write(
        format!("{out}.pids"),
        serde_json::to_vec(&node_pids(&handle)).expect("json"),
    )
    .expect("writing the pids");
    match mode.as_str() {
        "kill" => {
            // SAFETY: killing this very process, as a crash or an OOM kill would.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        _ => panic!("a test fails with the node up"),
    }
}

/// Everything of the node in `handle` is gone (see the module's teardown contract).
fn assert_node_gone(handle: &node::NodeHandle, pids: &[u32]) {
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(&handle.netns), "{netns}");
    let link = std::process::Command::new("ip")
        .args(["link", "show", &handle.host_if])
        .output()
        .expect("ip link");
    assert!(!link.status.success(), "{} is still there", handle.host_if);
    assert_eq!(
        node::mounts_under(&handle.dir),
        Vec::<std::path::PathBuf>::new()
    );
    let alive: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|pid| support::process::pid_alive(*pid as libc::pid_t))
        .collect();
    assert!(alive.is_empty(), "still running: {alive:?}");
    assert!(node::cgroup_pids(&handle.cgroup_root).is_empty());
    for hierarchy in ["memory", "cpu", "pids", "cpuset", "freezer", "systemd"] {
        let cgroup = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(&handle.cgroup_root);
        assert!(!cgroup.exists(), "{} is still there", cgroup.display());
    }
    assert!(
        !handle.dir.exists(),
        "{} is still there",
        handle.dir.display()
    );
}

/// Pids of the shims (and anything else) in the node's namespace and cgroups right now.
fn node_pids(handle: &node::NodeHandle) -> Vec<u32> {
    let mut pids = node::namespace_pids(&handle.netns);
    pids.extend(node::cgroup_pids(&handle.cgroup_root));
    pids.extend(handle.processes.iter().map(|(_, pid)| *pid));
    pids
}

#[test]
fn a_test_process_that_dies_leaves_nothing_behind() {
    let exe = std::env::current_exe().expect("the test binary");
    let dir = tempfile::tempdir().expect("a temp dir");
    for mode in ["panic", "kill"] {
        let out = dir.path().join(format!("{mode}.json"));
        let child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_with_a_node_that_dies",
                "--ignored",
                "--nocapture",
            ])
            .env("CAPL_NODE_CHILD", mode)
            .env("CAPL_NODE_CHILD_HANDLE", &out)
            .output()
            .expect("running the child");
        assert!(!child.status.success(), "{mode}: the child did not die");
        let handle: node::NodeHandle =
            serde_json::from_slice(&std::fs::read(&out).unwrap_or_else(|e| {
                panic!(
                    "{mode}: no handle ({e}); child said: {}",
                    String::from_utf8_lossy(&child.stderr)
                )
            }))
            .expect("the handle");
        let pids: Vec<u32> = serde_json::from_slice(
            &std::fs::read(format!("{}.pids", out.display())).expect("the pids"),
        )
        .expect("pids");
        assert!(pids.len() >= 6, "{mode}: {pids:?}");
        match mode {
            // A failed test: the bed's exit hook tears the node down.
            "panic" => assert_node_gone(&handle, &pids),
            // SIGKILL: containerd, the kubelet and kube-proxy die with the process (parent-death
            // signal), but the shims, the Pod's processes, mounts, namespace and cgroups stay
            // until the next bed sweeps them.
            _ => {
                assert!(
                    !node::cgroup_pids(&handle.cgroup_root).is_empty(),
                    "the Pod's processes should survive a SIGKILLed test process"
                );
                node::sweep_stale();
                assert_node_gone(&handle, &pids);
            }
        }
    }
}

#[test]
fn a_deployment_with_a_restricted_pod_rolls_out_on_the_node() {
    let bed = support::with_node();
    // The way a chart's Deployment runs: the controller manager makes the ReplicaSet and Pod,
    // the scheduler binds it to the node, and the Pod passes Pod Security "restricted"
    // (non-root, read-only root, no capabilities, seccomp RuntimeDefault under runc).
    kubectl_stdin(
        bed,
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: node-restricted\n  labels:\n    pod-security.kubernetes.io/enforce: restricted\n",
    );
    wait_default_service_account(bed, "node-restricted");
    kubectl_stdin(
        bed,
        &["apply", "-n", "node-restricted", "-f", "-"],
        &format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
      - name: web
        image: {}
        imagePullPolicy: IfNotPresent
        command: ["/pause", "serve", "8080"]
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: ["ALL"]
        readinessProbe:
          httpGet:
            port: 8080
          periodSeconds: 1
"#,
            node::PAUSE_IMAGE
        ),
    );
    let out = bed.kubectl(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "node-restricted",
        "--timeout=120s",
    ]);
    assert!(
        out.status.success(),
        "rollout: {}{}{}",
        String::from_utf8_lossy(&out.stderr),
        kubectl(
            bed,
            &["get", "pods,events", "-n", "node-restricted", "-o", "wide"]
        ),
        diagnostics(bed)
    );
    let pods = json(
        bed,
        &["get", "pods", "-n", "node-restricted", "-l", "app=web"],
    );
    let pod = &pods["items"][0];
    assert_eq!(pod["spec"]["nodeName"], NODE_NAME);
    assert_eq!(pod["status"]["phase"], "Running");
    kubectl(
        bed,
        &["delete", "namespace", "node-restricted", "--wait=false"],
    );
}

/// The terminal's Ctrl-C goes to its foreground process group; the bed's children must not be in
/// it, or `tests/testbed run --workload` loses its apiserver before it can delete its Cluster.
#[test]
fn bed_children_have_a_process_group_of_their_own() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60");
    let mut child = support::process::Proc::spawn(
        "sleep",
        cmd,
        &dir.path().join("sleep.log"),
        support::process::Lifetime::TestProcess,
    )
    .expect("spawning sleep");
    let pid = child.pid() as libc::pid_t;
    // SAFETY: getpgid and getpgrp only read process attributes.
    let (group, ours) = unsafe { (libc::getpgid(pid), libc::getpgrp()) };
    child.stop(Duration::from_secs(1));
    assert_eq!(group, pid, "the child leads its own process group");
    assert_ne!(group, ours, "not the test process's group");
}

/// Ports the bed hands out are distinct and below the ephemeral range, where no outgoing
/// connection can take one before its server binds it.
#[test]
fn free_ports_are_distinct_and_below_the_ephemeral_range() {
    let ports: Vec<u16> = (0..64)
        .map(|_| support::apiserver::free_port().expect("a port"))
        .collect();
    let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    assert!(
        ports.iter().all(|p| (20_000..32_000).contains(p)),
        "{ports:?}"
    );
}
