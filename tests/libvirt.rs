//! The libvirt backend: domain XML (golden), idempotent create, crash safety and leak-free delete
//! on the in-process test driver and on the bed's real libvirtd + QEMU.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use capl::api::{CpuMode, DomainType, Firmware, NicModel};
use capl::libvirt::Host;
use capl::libvirt::backend::{Deletion, HostRef};
use capl::libvirt::identity::MachineIdentity;
use capl::libvirt::xml::{
    DiskPlan, DomainPlan, Hypervisor, InterfacePlan, InterfaceSource, VolumePlan,
};
use support::libvirtd::{bed_pool, qcow2};

/// The identity of `default/worker-1` whose persisted UUID was derived from `uid`.
fn identity(uid: &str) -> MachineIdentity {
    MachineIdentity::new("default", "worker-1", MachineIdentity::uuid_for_uid(uid))
}

fn plan(identity: MachineIdentity, hypervisor: Hypervisor, pool: &str) -> DomainPlan {
    DomainPlan {
        cluster: "prod".into(),
        hypervisor,
        vcpus: 1,
        memory_mib: 64,
        cpu_mode: CpuMode::HostPassthrough,
        firmware: Firmware::Bios,
        disks: vec![DiskPlan {
            pool: pool.into(),
            volume: identity.volume_name("root", "qcow2"),
            target: "vda".into(),
            cdrom: false,
        }],
        interfaces: vec![],
        serial_log: None,
        fw_cfg: vec![],
        direct_boot: None,
        identity,
    }
}

fn root_volume(identity: &MachineIdentity, backing: Option<(String, String)>) -> VolumePlan {
    VolumePlan {
        name: identity.volume_name("root", "qcow2"),
        capacity_gib: 1,
        format: "qcow2".into(),
        backing,
    }
}

#[test]
fn domain_xml_matches_the_golden_file() {
    let id = identity("0b3c7a52-7c1f-4f5e-9c55-2f5d7f0a1b2c");
    let mut plan = plan(id.clone(), Hypervisor::Kvm, "default");
    plan.vcpus = 4;
    plan.memory_mib = 8192;
    plan.firmware = Firmware::Uefi;
    plan.serial_log = Some("/var/log/libvirt/qemu/default_worker-1-serial.log".into());
    plan.disks.push(DiskPlan {
        pool: "default".into(),
        volume: id.volume_name("seed", "iso"),
        target: "sda".into(),
        cdrom: true,
    });
    plan.interfaces = vec![
        InterfacePlan {
            source: InterfaceSource::Network("k8s".into()),
            mac: id.mac("eth0"),
            model: NicModel::Virtio,
        },
        InterfacePlan {
            source: InterfaceSource::Bridge("br0".into()),
            mac: id.mac("eth1"),
            model: NicModel::E1000e,
        },
    ];
    let xml = plan.to_xml().expect("XML");
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/domain.xml");
    if std::env::var_os("CAPL_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &xml).expect("writing the golden file");
    }
    let expected = std::fs::read_to_string(&golden)
        .expect("tests/golden/domain.xml (CAPL_UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        xml, expected,
        "domain XML changed; review and rerun with CAPL_UPDATE_GOLDEN=1"
    );
}

#[test]
fn xml_escapes_whatever_it_is_given() {
    let mut plan = plan(
        MachineIdentity::new("ns", "m", MachineIdentity::uuid_for_uid("uid")),
        Hypervisor::Test,
        "default-pool",
    );
    plan.cluster = "a'b\"c<d>&e".into();
    plan.interfaces = vec![InterfacePlan {
        source: InterfaceSource::Network("net'/><evil/>".into()),
        mac: plan.identity.mac("eth0"),
        model: NicModel::Virtio,
    }];
    let xml = plan.to_xml().expect("XML");
    assert!(!xml.contains("<evil/>"), "{xml}");
    assert!(
        xml.contains("<capl:cluster>a'b\"c&lt;d&gt;&amp;e</capl:cluster>"),
        "{xml}"
    );
    assert!(xml.contains("network=\"net'/&gt;&lt;evil/&gt;\""), "{xml}");
    // libvirt reads it back as the same, inert value.
    let host = Host::open(&support::host_uri("test:///default")).expect("test driver");
    let domain = host
        .connection()
        .define_domain_xml(&xml)
        .expect("libvirt accepts the escaped XML");
    let echoed = domain.xml_desc(0).expect("xml");
    assert!(
        echoed.contains("net&apos;/&gt;&lt;evil/&gt;") && !echoed.contains("<evil"),
        "{echoed}"
    );
}

#[test]
fn test_driver_create_is_idempotent_and_delete_leaves_nothing() {
    let host = Host::open(&support::host_uri("test:///default")).expect("test driver");
    let id = identity("uid-idempotent");
    host.ensure_volume(
        "default-pool",
        &id.volume_name("root", "qcow2"),
        &root_volume(&id, None).to_xml().expect("xml"),
    )
    .expect("root volume");
    let plan = plan(id.clone(), Hypervisor::Test, "default-pool");

    let first = host.ensure_domain(&plan).expect("first create");
    let second = host.ensure_domain(&plan).expect("second create");
    assert_eq!(first, second);
    assert_eq!(first.state, "running");
    assert_eq!(first.uuid, id.domain_uuid().to_string());
    let named: Vec<_> = host
        .connection()
        .list_all_domains(0)
        .expect("list")
        .into_iter()
        .filter(|d| d.name().is_ok_and(|n| n == id.domain_name()))
        .collect();
    assert_eq!(named.len(), 1, "exactly one domain");

    let inventory = host.inventory(&id).expect("inventory");
    assert_eq!(inventory.domain.as_deref(), Some(id.domain_name().as_str()));
    assert_eq!(inventory.volumes.len(), 1);

    assert_eq!(
        host.delete_machine(&id, Duration::ZERO, None),
        Ok(Deletion::Gone)
    );
    assert!(
        host.inventory(&id).expect("inventory").is_empty(),
        "nothing left"
    );
    assert_eq!(
        host.delete_machine(&id, Duration::ZERO, None),
        Ok(Deletion::Gone),
        "deleting again is a no-op"
    );
}

