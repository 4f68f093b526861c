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
