//! The provider's container image, built without a container engine: the OCI archive writer
//! (deterministic, digests matching content) and the image itself (reproducible, non-root, the
//! binary with exactly its libraries, and it starts under runc).

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use support::oci::{self, ImageConfig, LayerBuilder, Owner};

/// A small tree with what a rootfs has: nested dirs, an executable, a symlink, a sticky dir.
fn sample_tree(root: &Path) {
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(root.join("usr/bin/tool"), b"#!binary\n").unwrap();
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    symlink("usr/bin", root.join("bin")).unwrap();
    let long = "d".repeat(120);
    std::fs::create_dir_all(root.join(&long)).unwrap();
    std::fs::write(root.join(&long).join("f".repeat(120)), b"long name").unwrap();
}

fn sample_archive(tree: &Path, out: &Path) -> String {
    let mut base = LayerBuilder::new("tree").unwrap();
    base.add_tree(tree, "/", Owner::Fixed { uid: 0, gid: 0 })
        .unwrap();
    let mut top = LayerBuilder::new("files").unwrap();
    top.add_file("etc/passwd", "root:x:0:0::/:/nonexistent\n", 0o644, 0, 0)
        .unwrap();
    top.add_dir("home/nonroot", 0o700, 65532, 65532).unwrap();
    let layers = [base.build().unwrap(), top.build().unwrap()];
    let config = ImageConfig {
        entrypoint: vec!["/usr/bin/tool".into()],
        env: vec!["PATH=/usr/bin".into()],
        user: Some("65532:65532".into()),
        labels: BTreeMap::from([("org.opencontainers.image.title".into(), "t".into())]),
        ..ImageConfig::default()
    };
    oci::write_archive(&layers, &config, "localhost/sample:1.0", out).unwrap()
}

#[test]
fn archive_writes_are_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(&dir.path().join("tree"));
    let first = sample_archive(&dir.path().join("tree"), &dir.path().join("a.tar"));
    // A second tree with the same content but other mtimes.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    sample_tree(&dir.path().join("tree2"));
    let second = sample_archive(&dir.path().join("tree2"), &dir.path().join("b.tar"));
    assert_eq!(first, second);
    let a = std::fs::read(dir.path().join("a.tar")).unwrap();
    let b = std::fs::read(dir.path().join("b.tar")).unwrap();
    assert!(a == b, "two writes of the same image differ");
}

#[test]
fn archive_digests_match_content_and_layers_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    sample_tree(&dir.path().join("tree"));
    let out = dir.path().join("image.tar");
    let digest = sample_archive(&dir.path().join("tree"), &out);
    // read_archive verifies every blob against its digest, sizes and diff_ids.
    let image = oci::read_archive(&out).unwrap();
    assert_eq!(image.manifest_digest, digest);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(image.reference.as_deref(), Some("localhost/sample:1.0"));
    assert_eq!(image.layers.len(), 2);
    let config = image.runtime_config();
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/bin/tool"]));
    assert_eq!(image.config["created"], "1970-01-01T00:00:00Z");

    // The index names the image both ways containerd and OCI tools look for.
    let mut archive = tar::Archive::new(std::fs::File::open(&out).unwrap());
    let mut names = Vec::new();
    let mut index = None;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if name == "index.json" {
            index = Some(serde_json::from_reader::<_, serde_json::Value>(&mut entry).unwrap());
        }
        names.push(name);
    }
    assert!(names.contains(&"oci-layout".to_owned()), "{names:?}");
    let annotations = &index.unwrap()["manifests"][0]["annotations"];
    assert_eq!(
        annotations["io.containerd.image.name"],
        "localhost/sample:1.0"
    );
    assert_eq!(annotations["org.opencontainers.image.ref.name"], "1.0");

    // Unpacked: modes, ownership, the symlink and long names survive.
    let rootfs = dir.path().join("rootfs");
    image.unpack(&rootfs).unwrap();
    let mode = |p: &str| std::fs::symlink_metadata(rootfs.join(p)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(mode("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(mode("usr/bin/tool").mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(rootfs.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(mode("home/nonroot").uid(), 65532);
    assert_eq!(mode("home/nonroot").mode() & 0o7777, 0o700);
    let long = rootfs.join("d".repeat(120)).join("f".repeat(120));
    assert_eq!(std::fs::read(long).unwrap(), b"long name");
    // Every entry has mtime 0 (SOURCE_DATE_EPOCH unset) and no user/group names.
    for layer in &image.layers {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(layer.as_slice()));
        for entry in tar.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), 0, "{:?}", entry.path());
            assert_eq!(header.username().unwrap().unwrap_or(""), "");
        }
    }

    // A corrupted blob is refused.
    let mut bytes = std::fs::read(&out).unwrap();
    let at = bytes.windows(9).position(|w| w == b"#!binary\n");
    assert!(at.is_none(), "layers are compressed");
    // The config blob is stored as is: make it claim root.
    let user = bytes.windows(11).position(|w| w == b"65532:65532").unwrap();
    bytes[user..user + 11].copy_from_slice(b"00000:00000");
    let corrupt = dir.path().join("corrupt.tar");
    std::fs::write(&corrupt, bytes).unwrap();
    assert!(oci::read_archive(&corrupt).is_err());
}

