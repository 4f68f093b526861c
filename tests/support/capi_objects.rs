//! Cluster API objects for controller tests (a Cluster with its LibvirtCluster, Machines with
//! their LibvirtMachines and bootstrap Secrets), each test in its own namespace, and the
//! controllers running in-process on a backend until the handle is dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use capl::api::{LibvirtCluster, LibvirtMachine};
use capl::controller::Settings;
use capl::libvirt::backend::Backend;
use capl::libvirt::uri::UriPolicy;

/// A Cluster API core kind at v1beta2.
pub fn capi(client: &Client, namespace: &str, kind: &str) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("cluster.x-k8s.io", "v1beta2", kind));
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Creates namespace `name`.
pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
}

/// Settings for tests: the test driver allowed, one namespace, short intervals.
pub fn settings(namespace: &str) -> Settings {
    Settings {
        uri_policy: UriPolicy {
            allow_test_driver: true,
        },
        namespace: Some(namespace.to_owned()),
        poll_interval: Duration::from_millis(200),
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(5),
        shutdown_grace: Duration::from_millis(300),
        resync: Duration::from_secs(2),
        ..Settings::default()
    }
}

/// The controllers running in-process; stopped when dropped.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Starts both controllers on `backend`.
    pub fn start<B: Backend>(client: &Client, backend: Arc<B>, settings: Settings) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(capl::controller::run(
            client.clone(),
            backend,
            settings,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the controllers and waits until they returned.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the controllers stopped in time")
                .expect("the controller task")
                .expect("the controllers returned Ok");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A Cluster pointing at LibvirtCluster `name`.
pub fn cluster(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {
            "infrastructureRef": {
                "apiGroup": "infrastructure.cluster.x-k8s.io",
                "kind": "LibvirtCluster",
                "name": name,
            },
        },
    }))
    .unwrap()
}

/// A LibvirtCluster with hosts `a` (control plane) and `b` (workers only), both on the test
/// driver.
pub fn libvirt_cluster(name: &str) -> LibvirtCluster {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtCluster",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": name}},
        "spec": {
            "hosts": [
                {"name": "a", "uri": "test:///default"},
                {"name": "b", "uri": "test:///default", "controlPlane": false},
            ],
            "storagePool": "default",
        },
    }))
    .unwrap()
}

/// A Machine of cluster `cluster` whose bootstrap data is Secret `<name>-bootstrap`.
pub fn machine(cluster: &str, name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "cluster.x-k8s.io/v1beta2",
        "kind": "Machine",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
        "spec": {
            "clusterName": cluster,
            "bootstrap": {"dataSecretName": format!("{name}-bootstrap")},
            "infrastructureRef": {
                "apiGroup": "infrastructure.cluster.x-k8s.io",
                "kind": "LibvirtMachine",
                "name": name,
            },
        },
    }))
    .unwrap()
}

/// Name of the base volume LibvirtMachines use (put it on the fake host first).
pub const BASE_VOLUME: &str = "base.qcow2";

/// A LibvirtMachine of cluster `cluster` booting from [`BASE_VOLUME`] in pool `default`.
pub fn libvirt_machine(cluster: &str, name: &str) -> LibvirtMachine {
    serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1alpha1",
        "kind": "LibvirtMachine",
        "metadata": {"name": name, "labels": {"cluster.x-k8s.io/cluster-name": cluster}},
        "spec": {
            "vcpus": 1,
            "memoryMiB": 512,
            "image": {"volume": {"pool": "default", "name": BASE_VOLUME}},
            "rootVolume": {"sizeGiB": 1},
        },
    }))
    .unwrap()
}

/// The bootstrap Secret of Machine `name` (cloud-config).
pub fn bootstrap_secret(name: &str) -> Secret {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-bootstrap")},
        "stringData": {"value": "#cloud-config\nruncmd: [echo bootstrap-marker]\n", "format": "cloud-config"},
    }))
    .unwrap()
}

/// Polls `probe` every 100 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The condition `kind` of an object's status, as JSON.
pub fn condition(status: &Value, kind: &str) -> Option<Value> {
    status
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
}

/// An object's status as JSON without the conditions' `lastTransitionTime`.
pub fn comparable_status<T: serde::Serialize>(status: &T) -> Value {
    let mut value = serde_json::to_value(status).unwrap();
    if let Some(conditions) = value.get_mut("conditions").and_then(Value::as_array_mut) {
        for c in conditions {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
    }
    value
}

/// Typed APIs of our kinds in `namespace`.
pub fn ours(client: &Client, namespace: &str) -> (Api<LibvirtCluster>, Api<LibvirtMachine>) {
    (
        Api::namespaced(client.clone(), namespace),
        Api::namespaced(client.clone(), namespace),
    )
}