#[test]
fn test_driver_recovers_from_a_crash_between_define_and_start() {
    let host = Host::open(&support::host_uri("test:///default")).expect("test driver");
    let id = identity("uid-crash");
    let plan = plan(id.clone(), Hypervisor::Test, "default-pool");
    // A previous attempt defined the domain and died before starting it.
    host.connection()
        .define_domain_xml(&plan.to_xml().expect("xml"))
        .expect("define");
    let status = host.ensure_domain(&plan).expect("re-run");
    assert_eq!(status.state, "running");
    let count = domains_with_uuid(&host, &id);
    assert_eq!(count, 1);
    assert_eq!(
        host.delete_machine(&id, Duration::ZERO, None),
        Ok(Deletion::Gone)
    );
}

#[test]
fn real_qemu_runs_a_machine_on_an_overlay_and_delete_leaves_nothing() {
    let (_, host, pool_dir) = bed_pool("capl-test");
    let pool = host
        .connection()
        .lookup_storage_pool_by_name("capl-test")
        .expect("pool");
    // The base image: made here, never touched by the machine.
    let base = pool_dir.join("base.qcow2");
    qcow2(&base, "256M");
    pool.refresh(0).expect("refresh");

    let id = identity("uid-real-qemu");
    let overlay = root_volume(&id, Some((base.display().to_string(), "qcow2".into())));
    host.ensure_volume("capl-test", &overlay.name, &overlay.to_xml().expect("xml"))
        .expect("overlay");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(pool_dir.join(&overlay.name))
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(
        info["backing-filename"],
        base.display().to_string(),
        "the root disk is an overlay"
    );

    let status = host
        .ensure_domain(&plan(id.clone(), Hypervisor::Qemu, "capl-test"))
        .expect("start");
    assert_eq!(status.state, "running");
    assert_eq!(
        host.ensure_domain(&plan(id.clone(), Hypervisor::Qemu, "capl-test"))
            .expect("again")
            .uuid,
        status.uuid
    );

    // Graceful delete: the guest is asked once and the call returns at once; nothing sleeps in
    // a libvirt call. After the deadline (this guest has no OS to honour ACPI) it is stopped.
    let asked = std::time::Instant::now();
    let Ok(Deletion::ShuttingDown { deadline }) =
        host.delete_machine(&id, Duration::from_secs(30), None)
    else {
        panic!("a running guest is asked to shut down first")
    };
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        host.delete_machine(&id, Duration::from_secs(30), Some(deadline)),
        Ok(Deletion::ShuttingDown { deadline }),
        "before the deadline: still waiting, no second request"
    );
    assert_eq!(
        host.delete_machine(
            &id,
            Duration::from_secs(30),
            Some(std::time::Instant::now())
        ),
        Ok(Deletion::Gone),
        "after the deadline: stopped and removed"
    );
    assert_eq!(domains_with_uuid(&host, &id), 0);
    assert!(host.inventory(&id).expect("inventory").is_empty());
    assert!(base.exists(), "the shared base image stays");
    let bed = support::shared();
    let libvirtd = bed.libvirtd();
    let qemu_left = libvirtd
        .as_ref()
        .expect("libvirtd")
        .pids()
        .iter()
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains(&id.domain_name()))
        });
    assert!(!qemu_left, "no QEMU process left");
}