// ---- The provider's image (release build; `.deb`s cached under the bed's cache dir) ----

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use support::image::{self, BuiltImage, ImageSpec};

/// Where the shared image and its unpacked rootfs live for this test binary.
struct Built {
    image: BuiltImage,
    spec: ImageSpec,
    rootfs: PathBuf,
    _dir: tempfile::TempDir,
}

/// The image, built once per test binary from the release binary, and unpacked.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let binary = image::build_release_binary().unwrap();
        let spec = ImageSpec {
            binary,
            with_ssh: true,
            reference: image::default_reference(),
            out: dir.path().join("manager.oci.tar"),
            deb_cache: support::tools::cache_dir().unwrap().join("debs"),
        };
        let image = image::build(&spec).unwrap();
        let rootfs = dir.path().join("bundle/rootfs");
        oci::read_archive(&image.archive).unwrap().unpack(&rootfs).unwrap();
        eprintln!(
            "image {} {}: {:.1} MB compressed archive, {:.1} MB unpacked, {} packages, built in {:.1}s",
            image.reference,
            image.digest,
            image.archive_size as f64 / 1e6,
            image.unpacked_size as f64 / 1e6,
            image.packages.len(),
            image.elapsed.as_secs_f64()
        );
        Built {
            image,
            spec,
            rootfs,
            _dir: dir,
        }
    })
}

#[test]
fn image_build_is_reproducible() {
    let first = built();
    let dir = tempfile::tempdir().unwrap();
    let spec = ImageSpec {
        out: dir.path().join("again.oci.tar"),
        ..first.spec.clone()
    };
    let again = image::build(&spec).unwrap();
    assert_eq!(again.digest, first.image.digest);
    let a = std::fs::read(&first.image.archive).unwrap();
    let b = std::fs::read(&again.archive).unwrap();
    assert!(a == b, "two builds of the image differ");
}

#[test]
fn image_config_runs_manager_as_nonroot() {
    let archive = oci::read_archive(&built().image.archive).unwrap();
    assert_eq!(
        archive.reference.as_deref(),
        Some(image::default_reference().as_str())
    );
    let config = archive.runtime_config();
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/manager"]));
    assert!(config.get("Cmd").is_none(), "{config}");
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"),
        "{env:?}"
    );
    assert!(
        env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin:")),
        "{env:?}"
    );
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(
        labels["org.opencontainers.image.title"],
        "cluster-api-provider-libvirt"
    );
    assert_eq!(archive.config["architecture"], oci::host_architecture());
    assert_eq!(archive.config["os"], "linux");
    // Layer 1: Debian, layer 2: the binary (a new binary reuses the Debian layer).
    assert_eq!(archive.layers.len(), 2);
}

