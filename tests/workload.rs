//! The whole way: a workload cluster made by Cluster API with this provider, offline, on one
//! machine. Run it with `tests/run-workload-e2e.sh` (15-20 minutes of both cores under TCG: not
//! part of README's test command; the `workload-e2e` feature builds it).
//!
//! The bed's management plane runs the real Cluster API core, kubeadm bootstrap and kubeadm
//! control-plane managers and this provider's `manager`; the cluster comes from
//! `deploy/cluster-template.yaml` through `clusterctl generate cluster`
//! ([`support::workload::cluster_manifest`]). The provider downloads the node image
//! (`support::node_image`, `tests/testbed node-image`: Debian 12, cloud-init, containerd,
//! kubeadm and every control-plane image pre-imported) over HTTP from the host, verifies its
//! sha256 and boots a VM on the bed's real libvirtd (TCG unless `CAPL_WORKLOAD_DOMAIN_TYPE=kvm`).
//! The VM's cloud-init runs `kubeadm init` from the KubeadmConfig's bootstrap data; the workload
//! apiserver answers through the cluster's kubeconfig Secret, the Node carries the
//! LibvirtMachine's providerID, Cluster API sets the Machine's nodeRef and providerID, the
//! Cluster turns Available and the Machine Ready ([`support::workload::bring_up`]). Then a
//! worker joins (`CAPL_WORKLOAD_WORKERS`, default 1; 0 leaves it out), `clusterctl describe
//! cluster` shows the tree, and deleting the Cluster removes every VM and every machine volume.
//!
//! On a failed wait the test prints the guests' serial console tails (read through the
//! provider's own libvirt code) and the objects' conditions.

mod support;

use std::time::{Duration, Instant};

use kube::api::Api;

use capl::api::LibvirtMachine;
use support::capi_objects::namespace;
use support::workload::{
    Diagnostics, Stage, Workload, bring_up, cluster_manifest, clusterctl, machine_volumes,
};

const NS: &str = "workload";
const CLUSTER: &str = "w1";

#[tokio::test(flavor = "multi_thread")]
async fn a_kubeadm_control_plane_on_a_provider_made_vm_becomes_the_workload_clusters_node() {
    let started = Instant::now();
    let mut timings: Vec<(String, Duration)> = Vec::new();
    let mut mark = |what: &str| {
        let at = started.elapsed();
        println!("[{:>7.1}s] {what}", at.as_secs_f64());
        timings.push((what.lines().next().unwrap_or(what).to_owned(), at));
    };

    let bed = support::shared();
    let stage =
        Stage::start(bed, NS, env!("CARGO_BIN_EXE_manager")).unwrap_or_else(|e| panic!("{e:#}"));
    mark("node image, management plane, libvirtd, image server and manager up");

    let client = bed.client().await;
    namespace(&client, NS).await;
    let workers: i64 = std::env::var("CAPL_WORKLOAD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let domain_type = std::env::var("CAPL_WORKLOAD_DOMAIN_TYPE").unwrap_or_else(|_| "qemu".into());
    let spec = stage.cluster(NS, CLUSTER, &domain_type);
    let manifest = cluster_manifest(&bed.tools.clusterctl, &spec).expect("the cluster manifest");
    let applied = bed.kubectl_stdin(&["apply", "-n", NS, "-f", "-"], &manifest);
    assert!(
        applied.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    println!("{}", String::from_utf8_lossy(&applied.stdout));
    mark("cluster applied");

    let diagnose = Diagnostics {
        client: client.clone(),
        host: &stage.host,
        namespace: NS.into(),
    };
    let workload = Workload {
        kubectl: bed.tools.kubectl.clone(),
        kubeconfig: bed.test_dir(NS).join("workload.kubeconfig"),
    };
    let up = bring_up(&diagnose, &spec, &workload, workers, &mut mark)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let machines: Api<LibvirtMachine> = Api::namespaced(client.clone(), NS);
    let ours = machines.list(&Default::default()).await.expect("list");
    assert!(
        ours.items
            .iter()
            .any(|m| m.spec.provider_id.as_deref() == Some(up.provider_id.as_str())),
        "the Node {} carries a LibvirtMachine's providerID",
        up.node_name
    );
    let describe = clusterctl(
        &bed.tools.clusterctl,
        &bed.kubeconfig,
        &[
            "describe",
            "cluster",
            CLUSTER,
            "-n",
            NS,
            "--show-conditions=all",
        ],
    )
    .expect("clusterctl describe cluster");
    println!("clusterctl describe cluster:\n{describe}");
    assert!(describe.contains(CLUSTER), "{describe}");
    println!(
        "workload nodes:\n{}",
        workload.kubectl(&["get", "nodes", "-o", "wide"])
    );

    // Delete removes every VM and every machine volume (the verified base image stays, shared by
    // future machines of any cluster in this pool).
    diagnose
        .delete_cluster(CLUSTER)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    mark("Cluster deleted");
    let domains: Vec<String> = support::guest_host::domains(&stage.host)
        .expect("domains")
        .into_iter()
        .filter(|d| d.starts_with(&format!("{NS}_")))
        .collect();
    assert_eq!(domains, Vec::<String>::new(), "no domain left");
    let left = machine_volumes(&stage.host).expect("volumes");
    assert_eq!(left, Vec::<String>::new(), "no machine volume left");

    println!("timings:");
    for (what, at) in &timings {
        println!("  {:>7.1}s  {what}", at.as_secs_f64());
    }
}