#[test]
fn the_nocloud_seed_is_an_iso_labelled_cidata_with_the_files() {
    use capl::cloudinit::{MetaData, Seed};
    let seed = Seed {
        user_data: b"#cloud-config\nruncmd:\n  - echo capl-marker\n"
            .to_vec()
            .into(),
        meta_data: MetaData {
            instance_id: "59564898-aad4-581d-adec-745ad193770f".into(),
            local_hostname: "worker-1".into(),
            provider_id: "libvirt://host-a/59564898-aad4-581d-adec-745ad193770f".into(),
        },
        network_config: None,
    };
    let iso = seed.to_iso().expect("ISO");
    assert_eq!(iso.len() % 2048, 0);
    let path = std::env::temp_dir().join(format!("capl-seed-{}.iso", std::process::id()));
    std::fs::write(&path, &iso).expect("write");
    let probe = |tag: &str| {
        let out = std::process::Command::new("blkid")
            .args(["-p", "-o", "value", "-s", tag])
            .arg(&path)
            .output()
            .expect("blkid");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(probe("TYPE"), "iso9660");
    assert_eq!(probe("LABEL"), "cidata");
    // Joliet/Rock Ridge keep the long lowercase names cloud-init opens.
    let bytes = String::from_utf8_lossy(&iso).into_owned();
    assert!(bytes.contains("instance-id: 59564898-aad4-581d-adec-745ad193770f"));
    assert!(bytes.contains("echo capl-marker"));
    let names_utf16: Vec<u8> = "user-data"
        .encode_utf16()
        .flat_map(|u| u.to_be_bytes())
        .collect();
    assert!(
        iso.windows(names_utf16.len()).any(|w| w == names_utf16),
        "Joliet name user-data"
    );
    std::fs::remove_file(&path).ok();
}

/// A loopback HTTP server that serves `body` at any path and counts requests.
async fn serve_image(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let body = Arc::new(body);
    let app = axum::Router::new().fallback(move || {
        let (body, counter) = (body.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            body.as_ref().clone()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/images/base.qcow2"), hits)
}

/// A validated host reference for `uri`.
fn host_ref(uri: &capl::libvirt::uri::HostUri, domain_type: DomainType) -> HostRef {
    HostRef {
        name: "bed".into(),
        uri: uri.clone(),
        domain_type,
    }
}

/// Deletes the machine the way a controller does: call again until `Gone`, never sleeping inside
/// a libvirt call.
fn delete_until_gone(host: &Host, id: &MachineIdentity, grace: Duration) {
    let started = std::time::Instant::now();
    let mut deadline = None;
    loop {
        match host.delete_machine(id, grace, deadline) {
            Ok(Deletion::Gone) => return,
            Ok(Deletion::ShuttingDown { deadline: d }) => {
                assert!(
                    started.elapsed() < grace + Duration::from_secs(30),
                    "delete never finished"
                );
                deadline = Some(d);
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("delete: {e}"),
        }
    }
}

/// How many domains on the host carry the machine's UUID (exactly one after any create).
fn domains_with_uuid(host: &Host, id: &MachineIdentity) -> usize {
    let uuid = id.domain_uuid().to_string();
    host.connection()
        .list_all_domains(0)
        .expect("listing domains")
        .iter()
        .filter(|d| d.uuid_string().is_ok_and(|u| u == uuid))
        .count()
}

/// A base image made next to `pool_dir` and served over loopback HTTP:
/// (URL, sha256, bytes, request counter).
async fn served_base(pool_dir: &Path, size: &str) -> (String, String, Vec<u8>, Arc<AtomicUsize>) {
    use sha2::Digest;
    let source = pool_dir.with_extension("source.qcow2");
    qcow2(&source, size);
    let bytes = std::fs::read(&source).expect("image bytes");
    let digest: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (url, hits) = serve_image(bytes.clone()).await;
    (url, digest, bytes, hits)
}

/// The tiny Debian guest from tests/guest/build.sh, booted directly.
fn test_guest() -> capl::libvirt::xml::DirectBoot {
    let build = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build.sh"),
    )
    .output()
    .expect("tests/guest/build.sh");
    assert!(
        build.status.success(),
        "building the test guest failed: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&build.stdout).trim());
    capl::libvirt::xml::DirectBoot {
        kernel: dir.join("vmlinuz").display().to_string(),
        initrd: dir.join("initrd.img").display().to_string(),
        cmdline: "console=ttyS0 panic=-1".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_images_are_fetched_once_verified_and_shared() {
    use capl::api::{ChecksumType, ImageFormat};
    use capl::libvirt::hosts::Hosts;
    use capl::libvirt::image::{Error as ImageError, ImageCache, ImageRequest, ImageSettings};
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (uri, host, pool_dir) = bed_pool("capl-images");
    let (url, digest, bytes, hits) = served_base(&pool_dir, "1G").await;

    let hosts = std::sync::Arc::new(Hosts::new(4));
    let settings = ImageSettings {
        loopback_for_tests: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        ..Default::default()
    };
    let cache = ImageCache::with_settings(hosts.clone(), settings).expect("image cache");
    let request = ImageRequest {
        url: url.clone(),
        algorithm: ChecksumType::Sha256,
        digest: digest.clone(),
        format: ImageFormat::Qcow2,
    };
    let (first, second) = tokio::join!(
        cache.ensure(&uri, "capl-images", &request),
        cache.ensure(&uri, "capl-images", &request)
    );
    let path = first.expect("first fetch");
    assert_eq!(second.expect("concurrent fetch"), path);
    assert_eq!(
        cache
            .ensure(&uri, "capl-images", &request)
            .await
            .expect("cached"),
        path
    );
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "downloaded once"
    );
    assert_eq!(
        std::fs::read(&path).expect("uploaded"),
        bytes,
        "the volume holds the image byte for byte"
    );

    // A wrong checksum is refused and leaves nothing behind.
    let wrong = ImageRequest {
        digest: "0".repeat(64),
        ..request.clone()
    };
    match cache.ensure(&uri, "capl-images", &wrong).await {
        Err(ImageError::Checksum { actual, .. }) => assert_eq!(actual, digest),
        other => panic!("expected a checksum error, got {other:?}"),
    }
    let pool = host
        .connection()
        .lookup_storage_pool_by_name("capl-images")
        .expect("pool");
    assert!(
        !pool
            .list_volumes()
            .expect("volumes")
            .iter()
            .any(|name| name.starts_with(&wrong.volume_name())),
        "the bad download was never uploaded"
    );

    // The in-process test driver cannot hold volume content, and says so.
    let err = cache
        .ensure(
            &support::host_uri("test:///default"),
            "default-pool",
            &request,
        )
        .await
        .expect_err("test driver");
    assert!(
        err.to_string()
            .contains("test driver cannot store volume content"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_any_step_converges_to_one_machine_and_delete_leaves_nothing() {
    use capl::api::{ChecksumType, ImageFormat};
    use capl::cloudinit::{MetaData, Seed};
    use capl::libvirt::backend::{BaseImage, Bootstrap, DataDisk, MachineRequest};
    use capl::libvirt::error::Step;
    use capl::libvirt::hosts::Hosts;
    use capl::libvirt::image::ImageRequest;
    use capl::libvirt::provision::{provision, run_step};
    let _ = rustls::crypto::ring::default_provider().install_default();

    let (uri, host, pool_dir) = bed_pool("capl-provision");
    let (url, digest, _, _) = served_base(&pool_dir, "512M").await;

    let hosts = std::sync::Arc::new(Hosts::new(4));
    let images = loopback_images(&hosts);
    for crash_after in 0..=Step::CREATE.len() {
        let id = identity(&format!("uid-crash-{crash_after}"));
        let request = MachineRequest {
            cluster: "prod".into(),
            host: host_ref(&uri, DomainType::Qemu),
            vcpus: 1,
            memory_mib: 64,
            cpu_mode: CpuMode::HostPassthrough,
            firmware: Firmware::Bios,
            pool: "capl-provision".into(),
            image: BaseImage::Url(ImageRequest {
                url: url.clone(),
                algorithm: ChecksumType::Sha256,
                digest: digest.clone(),
                format: ImageFormat::Qcow2,
            }),
            root_gib: 2,
            data_disks: vec![DataDisk {
                name: "etcd".into(),
                size_gib: 1,
                pool: "capl-provision".into(),
            }],
            interfaces: vec![],
            bootstrap: Some(Bootstrap::CloudConfig(Seed {
                user_data: b"#cloud-config\n".to_vec().into(),
                meta_data: MetaData {
                    instance_id: id.domain_uuid().to_string(),
                    local_hostname: "worker-1".into(),
                    provider_id: format!("libvirt://bed/{}", id.domain_uuid()),
                },
                network_config: None,
            })),
            direct_boot: None,
            identity: id.clone(),
        };
        // An earlier attempt got this far and crashed.
        for step in &Step::CREATE[..crash_after] {
            run_step(&hosts, &images, &request, *step, None)
                .await
                .unwrap_or_else(|e| panic!("step {step:?}: {e}"));
        }
        let state = provision(&hosts, &images, &request)
            .await
            .unwrap_or_else(|e| panic!("after a crash at {crash_after}: {e}"));
        assert_eq!(
            state.domain.state, "running",
            "crash after {crash_after} steps"
        );
        let same_uuid = domains_with_uuid(&host, &id);
        assert_eq!(
            same_uuid, 1,
            "exactly one VM after a crash at step {crash_after}"
        );
        let inventory = host.inventory(&id).expect("inventory");
        assert_eq!(
            inventory.volumes.len(),
            4,
            "root, data, seed and console log: {inventory:?}"
        );

        delete_until_gone(&host, &id, Duration::from_secs(1));
        assert!(
            host.inventory(&id).expect("inventory").is_empty(),
            "nothing leaked"
        );
    }
}

/// The whole path on real QEMU: a tiny Debian guest (kernel + busybox initramfs, built from Debian
/// packages by tests/guest/build.sh) boots on an overlay of a downloaded base image, reads our
/// NoCloud seed, prints the user-data marker on its serial console (read back through libvirt),
/// and takes a DHCP lease on an isolated network inside the bed's namespace, which the backend
/// reports as its address. Delete leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_boots_reads_its_seed_and_gets_an_address() {
    use capl::api::{ChecksumType, ImageFormat};
    use capl::cloudinit::{MetaData, Seed};
    use capl::libvirt::backend::{BaseImage, Bootstrap, MachineRequest};
    use capl::libvirt::hosts::Hosts;
    use capl::libvirt::image::ImageRequest;
    use capl::libvirt::machine::AddressSource;
    use capl::libvirt::provision::provision;
    let _ = rustls::crypto::ring::default_provider().install_default();

    let direct_boot = test_guest();
    let (uri, host, pool_dir) = bed_pool("capl-guest");
    // An isolated network (no <forward>): its bridge and dnsmasq exist only in the bed's namespace.
    let network = host.connection().define_network_xml(
        "<network><name>capl-guestnet</name><bridge name='caplgn0'/>\
         <ip address='10.213.7.1' netmask='255.255.255.0'><dhcp><range start='10.213.7.10' end='10.213.7.50'/></dhcp></ip></network>",
    ).expect("network");
    network.create().expect("start the isolated network");

    let (url, digest, _, _) = served_base(&pool_dir, "1G").await;

    let id = identity("uid-real-guest");
    let marker = format!("capl-marker-{}", id.domain_uuid());
    let request = MachineRequest {
        cluster: "prod".into(),
        host: host_ref(&uri, DomainType::Qemu),
        vcpus: 1,
        memory_mib: 256,
        cpu_mode: CpuMode::HostPassthrough,
        firmware: Firmware::Bios,
        pool: "capl-guest".into(),
        image: BaseImage::Url(ImageRequest {
            url,
            algorithm: ChecksumType::Sha256,
            digest,
            format: ImageFormat::Qcow2,
        }),
        root_gib: 2,
        data_disks: vec![],
        interfaces: vec![InterfacePlan {
            source: InterfaceSource::Network("capl-guestnet".into()),
            mac: id.mac("eth0"),
            model: NicModel::Virtio,
        }],
        bootstrap: Some(Bootstrap::CloudConfig(Seed {
            user_data: format!("#cloud-config\nruncmd:\n  - echo {marker}\n")
                .into_bytes()
                .into(),
            meta_data: MetaData {
                instance_id: id.domain_uuid().to_string(),
                local_hostname: "worker-1".into(),
                provider_id: format!("libvirt://bed/{}", id.domain_uuid()),
            },
            network_config: None,
        })),
        direct_boot: Some(direct_boot),
        identity: id.clone(),
    };
    let hosts = std::sync::Arc::new(Hosts::new(4));
    let images = loopback_images(&hosts);
    let started = std::time::Instant::now();
    let state = provision(&hosts, &images, &request)
        .await
        .expect("provision");
    assert_eq!(state.domain.state, "running");
    assert_eq!(
        state.bootstrap,
        Some(capl::libvirt::backend::BootstrapDelivery::Delivered {
            volume: id.volume_name("seed", "iso")
        })
    );

    let mut console = String::new();
    let mut lease = None;
    while started.elapsed() < Duration::from_secs(180)
        && (lease.is_none() || !console.contains(&marker))
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        console = host.console_tail(&id, 64 * 1024).expect("console");
        if lease.is_none() {
            lease = host
                .addresses(&id)
                .expect("addresses")
                .into_iter()
                .find(|a| a.source == AddressSource::Lease);
            if lease.is_some() {
                println!("address after {:?}: {:?}", started.elapsed(), lease);
            }
        }
    }
    assert!(
        console.contains("capl-guest: seed found") && console.contains(&marker),
        "the guest read its seed; console:\n{console}"
    );
    assert!(
        console.contains(&format!("instance-id: {}", id.domain_uuid())),
        "meta-data reached the guest:\n{console}"
    );
    let lease = lease.unwrap_or_else(|| panic!("no DHCP lease reported; console:\n{console}"));
    assert!(
        lease.address.to_string().starts_with("10.213.7."),
        "{lease:?}"
    );
    assert_eq!(
        lease.mac.as_deref(),
        Some(id.mac("eth0").to_string().as_str())
    );
    println!(
        "guest booted and leased {} in {:?}",
        lease.address,
        started.elapsed()
    );

    delete_until_gone(&host, &id, Duration::from_secs(2));
    assert!(
        host.inventory(&id).expect("inventory").is_empty(),
        "no domain, no volume left"
    );
    network.destroy().expect("stop network");
    network.undefine().expect("undefine network");
}

/// Ignition reaches the guest through QEMU fw_cfg (`opt/com.coreos/config`), and an existing
/// volume serves as the backing image of the root disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignition_reaches_the_guest_through_fw_cfg_on_an_existing_volume() {
    use capl::libvirt::backend::{BaseImage, Bootstrap, MachineRequest};
    use capl::libvirt::hosts::Hosts;
    use capl::libvirt::provision::provision;

    let direct_boot = test_guest();
    let (uri, host, pool_dir) = bed_pool("capl-ignition");
    qcow2(&pool_dir.join("golden.qcow2"), "1G");
    host.connection()
        .lookup_storage_pool_by_name("capl-ignition")
        .expect("pool")
        .refresh(0)
        .expect("refresh");

    let id = identity("uid-ignition");
    let marker = format!("capl-ignition-{}", id.domain_uuid());
    let request = MachineRequest {
        cluster: "prod".into(),
        host: host_ref(&uri, DomainType::Qemu),
        vcpus: 1,
        memory_mib: 256,
        cpu_mode: CpuMode::HostModel,
        firmware: Firmware::Bios,
        pool: "capl-ignition".into(),
        image: BaseImage::Volume {
            pool: "capl-ignition".into(),
            name: "golden.qcow2".into(),
        },
        root_gib: 2,
        data_disks: vec![],
        interfaces: vec![],
        bootstrap: Some(Bootstrap::Ignition(
            format!("{{\"ignition\":{{\"version\":\"3.4.0\"}},\"capl\":\"{marker}\"}}")
                .into_bytes()
                .into(),
        )),
        direct_boot: Some(direct_boot),
        identity: id.clone(),
    };
    let hosts = std::sync::Arc::new(Hosts::new(4));
    let images = loopback_images(&hosts);
    provision(&hosts, &images, &request)
        .await
        .expect("provision");
    let root = host
        .volume_path("capl-ignition", &id.volume_name("root", "qcow2"))
        .expect("root path");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&root)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert!(
        info["backing-filename"]
            .as_str()
            .is_some_and(|b| b.ends_with("golden.qcow2")),
        "{info}"
    );
    assert_eq!(
        info["virtual-size"],
        2u64 << 30,
        "the overlay has the requested size"
    );

    let started = std::time::Instant::now();
    let mut console = String::new();
    while started.elapsed() < Duration::from_secs(120) && !console.contains(&marker) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        console = host.console_tail(&id, 64 * 1024).expect("console");
    }
    assert!(
        console.contains(&format!(
            "capl-guest: ignition {{\"ignition\":{{\"version\":\"3.4.0\"}},\"capl\":\"{marker}\"}}"
        )),
        "console:\n{console}"
    );
    assert!(
        console.contains("capl-guest: no seed"),
        "no NoCloud seed with Ignition"
    );

    delete_until_gone(&host, &id, Duration::from_secs(1));
    assert!(host.inventory(&id).expect("inventory").is_empty());
    assert!(
        host.volume_exists("capl-ignition", "golden.qcow2")
            .expect("lookup"),
        "the existing source volume is not the machine's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_shared_and_reopened_after_libvirtd_restarts() {
    use capl::libvirt::hosts::Hosts;
    use support::libvirtd::Libvirtd;
    use support::process::Lifetime;

    let dir = support::shared().test_dir("restart").join("libvirt");
    let mut libvirtd = Libvirtd::start(&dir, Lifetime::TestProcess).expect("a private libvirtd");
    let uri = libvirtd.host_uri();
    let hosts = Hosts::new(2);
    async fn hostname(
        hosts: &Hosts,
        uri: &capl::libvirt::uri::HostUri,
    ) -> capl::libvirt::Result<capl::libvirt::machine::HostFacts> {
        hosts.run(uri, |host| host.facts()).await
    }
    let before = hostname(&hosts, &uri).await.expect("first call");
    assert_eq!(hosts.open_connections(), 1);
    hostname(&hosts, &uri)
        .await
        .expect("second call on the same connection");
    assert_eq!(hosts.open_connections(), 1, "one connection per host URI");

    // libvirtd restarts (upgrade, crash): the same URI answers again.
    libvirtd.stop();
    let mut libvirtd = Libvirtd::start(&dir, Lifetime::TestProcess).expect("libvirtd again");
    assert_eq!(libvirtd.host_uri(), uri);
    let mut attempts = 0;
    let after = loop {
        attempts += 1;
        match hostname(&hosts, &uri).await {
            Ok(name) => break name,
            Err(e) if attempts < 3 => assert!(
                e.is_connection_lost(),
                "a lost connection is reported as such: {e}"
            ),
            Err(e) => panic!("no reconnect after {attempts} attempts: {e}"),
        }
    };
    assert_eq!(before.cpus, after.cpus);
    assert!(
        attempts <= 2,
        "reconnected on the next call, took {attempts}"
    );
    libvirtd.stop();
}

/// A machine on the test driver's `default-pool`, booting the volume `golden.qcow2`.
fn test_driver_request(id: &MachineIdentity) -> capl::libvirt::backend::MachineRequest {
    use capl::libvirt::backend::{BaseImage, DataDisk, MachineRequest};
    MachineRequest {
        cluster: "dev".into(),
        host: host_ref(&support::host_uri("test:///default"), DomainType::Kvm),
        vcpus: 2,
        memory_mib: 2048,
        cpu_mode: CpuMode::HostPassthrough,
        firmware: Firmware::Bios,
        pool: "default-pool".into(),
        image: BaseImage::Volume {
            pool: "default-pool".into(),
            name: "golden.qcow2".into(),
        },
        root_gib: 10,
        data_disks: vec![DataDisk {
            name: "etcd".into(),
            size_gib: 1,
            pool: "default-pool".into(),
        }],
        interfaces: vec![InterfacePlan {
            source: InterfaceSource::Network("default".into()),
            mac: id.mac("eth0"),
            model: NicModel::Virtio,
        }],
        bootstrap: None,
        direct_boot: None,
        identity: id.clone(),
    }
}

/// A backend on the test driver with a golden image in `default-pool`, made through the
/// backend's own connection (the test driver's state lives in the connection).
async fn test_driver_backend(
    hosts: capl::libvirt::hosts::Hosts,
) -> capl::libvirt::live::LibvirtBackend {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let backend =
        capl::libvirt::live::LibvirtBackend::with_hosts(Arc::new(hosts)).expect("backend");
    let golden = VolumePlan {
        name: "golden.qcow2".into(),
        capacity_gib: 1,
        format: "qcow2".into(),
        backing: None,
    }
    .to_xml()
    .expect("xml");
    backend
        .hosts()
        .run(&support::host_uri("test:///default"), move |host| {
            host.ensure_volume("default-pool", "golden.qcow2", &golden)
        })
        .await
        .expect("golden volume");
    backend
}

/// Calls `ensure` the way a controller does until it stops reporting progress.
async fn settle(
    backend: &impl capl::libvirt::backend::Backend,
    request: &capl::libvirt::backend::MachineRequest,
) -> Result<capl::libvirt::backend::MachineState, capl::libvirt::error::BackendError> {
    use capl::libvirt::backend::Provisioning;
    for _ in 0..500 {
        match backend.ensure(request).await? {
            Provisioning::InProgress { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
            Provisioning::Ready(state) => return Ok(state),
        }
    }
    panic!("ensure never settled");
}

/// Deletes through the backend until `Gone`.
async fn delete_through(
    backend: &impl capl::libvirt::backend::Backend,
    host: &HostRef,
    id: &MachineIdentity,
    grace: Duration,
) -> Result<(), capl::libvirt::error::BackendError> {
    for _ in 0..500 {
        match backend.delete(host, id, grace).await? {
            Deletion::Gone => return Ok(()),
            Deletion::ShuttingDown { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("delete never finished");
}

/// The controllers' interface on the in-process test driver: poll-style creation in the
/// background, bootstrap data honestly reported as not delivered, graceful then final delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_runs_a_machine_on_the_test_driver() {
    use capl::libvirt::backend::{Backend, Bootstrap, BootstrapDelivery, Provisioning};
    use capl::libvirt::error::Step;

    let backend = test_driver_backend(capl::libvirt::hosts::Hosts::new(4)).await;
    let id = identity("uid-backend");
    let mut request = test_driver_request(&id);
    request.bootstrap = Some(Bootstrap::Ignition(b"{\"ignition\":{}}".to_vec().into()));
    let host = request.host.clone();
    assert!(backend.status(&host, &id).await.expect("status").is_none());
    assert_eq!(
        backend.ensure(&request).await.expect("ensure"),
        Provisioning::InProgress {
            step: Step::BaseImage
        },
        "creation starts in the background and the call returns at once"
    );
    let created = settle(&backend, &request).await.expect("create");
    assert_eq!(created.domain.state, "running");
    assert_eq!(
        created.bootstrap,
        Some(BootstrapDelivery::NotDelivered {
            reason: "the test driver cannot store volume content".into(),
            bytes: 15
        }),
        "the test driver never pretends the guest got its bootstrap data"
    );
    assert_eq!(
        backend.ensure(&request).await.expect("again"),
        Provisioning::Ready(created.clone()),
        "idempotent"
    );
    assert_eq!(
        backend.status(&host, &id).await.expect("status"),
        Some(created.domain.clone())
    );
    let owned = backend.inventory(&host, &id).await.expect("inventory");
    assert_eq!(owned.volumes.len(), 3, "root, data, ignition: {owned:?}");
    // Other tests share the in-process test driver: look at this machine only.
    let listed: Vec<_> = backend
        .list_machines(&host)
        .await
        .expect("list")
        .into_iter()
        .filter(|d| d.uuid == id.uuid)
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].uuid,
            listed[0].name.as_str(),
            listed[0].cluster.as_str()
        ),
        (id.uuid, "worker-1", "dev")
    );
    let (facts, space) = backend
        .capacity(&host, "default-pool")
        .await
        .expect("capacity");
    assert!(facts.cpus > 0 && space.capacity > 0);
    assert!(
        backend
            .versions(&host)
            .await
            .expect("versions")
            .driver
            .eq_ignore_ascii_case("test")
    );

    // A running guest is asked to stop first; the call returns at once.
    let started = std::time::Instant::now();
    let first = backend
        .delete(&host, &id, Duration::from_secs(300))
        .await
        .expect("delete");
    assert!(matches!(first, Deletion::ShuttingDown { .. }), "{first:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    delete_through(&backend, &host, &id, Duration::from_secs(300))
        .await
        .expect("delete after the guest stopped");
    assert!(
        backend
            .inventory(&host, &id)
            .await
            .expect("inventory")
            .is_empty()
    );
    assert!(
        !backend
            .list_machines(&host)
            .await
            .expect("list")
            .iter()
            .any(|d| d.uuid == id.uuid),
        "no domain left"
    );
}

/// `clusterctl move` gives the object a new UID and no status: the machine is found from the
/// UUID persisted in the object, and delete removes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_machine_is_found_by_its_persisted_uuid_and_deleted() {
    use capl::libvirt::backend::{Backend, Provisioning};

    let backend = test_driver_backend(capl::libvirt::hosts::Hosts::new(4)).await;
    let persisted = MachineIdentity::uuid_for_uid("uid-before-move");
    let before = MachineIdentity::new("default", "worker-1", persisted);
    let request = test_driver_request(&before);
    let created = settle(&backend, &request).await.expect("create");

    // After the move: a new UID whose derived UUID differs; the controller uses the persisted one.
    assert_ne!(MachineIdentity::uuid_for_uid("uid-after-move"), persisted);
    let after = MachineIdentity::new("default", "worker-1", persisted);
    let moved = test_driver_request(&after);
    assert_eq!(
        backend.ensure(&moved).await.expect("ensure after move"),
        Provisioning::Ready(created.clone()),
        "the same domain, no second one"
    );
    assert_eq!(
        backend
            .list_machines(&moved.host)
            .await
            .expect("list")
            .iter()
            .filter(|d| d.uuid == persisted)
            .count(),
        1
    );
    delete_through(&backend, &moved.host, &after, Duration::ZERO)
        .await
        .expect("delete");
    assert!(
        backend
            .inventory(&moved.host, &after)
            .await
            .expect("inventory")
            .is_empty()
    );
}

/// A user could persist another tenant's UUID in their object: a domain with that UUID whose
/// metadata names another object (or no object of ours) is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_domain_with_the_machines_uuid_is_a_conflict_and_untouched() {
    use capl::libvirt::backend::Backend;
    use capl::libvirt::error::ErrorKind;

    let backend = test_driver_backend(capl::libvirt::hosts::Hosts::new(4)).await;
    let uri = support::host_uri("test:///default");
    let victim_uuid = MachineIdentity::uuid_for_uid("uid-victim");
    // The victim: another tenant's running machine.
    let victim = MachineIdentity::new("tenant-b", "db-0", victim_uuid);
    let victim_xml = plan(victim.clone(), Hypervisor::Test, "default-pool")
        .to_xml()
        .expect("xml");
    // And a domain of no one we know, with no metadata.
    let stranger_uuid = MachineIdentity::uuid_for_uid("uid-stranger");
    let stranger_xml = format!(
        "<domain type='test'><name>stranger</name><uuid>{stranger_uuid}</uuid>\
         <memory>65536</memory><os><type>hvm</type></os></domain>"
    );
    backend
        .hosts()
        .run(&uri, move |host| {
            for xml in [victim_xml, stranger_xml] {
                let domain = host.connection().define_domain_xml(&xml).expect("define");
                domain.create().expect("start");
            }
            Ok(())
        })
        .await
        .expect("foreign domains");

    for uuid in [victim_uuid, stranger_uuid] {
        let attacker = MachineIdentity::new("tenant-a", "worker-1", uuid);
        let request = test_driver_request(&attacker);
        let host = request.host.clone();
        let error = backend.ensure(&request).await.expect_err("conflict");
        assert_eq!(error.kind, ErrorKind::Conflict, "{error}");
        assert!(
            !error.message.contains("tenant-b"),
            "the owner is not disclosed: {error}"
        );
        assert_eq!(
            backend.status(&host, &attacker).await.map_err(|e| e.kind),
            Err(ErrorKind::Conflict)
        );
        assert_eq!(
            backend
                .delete(&host, &attacker, Duration::ZERO)
                .await
                .map_err(|e| e.kind),
            Err(ErrorKind::Conflict)
        );
        assert_eq!(
            backend
                .inventory(&host, &attacker)
                .await
                .map_err(|e| e.kind),
            Err(ErrorKind::Conflict)
        );
        let state = backend
            .hosts()
            .run(&uri, move |host| {
                let domain = host
                    .connection()
                    .lookup_domain_by_uuid_string(&uuid.to_string())
                    .expect("still defined");
                Ok(domain.is_active().expect("state"))
            })
            .await
            .expect("lookup");
        assert!(state, "the foreign domain still runs");
    }
    // Its rightful owner still manages it.
    assert!(
        backend
            .status(&host_ref(&uri, DomainType::Kvm), &victim)
            .await
            .expect("owner's status")
            .is_some()
    );
}

/// Volumes are found from the domain definition and every pool of the host (callers pass no
/// pools); a libvirt error during delete is returned, never swallowed, and delete is not `Gone`
/// until everything is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cleans_every_pool_and_returns_libvirt_errors() {
    use capl::libvirt::backend::{Backend, DataDisk};
    use capl::libvirt::error::Step;

    let backend = test_driver_backend(capl::libvirt::hosts::Hosts::new(4)).await;
    let uri = support::host_uri("test:///default");
    backend
        .hosts()
        .run(&uri, |host| {
            let pool = host
                .connection()
                .define_storage_pool_xml(
                    "<pool type='dir'><name>second-pool</name><target><path>/second-pool</path></target></pool>",
                    0,
                )
                .expect("second pool");
            pool.create(0).expect("start");
            Ok(())
        })
        .await
        .expect("pool");
    let id = identity("uid-two-pools");
    let mut request = test_driver_request(&id);
    request.data_disks.push(DataDisk {
        name: "logs".into(),
        size_gib: 1,
        pool: "second-pool".into(),
    });
    let host = request.host.clone();
    settle(&backend, &request).await.expect("create");
    let owned = backend.inventory(&host, &id).await.expect("inventory");
    assert_eq!(
        owned
            .volumes
            .iter()
            .map(|v| v.pool.as_str())
            .collect::<Vec<_>>(),
        vec!["default-pool", "default-pool", "second-pool"],
        "{owned:?}"
    );

    // The second pool goes down: its volume cannot be deleted, and delete says so.
    backend
        .hosts()
        .run(&uri, |host| {
            host.connection()
                .lookup_storage_pool_by_name("second-pool")
                .expect("pool")
                .destroy()
                .expect("stop the pool");
            Ok(())
        })
        .await
        .expect("stop");
    let error = delete_through(&backend, &host, &id, Duration::ZERO)
        .await
        .expect_err("a volume that cannot be deleted is an error");
    assert_eq!(error.step, Some(Step::DeleteVolumes), "{error}");
    assert!(error.message.contains("second-pool"), "{error}");
    assert!(
        backend.status(&host, &id).await.expect("status").is_some(),
        "the definition stays until its volumes can go"
    );

    backend
        .hosts()
        .run(&uri, |host| {
            host.connection()
                .lookup_storage_pool_by_name("second-pool")
                .expect("pool")
                .create(0)
                .expect("start the pool again");
            Ok(())
        })
        .await
        .expect("start");
    delete_through(&backend, &host, &id, Duration::ZERO)
        .await
        .expect("delete");
    let left = backend.inventory(&host, &id).await.expect("inventory");
    assert!(left.is_empty(), "{left:?}");
    let golden_left = backend
        .hosts()
        .run(&uri, |host| {
            host.volume_exists("default-pool", "golden.qcow2")
        })
        .await
        .expect("lookup");
    assert!(golden_left, "the base volume is never the machine's");
}

/// The per-host permit lives in the blocking work: dropping the caller's future does not let a
/// second call run while libvirt still works for the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_keeps_its_host_permit() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let hosts = capl::libvirt::hosts::Hosts::new(1);
    let uri = support::host_uri("test:///default");
    let first_done = Arc::new(AtomicBool::new(false));
    let done = first_done.clone();
    let first = hosts.run(&uri, move |_| {
        std::thread::sleep(Duration::from_millis(600));
        done.store(true, Ordering::SeqCst);
        Ok(())
    });
    // The caller gives up (a reconcile cancelled, a timeout around it).
    assert!(
        tokio::time::timeout(Duration::from_millis(100), first)
            .await
            .is_err()
    );
    let second_saw = hosts
        .run(&uri, move |_| Ok(first_done.load(Ordering::SeqCst)))
        .await
        .expect("second call");
    assert!(
        second_saw,
        "the second call ran while the first one's libvirt work was still running"
    );
}

/// One machine's operations are serialised: a delete issued while a create's libvirt call is
/// running (its future already dropped) waits for that call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_waits_for_a_running_create_step() {
    use capl::libvirt::backend::Backend;
    use std::sync::atomic::{AtomicBool, Ordering};

    let backend = test_driver_backend(capl::libvirt::hosts::Hosts::new(4)).await;
    let uri = support::host_uri("test:///default");
    let id = identity("uid-serialised");
    let request = test_driver_request(&id);
    let step_done = Arc::new(AtomicBool::new(false));
    let done = step_done.clone();
    {
        // A create step holds the machine's lock and is in a slow libvirt call.
        let guard = backend.locks().lock(id.uuid).await;
        let step = backend.hosts().run_keeping(&uri, guard, move |_| {
            std::thread::sleep(Duration::from_millis(600));
            done.store(true, Ordering::SeqCst);
            Ok(())
        });
        // The create is cancelled: its future goes away mid-call.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), step)
                .await
                .is_err()
        );
    }
    let deletion = backend
        .delete(&request.host, &id, Duration::ZERO)
        .await
        .expect("delete");
    assert_eq!(deletion, Deletion::Gone);
    assert!(
        step_done.load(Ordering::SeqCst),
        "the delete started while the create's libvirt call was still running"
    );
}