/// Every file and symlink below `root`, relative.
fn tree(root: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            e.path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn image_rootfs_holds_the_binary_its_libraries_and_certificates_only() {
    use std::os::unix::fs::MetadataExt;
    let built = built();
    let rootfs = &built.rootfs;
    let files = tree(rootfs);

    let manager = std::fs::metadata(rootfs.join("manager")).unwrap();
    assert_eq!((manager.uid(), manager.mode() & 0o7777), (0, 0o755));
    assert_eq!(
        std::fs::read(rootfs.join("manager")).unwrap(),
        std::fs::read(&built.spec.binary).unwrap()
    );
    // The libvirt client library (through its soname link, through /lib → usr/lib).
    let libvirt = rootfs.join("usr/lib/x86_64-linux-gnu/libvirt.so.0");
    assert!(libvirt.symlink_metadata().unwrap().is_symlink());
    assert!(std::fs::metadata(&libvirt).unwrap().len() > 1_000_000);
    assert_eq!(
        std::fs::read_link(rootfs.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    // Every library the binary and ssh load is there, by the name the loader looks for.
    for executable in [built.spec.binary.as_path(), Path::new("/usr/bin/ssh")] {
        for (name, path) in image::library_closure(executable).unwrap() {
            let in_image = rootfs.join(path.strip_prefix("/").unwrap());
            assert!(in_image.exists(), "{name} ({}) is missing", path.display());
        }
    }
    assert!(files.contains("usr/bin/ssh"));

    // The CA bundle: every Debian certificate, PEM.
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let count = bundle.matches("-----BEGIN CERTIFICATE-----").count();
    assert!(count > 100, "{count} certificates");
    assert_eq!(count, bundle.matches("-----END CERTIFICATE-----\n").count());

    // Users and the sticky /tmp.
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert!(group.contains("nonroot:x:65532:"), "{group}");
    assert!(passwd.contains("nobody:x:65534:65534:"), "{passwd}");
    assert!(group.contains("nogroup:x:65534:"), "{group}");
    assert_eq!(
        std::fs::metadata(rootfs.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::metadata(rootfs.join("home/nonroot"))
            .unwrap()
            .uid(),
        65532
    );
    let os_release = std::fs::read_to_string(rootfs.join("etc/os-release")).unwrap();
    assert!(os_release.contains("bookworm"), "{os_release}");
    // Scanners find the packages (and their versions) in status.d.
    let status = std::fs::read_to_string(rootfs.join("var/lib/dpkg/status.d/libvirt0")).unwrap();
    assert!(status.contains("Package: libvirt0\n"), "{status}");

    // No shell, no package manager, no docs beyond copyright files.
    for absent in [
        "bin/sh",
        "usr/bin/sh",
        "usr/bin/bash",
        "usr/bin/dash",
        "usr/bin/busybox",
        "usr/bin/apt",
        "usr/bin/dpkg",
        "usr/bin/env",
    ] {
        assert!(!rootfs.join(absent).exists(), "{absent} is in the image");
    }
    let executables: Vec<&String> = files
        .iter()
        .filter(|f| {
            let meta = std::fs::symlink_metadata(rootfs.join(f)).unwrap();
            meta.is_file() && meta.mode() & 0o111 != 0 && !f.contains(".so")
        })
        .collect();
    assert_eq!(executables, ["manager", "usr/bin/ssh"]);
    let docs: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("usr/share/") && !f.ends_with("/copyright"))
        .filter(|f| !rootfs.join(f).is_dir())
        .collect();
    assert!(docs.is_empty(), "{docs:?}");
    // Every package's copyright is there (some through a link to another package's doc dir).
    for package in built.image.packages.keys() {
        let copyright = rootfs.join(format!("usr/share/doc/{package}/copyright"));
        let text = std::fs::read_to_string(&copyright).unwrap_or_else(|e| panic!("{package}: {e}"));
        assert!(!text.is_empty(), "{package}");
    }
}

/// Runs the image's entrypoint with `args` (see [`run_in_image_raw`]).
fn run_in_image(name: &str, args: &[&str]) -> (bool, String, String) {
    let archive = oci::read_archive(&built().image.archive).unwrap();
    let entrypoint = archive.runtime_config()["Entrypoint"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let mut argv = vec![entrypoint.as_str()];
    argv.extend(args);
    run_in_image_raw(name, &argv)
}

/// Runs `argv` in the image with Debian's runc, as a kubelet would with a restricted pod:
/// read-only rootfs, uid/gid 65532, no capabilities, no new privileges, its own network (and
/// pid, ipc, uts, mount) namespaces, the image's Env. Returns (exit ok, stdout, stderr).
fn run_in_image_raw(name: &str, argv: &[&str]) -> (bool, String, String) {
    run_in_image_as(name, 65532, argv)
}

/// [`run_in_image_raw`] as `uid` (and the same gid).
fn run_in_image_as(name: &str, uid: u32, argv: &[&str]) -> (bool, String, String) {
    ensure_runc();
    let built = built();
    let bundle = tempfile::tempdir().unwrap();
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "runc spec: {out:?}");
    let path = bundle.path().join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let archive = oci::read_archive(&built.image.archive).unwrap();
    let config = archive.runtime_config();
    let process = &mut spec["process"];
    process["terminal"] = false.into();
    process["user"] = serde_json::json!({"uid": uid, "gid": uid});
    process["args"] = serde_json::json!(argv);
    process["env"] = config["Env"].clone();
    process["cwd"] = "/".into();
    process["noNewPrivileges"] = true.into();
    process["capabilities"] = serde_json::json!({
        "bounding": [], "effective": [], "permitted": [], "ambient": []
    });
    // The rootfs unpacked once, shared read-only by every run.
    spec["root"] = serde_json::json!({"path": built.rootfs, "readonly": true});
    spec["hostname"] = "capl".into();
    let namespaces: Vec<&str> = spec["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(namespaces.contains(&"network"), "{namespaces:?}");
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();

    let state = bundle.path().join("state");
    let id = format!("capl-image-{}-{name}", std::process::id());
    let out = Command::new("timeout")
        .arg("120")
        .arg("runc")
        .arg("--root")
        .arg(&state)
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg(&id)
        .output()
        .unwrap();
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&state)
        .args(["delete", "--force", &id])
        .output();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Debian's runc (tests/tools/install.sh installs it; installed here if it is missing).
fn ensure_runc() {
    static RUNC: OnceLock<()> = OnceLock::new();
    RUNC.get_or_init(|| {
        if Command::new("runc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return;
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "runc"])
            .status()
            .unwrap();
        assert!(status.success(), "apt-get install runc failed");
    });
}

#[test]
fn image_starts_and_prints_its_version_under_runc() {
    let (ok, stdout, stderr) = run_in_image("version", &["version"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(stdout, format!("manager {}\n", env!("CARGO_PKG_VERSION")));

    let (ok, stdout, stderr) = run_in_image("help", &["--help"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("Usage: manager"), "{stdout}");
}

#[test]
fn image_loads_libvirt_under_runc() {
    let (ok, stdout, stderr) = run_in_image(
        "libvirt",
        &[
            "version",
            "--libvirt-uri",
            "test:///default",
            "--allow-test-driver",
        ],
    );
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("libvirt 9."), "{stdout}");
    assert!(stdout.contains("TEST driver"), "{stdout}");
}

#[test]
fn image_ssh_resolves_its_user_as_nobody_under_runc() {
    // A chart may run the pod as 65534 (nobody): ssh needs a passwd entry for its uid.
    let (ok, stdout, stderr) = run_in_image_as("ssh-nobody", 65534, &["/usr/bin/ssh", "-G", "h"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("\nuser nobody\n"), "{stdout}");
}

#[test]
fn image_ssh_client_runs_under_runc() {
    // Not through the entrypoint: runc runs what args say. `ssh -V` needs its whole closure.
    let (ok, stdout, stderr) = run_in_image_raw("ssh", &["/usr/bin/ssh", "-V"]);
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("OpenSSH_"), "{stderr}");
}

/// The Dockerfile's final stage, continuation lines joined: `(instruction, arguments)`.
fn dockerfile_runtime_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(image::repo_root().join("Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let mut stage = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, arguments) = line.split_once(char::is_whitespace).unwrap();
        let instruction = instruction.to_uppercase();
        if instruction == "FROM" {
            stage.clear();
        }
        stage.push((
            instruction,
            arguments.split_whitespace().collect::<Vec<_>>().join(" "),
        ));
    }
    stage
}

#[test]
fn dockerfile_matches_the_image_builder() {
    let stage = dockerfile_runtime_stage();
    let get = |name: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    assert_eq!(get("FROM"), ["docker.io/library/debian:bookworm-slim"]);
    assert_eq!(get("USER"), [image::USER]);
    let entrypoint: Vec<String> = serde_json::from_str(get("ENTRYPOINT")[0]).unwrap();
    assert_eq!(entrypoint, [image::ENTRYPOINT]);
    assert_eq!(get("ENV"), [format!("SSL_CERT_FILE={}", image::CA_BUNDLE)]);

    // The packages `apt-get install` gets are the builder's RUNTIME_PACKAGES.
    let run = get("RUN").join(" ");
    let install = run.split("apt-get install").nth(1).unwrap();
    let packages: BTreeSet<&str> = install
        .split("&&")
        .next()
        .unwrap()
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(packages, image::RUNTIME_PACKAGES.iter().copied().collect());
    assert!(run.contains("--uid 65532 --gid 65532"), "{run}");
    assert!(
        run.contains(&format!("--gid 65532 {}", image::USER_NAME)),
        "{run}"
    );

    // Labels and ports as in the image config (the version is the image builder's alone).
    let config = image::config().unwrap();
    let labels: BTreeMap<String, String> = get("LABEL")
        .join(" ")
        .split("\" ")
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap();
            (key.to_owned(), value.trim_matches('"').to_owned())
        })
        .collect();
    let mut expected = config.labels.clone();
    expected.remove("org.opencontainers.image.version");
    expected.remove("org.opencontainers.image.source");
    assert_eq!(labels, expected);
    let ports: Vec<&str> = get("EXPOSE").join(" ").leak().split(' ').collect();
    assert_eq!(ports, config.exposed_ports);
}

#[test]
fn runtime_packages_are_what_the_binary_links() {
    // Every library the binary names directly comes from RUNTIME_PACKAGES or from what
    // bookworm-slim has: a new direct dependency fails here until the Dockerfile installs it.
    let built = built();
    // By soname; ldd names the loader by its path.
    let closure: BTreeMap<String, PathBuf> = image::library_closure(&built.spec.binary)
        .unwrap()
        .into_iter()
        .map(|(name, path)| (name.rsplit('/').next().unwrap().to_owned(), path))
        .collect();
    let direct: Vec<PathBuf> = image::direct_libraries(&built.spec.binary)
        .unwrap()
        .iter()
        .map(|soname| {
            closure
                .get(soname)
                .unwrap_or_else(|| panic!("{soname}"))
                .clone()
        })
        .collect();
    let owners = image::owning_packages(&direct).unwrap();
    for (package, path) in owners {
        let name = package.split(':').next().unwrap();
        assert!(
            image::RUNTIME_PACKAGES.contains(&name) || image::SLIM_PACKAGES.contains(&name),
            "{path} comes from {name}: add it to the Dockerfile and RUNTIME_PACKAGES"
        );
    }
    // And the image has every runtime package (ssh included).
    for package in image::RUNTIME_PACKAGES {
        assert!(built.image.packages.contains_key(*package), "{package}");
    }
}

/// The directory with `containerd`, `containerd-shim-runc-v2` and `ctr` (built by
/// tests/tools/install.sh, which exports it as `CAPL_CONTAINERD_DIR`).
fn containerd_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPL_CONTAINERD_DIR") {
        return PathBuf::from(dir);
    }
    let tools = support::tools::cache_dir().unwrap().join("tools");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&tools)
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("containerd-")
        })
        .filter(|p| p.join("ctr").is_file())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no containerd: eval \"$(tests/tools/install.sh)\" builds it"))
}