/// Every libvirt call has a timeout: a hung call returns an error promptly (and the connection
/// is dropped, so the next call reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_call_times_out_promptly() {
    use capl::libvirt::error::{BackendError, ErrorKind};
    let hosts = capl::libvirt::hosts::Hosts::with_timeout(2, Duration::from_millis(200));
    let uri = support::host_uri("test:///default");
    let started = std::time::Instant::now();
    let error = hosts
        .run(&uri, |_| {
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        })
        .await
        .expect_err("timed out");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert!(error.is_connection_lost(), "{error}");
    assert_eq!(BackendError::from(error).kind, ErrorKind::HostUnreachable);
    hosts
        .run(&uri, |host| host.versions())
        .await
        .expect("the next call works");
}

/// Libvirt's event loop runs, so keepalive notices a peer that stopped answering: a call to a
/// frozen libvirtd fails after the keepalive window (5 s × 3), not only at the call timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_notices_a_frozen_libvirtd() {
    use support::libvirtd::Libvirtd;
    use support::process::Lifetime;

    let dir = support::shared().test_dir("keepalive").join("libvirt");
    let mut libvirtd = Libvirtd::start(&dir, Lifetime::TestProcess).expect("a private libvirtd");
    let uri = libvirtd.host_uri();
    let hosts = capl::libvirt::hosts::Hosts::with_timeout(2, Duration::from_secs(120));
    hosts
        .run(&uri, |host| host.facts())
        .await
        .expect("first call");
    let pids = libvirtd.pids();
    let signal = |sig| {
        for pid in &pids {
            // SAFETY: plain kill(2) on processes of the test's own namespace.
            unsafe { libc::kill(*pid as libc::pid_t, sig) };
        }
    };
    signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        hosts.run(&uri, |host| host.facts()),
    )
    .await;
    signal(libc::SIGCONT);
    let elapsed = started.elapsed();
    let error = outcome
        .expect("keepalive closed the connection before 60 s")
        .expect_err("a frozen peer cannot answer");
    println!("frozen libvirtd noticed after {elapsed:?}: {error}");
    assert!(error.is_connection_lost(), "{error}");
    assert!(elapsed < Duration::from_secs(40), "{elapsed:?}");
    hosts
        .run(&uri, |host| host.facts())
        .await
        .expect("reconnected once it answers again");
    libvirtd.stop();
}