/// A containerd of this test's own (own root, state and socket; stopped on drop).
struct Containerd {
    child: std::process::Child,
    socket: PathBuf,
    bin: PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Self {
        let bin = containerd_dir();
        let dir = tempfile::Builder::new()
            .prefix("capl-ctrd-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 3\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \
             \"io.containerd.cri.v1.runtime\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c.sock.ttrpc\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new(bin.join("containerd"))
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .env("PATH", Self::path(&bin))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let socket = dir.path().join("c.sock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self {
            child,
            socket,
            bin,
            _dir: dir,
        }
    }

    /// PATH with the shim (and the system's runc).
    fn path(bin: &Path) -> String {
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "capl-image-test"])
            .args(args)
            .env("PATH", Self::path(&self.bin))
            .output()
            .unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn image_imports_into_containerd_and_runs_there() {
    ensure_runc();
    let built = built();
    let containerd = Containerd::start();
    let archive = built.image.archive.to_str().unwrap();
    let out = containerd.ctr(&["images", "import", archive]);
    assert!(out.status.success(), "ctr images import: {out:?}");
    // Named by the index annotation, with the manifest digest we wrote.
    let out = containerd.ctr(&["images", "ls"]);
    let list = String::from_utf8_lossy(&out.stdout);
    let line = list
        .lines()
        .find(|l| l.starts_with(&format!("{} ", built.image.reference)))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains(&built.image.digest), "{line}");

    // Run as a restricted pod would: read-only rootfs, the image's user.
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--read-only",
        &built.image.reference,
        "capl-image-run",
        "/manager",
        "version",
        "--libvirt-uri",
        "test:///default",
        "--allow-test-driver",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ctr run: {out:?}");
    assert!(
        stdout.starts_with(&format!("manager {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(stdout.contains("TEST driver"), "{stdout}");
    // `ctr run` takes the user from the image config: the process was not root.
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--read-only",
        &built.image.reference,
        "capl-image-id",
        "/usr/bin/ssh",
        "-G",
        "localhost",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ctr run ssh -G: {out:?}");
    assert!(stdout.contains("\nuser nonroot\n"), "{stdout}");
}