/// An image cache that may download from this test's own loopback server (the provider never
/// does: only this test-only setting lets one loopback address through).
fn loopback_images(
    hosts: &std::sync::Arc<capl::libvirt::hosts::Hosts>,
) -> capl::libvirt::image::ImageCache {
    let settings = capl::libvirt::image::ImageSettings {
        loopback_for_tests: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        ..Default::default()
    };
    capl::libvirt::image::ImageCache::with_settings(hosts.clone(), settings).expect("image cache")
}

/// A host's TLS credentials from a Secret reach libvirt as files it reads: the connection string
/// carries `pkipath=` to the manager's private directory, and libvirt loads the certificates
/// from there (these are deliberately broken, so libvirt stops before any connection). Run with virsh inside the
/// bed's network namespace, so nothing could leave the machine even if it got further.
#[test]
fn tls_credentials_from_a_secret_are_files_libvirt_reads() {
    use capl::libvirt::credentials::{CredentialFiles, Credentials};
    use capl::libvirt::uri::{HostUri, Transport, UriPolicy};

    let netns = {
        let bed = support::shared();
        let libvirtd = bed.libvirtd();
        libvirtd.as_ref().expect("libvirtd").netns.clone()
    };
    let pem = |label: &str, body: &str| {
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n").into_bytes()
    };
    let data = [
        ("ca.crt", pem("CERTIFICATE", "bm90IGEgY2VydGlmaWNhdGU=")),
        ("tls.crt", pem("CERTIFICATE", "bm90IGEgY2VydGlmaWNhdGU=")),
        ("tls.key", pem("PRIVATE KEY", "c2VjcmV0LW1hcmtlcg==")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let credentials = Credentials::from_secret(Transport::QemuTls, &data).expect("credentials");
    let root = tempfile::tempdir().expect("tempdir");
    let files = CredentialFiles::new(root.path().join("credentials")).expect("store");
    let dir = files.write(&credentials).expect("written");
    let uri = HostUri::parse("qemu+tls://hv1.example.com/system", UriPolicy::default())
        .expect("uri")
        .with_credentials(&credentials, &dir);
    assert_eq!(uri.to_string(), "qemu+tls://hv1.example.com/system");

    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "virsh",
            "-c",
            uri.connect_str(),
            "version",
        ])
        .output()
        .expect("virsh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "Unable to import client certificate {}",
            dir.join("clientcert.pem").display()
        )),
        "libvirt read the certificates from the manager's directory: {stderr}"
    );
    assert!(!stderr.contains("c2VjcmV0LW1hcmtlcg"), "{stderr}");
}
