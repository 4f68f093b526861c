//! The provider's container image, built without a container engine.
//!
//! The rootfs holds exactly what the release binary needs: the shared-library closure of
//! `manager` (and, optionally, of `ssh` for `qemu+ssh://` hosts), each file taken from the Debian
//! package that owns it on this machine, at the version apt installs now (what the Dockerfile's
//! `apt-get install` gets; the host's may be older and gone from the archive), downloaded with
//! `apt-get download` (cached by version) and extracted with `dpkg-deb -x`. Besides the closure it gets the
//! packages' copyright files (no other docs, manuals or translations) and control paragraphs (`/var/lib/dpkg/status.d/`, where image
//! scanners look), `/etc/os-release`, the CA bundle built the way `update-ca-certificates` builds
//! it, `/etc/passwd` + `/etc/group` with the `nonroot` user (65532) and `nobody` (65534),
//! `/etc/nsswitch.conf` and a
//! sticky `/tmp`. No shell, no package manager. Layout: merged `/usr` (`/lib` → `usr/lib`, ...).
//!
//! Two layers (Debian files, then `/manager`), written by [`super::oci`]: the same binary and
//! packages give the same manifest digest. The `Dockerfile` at the repo root builds the same
//! content with an engine; `tests/oci_image.rs` keeps the two in step ([`RUNTIME_PACKAGES`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::oci::{self, ImageConfig, Layer, LayerBuilder};

/// The user the image runs as (`uid:gid`), also the Dockerfile's `USER`.
pub const USER: &str = "65532:65532";
/// The uid and gid of [`USER`].
pub const UID: u32 = 65532;
/// The name of [`UID`] in `/etc/passwd` and of its group.
pub const USER_NAME: &str = "nonroot";
/// The entrypoint, also the Dockerfile's `ENTRYPOINT`.
pub const ENTRYPOINT: &str = "/manager";
/// The image's `PATH`.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the CA bundle is (`SSL_CERT_FILE`).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// What the Dockerfile's runtime stage installs on `debian:bookworm-slim`: the packages of the
/// binary's direct libraries that slim lacks, the CA certificates and the ssh client.
pub const RUNTIME_PACKAGES: &[&str] = &["ca-certificates", "libvirt0", "openssh-client"];
/// Packages `debian:bookworm-slim` has already (so the Dockerfile need not install them).
pub const SLIM_PACKAGES: &[&str] = &["base-files", "libc6", "libgcc-s1"];

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The `manager` binary (see [`build_release_binary`]).
    pub binary: PathBuf,
    /// Include `/usr/bin/ssh` and its libraries (for `qemu+ssh://` hosts).
    pub with_ssh: bool,
    /// The image name in the archive's index, e.g. [`default_reference`].
    pub reference: String,
    /// Where the archive goes.
    pub out: PathBuf,
    /// Where downloaded `.deb`s are kept between builds.
    pub deb_cache: PathBuf,
}

/// A built image.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// The OCI archive.
    pub archive: PathBuf,
    /// The image's name in the archive.
    pub reference: String,
    /// The manifest digest (`sha256:...`).
    pub digest: String,
    /// Size of the archive in bytes (what is transferred/imported).
    pub archive_size: u64,
    /// Sum of the file sizes in all layers (the unpacked rootfs without metadata).
    pub unpacked_size: u64,
    /// `(created_by, compressed bytes, unpacked bytes)` per layer, bottom first.
    pub layers: Vec<(String, u64, u64)>,
    /// `package → version` of every Debian package files were taken from.
    pub packages: BTreeMap<String, String>,
    /// How many `.deb`s had to be downloaded (0 when the cache had them all).
    pub downloaded: usize,
    /// Time to assemble the image (downloads included, the binary's build not).
    pub elapsed: Duration,
}

/// `localhost/<crate name>:<crate version>`, fully qualified so containerd and the kubelet agree
/// on the name.
pub fn default_reference() -> String {
    format!(
        "localhost/{}:{}",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION")
    )
}

/// The repository root (where `Cargo.toml` and the `Dockerfile` are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cargo build --release --locked --bin manager` (into `CARGO_TARGET_DIR` as set by the
/// caller, else `target/`) and returns the binary's path.
pub fn build_release_binary() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "-q", "--release", "--locked", "--bin", "manager"])
        .current_dir(repo_root());
    // What cargo sets for a running test or example: build scripts watch some of these (ring:
    // CARGO_MANIFEST_DIR), so with them the release build would redo ~10 minutes of work each
    // time it alternates between a test and a shell.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command.status().context("running cargo build --release")?;
    ensure!(status.success(), "cargo build --release failed: {status}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let binary = target.join("release/manager");
    ensure!(
        binary.is_file(),
        "{} is missing after the build",
        binary.display()
    );
    Ok(binary)
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8(output.stdout).with_context(|| format!("{command:?} printed non-UTF-8"))
}

/// The shared libraries `binary` loads, as `(soname or loader path, resolved path)` from `ldd`.
pub fn library_closure(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = run(Command::new("ldd").arg(binary))?;
    let mut libraries = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // "libx.so.1 => /lib/.../libx.so.1 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        // "linux-vdso.so.1 (0x...)" (in the kernel: no file).
        let line = line.split(" (0x").next().unwrap_or(line);
        match line.split_once(" => ") {
            Some((name, "not found")) => bail!("{}: {name} not found", binary.display()),
            Some((name, path)) => libraries.push((name.to_owned(), PathBuf::from(path))),
            None if line.starts_with('/') => libraries.push((line.to_owned(), PathBuf::from(line))),
            None => {}
        }
    }
    Ok(libraries)
}

/// The sonames `binary` names directly (`NEEDED`).
pub fn direct_libraries(binary: &Path) -> Result<Vec<String>> {
    let out = run(Command::new("objdump").arg("-p").arg(binary))?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
        .map(|soname| soname.trim().to_owned())
        .collect())
}

/// The names a file may have in dpkg's database: merged `/usr` makes `/lib/x` and `/usr/lib/x`
/// the same file, and dpkg records whichever the package ships.
fn dpkg_names(path: &Path) -> Result<Vec<String>> {
    let path = path.to_str().context("non-UTF-8 path")?;
    let mut names = vec![path.to_owned()];
    // The directory resolved, not the file: the soname link itself must land in the image.
    let file = Path::new(path);
    if let (Some(dir), Some(name)) = (file.parent(), file.file_name())
        && let Ok(real) = std::fs::canonicalize(dir)
    {
        names.push(real.join(name).to_string_lossy().into_owned());
    }
    for name in names.clone() {
        match name.strip_prefix("/usr") {
            Some(rest) => names.push(rest.to_owned()),
            None => names.push(format!("/usr{name}")),
        }
    }
    names.dedup();
    Ok(names)
}

/// For each path, the package (`name:arch` or `name`) that ships it and the path as dpkg
/// records it. One `dpkg-query -S` for all.
pub fn owning_packages(paths: &[PathBuf]) -> Result<Vec<(String, String)>> {
    let names = paths
        .iter()
        .map(|p| dpkg_names(p))
        .collect::<Result<Vec<_>>>()?;
    // Exits 1 when some names are unknown (expected: only one spelling is); parse what it found.
    let output = Command::new("dpkg-query")
        .arg("-S")
        .args(names.iter().flatten())
        .output()
        .context("running dpkg-query -S")?;
    let mut owners = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if line.starts_with("diversion") {
            continue;
        }
        if let Some((packages, path)) = line.split_once(": ") {
            let package = packages.split(", ").next().unwrap_or(packages);
            owners.insert(path.to_owned(), package.to_owned());
        }
    }
    paths
        .iter()
        .zip(&names)
        .map(|(path, names)| {
            names
                .iter()
                .find_map(|n| owners.get(n).map(|p| (p.clone(), n.clone())))
                .with_context(|| format!("no Debian package ships {} ({names:?})", path.display()))
        })
        .collect()
}

/// A package to take files from: its name, the version apt would install now (the candidate:
/// the host's installed version may be gone from the archive after a point release), and the
/// `.deb` file name `apt-get download` gives it.
#[derive(Clone, Debug)]
struct Package {
    name: String,
    version: String,
    deb: String,
}

/// Each of `packages` (as `dpkg-query -S` names them) at its apt candidate version, in order.
/// One `dpkg-query` and one `apt-cache` call for all (each call loads apt's whole cache).
fn candidates(packages: &[&str]) -> Result<Vec<Package>> {
    let out = run(Command::new("dpkg-query")
        .args(["-W", "-f", "${Package}\t${Architecture}\n"])
        .args(packages))?;
    let arches: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once('\t')).collect();
    let names: Vec<&str> = packages
        .iter()
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    let policy = run(Command::new("apt-cache").arg("policy").args(&names))?;
    // "name:\n  Installed: ...\n  Candidate: ...\n  Version table: ..."
    let mut versions = BTreeMap::new();
    let mut current = None;
    for line in policy.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(':');
        } else if let (Some(name), Some(version)) =
            (current, line.trim().strip_prefix("Candidate:"))
        {
            versions.insert(name, version.trim());
        }
    }
    names
        .iter()
        .map(|name| {
            let arch = arches
                .get(name)
                .with_context(|| format!("{name} is not installed here"))?;
            let version = versions
                .get(name)
                .filter(|v| **v != "(none)")
                .with_context(|| format!("apt has no candidate for {name}: {policy}"))?;
            Ok(Package {
                name: (*name).to_owned(),
                version: (*version).to_owned(),
                deb: format!("{name}_{}_{arch}.deb", version.replace(':', "%3a")),
            })
        })
        .collect()
}

/// Makes sure every package's `.deb` (at its candidate version) is in `cache`; returns how many
/// were downloaded.
fn download(packages: &[Package], cache: &Path) -> Result<usize> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let missing: Vec<&Package> = packages
        .iter()
        .filter(|p| !cache.join(&p.deb).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let mut apt = Command::new("apt-get");
    apt.args(["download", "-q", "-o", "APT::Sandbox::User=root"])
        .current_dir(cache);
    for package in &missing {
        apt.arg(format!("{}={}", package.name, package.version));
    }
    run(&mut apt)
        .context("downloading the image's packages (`apt-get update` if a version is not found)")?;
    for package in &missing {
        ensure!(
            cache.join(&package.deb).is_file(),
            "apt-get download did not write {}",
            package.deb
        );
    }
    Ok(missing.len())
}

/// `a/b/../c` → `a/c`, relative to a root ("" is the root itself); `None` if it leaves the root.
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(parts.iter().collect())
}

/// The path in the merged-`/usr` image of a path in a package (`lib/x` → `usr/lib/x`).
fn merged(path: &str) -> String {
    for top in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if path == top || path.starts_with(&format!("{top}/")) {
            return format!("usr/{path}");
        }
    }
    path.to_owned()
}

/// Adds `path` (relative, as the package ships it) from the extracted package `tree` to `layer`,
/// following symlinks inside the package so links and their targets both land.
fn add_from_package(layer: &mut LayerBuilder, tree: &Path, path: &str) -> Result<()> {
    let mut current = PathBuf::from(path);
    for _ in 0..16 {
        let source = tree.join(&current);
        let meta = source
            .symlink_metadata()
            .with_context(|| format!("{} is not in its package", current.display()))?;
        let name = merged(current.to_str().context("non-UTF-8 path")?);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&source)?;
            let parent = current.parent().unwrap_or(Path::new(""));
            let next = if target.is_absolute() {
                resolve(&target)
            } else {
                resolve(&parent.join(&target))
            }
            .with_context(|| format!("{} points outside the root", source.display()))?;
            // Relative targets that climb would cross the merged-/usr mapping: make them absolute.
            let link =
                if target.is_absolute() || target.components().any(|c| c == Component::ParentDir) {
                    format!("/{}", next.display())
                } else {
                    target.to_string_lossy().into_owned()
                };
            layer.add_symlink(&name, &link, 0, 0)?;
            current = next;
        } else if meta.file_type().is_file() {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            return layer.add_file_from(&name, &source, mode, 0, 0);
        } else {
            bail!("{} is not a file", source.display());
        }
    }
    bail!("too many symlinks from {path}")
}

/// The CA bundle as `update-ca-certificates` writes it: every `*.crt` under
/// `usr/share/ca-certificates`, in byte order of their relative paths (the order
/// `ca-certificates.conf` lists them in), each ending with a newline.
fn ca_bundle(tree: &Path) -> Result<Vec<u8>> {
    let root = tree.join("usr/share/ca-certificates");
    let mut certificates = Vec::new();
    for item in walkdir::WalkDir::new(&root).sort_by_file_name() {
        let item = item?;
        if item.file_type().is_file() && item.path().extension().is_some_and(|e| e == "crt") {
            let relative = item
                .path()
                .strip_prefix(&root)?
                .to_string_lossy()
                .into_owned();
            certificates.push((relative, item.path().to_owned()));
        }
    }
    ensure!(
        !certificates.is_empty(),
        "ca-certificates ships no certificates?"
    );
    certificates.sort();
    let mut bundle = Vec::new();
    for (_, path) in certificates {
        let mut pem = std::fs::read(&path)?;
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        bundle.extend(pem);
    }
    Ok(bundle)
}

/// Builds the image archive (see the module doc).
pub fn build(spec: &ImageSpec) -> Result<BuiltImage> {
    let started = Instant::now();

    // What the image needs, per package: the dpkg paths of the closure.
    let mut needed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![PathBuf::from("/etc/os-release")];
    files.extend(
        library_closure(&spec.binary)?
            .into_iter()
            .map(|(_, path)| path),
    );
    if spec.with_ssh {
        files.push(PathBuf::from("/usr/bin/ssh"));
        files.extend(
            library_closure(Path::new("/usr/bin/ssh"))?
                .into_iter()
                .map(|(_, p)| p),
        );
    }
    for (package, path) in owning_packages(&files)? {
        needed.entry(package).or_default().insert(path);
    }
    // Packages whose /usr/share/doc/<name> links to another package's (libgcc-s1 → gcc-12-base):
    // that one's copyright file comes too.
    let mut copyrights = Vec::new();
    for package in needed.keys() {
        let name = package.split(':').next().unwrap_or(package);
        if let Ok(target) = std::fs::read_link(format!("/usr/share/doc/{name}")) {
            let target = target.file_name().context("odd doc link")?.to_owned();
            copyrights.push(Path::new("/usr/share/doc").join(target).join("copyright"));
        }
    }
    for (package, path) in owning_packages(&copyrights)? {
        needed.entry(package).or_default().insert(path);
    }
    needed.entry("ca-certificates".into()).or_default();

    let names: Vec<&str> = needed.keys().map(String::as_str).collect();
    let packages = candidates(&names)?;
    let downloaded = download(&packages, &spec.deb_cache)?;

    let scratch = tempfile::tempdir().context("creating a scratch dir")?;
    let mut base = LayerBuilder::new(
        "debian bookworm: the library closure of /manager (and ssh), CA bundle, users",
    )?;
    for top in ["bin", "sbin", "lib", "lib64"] {
        base.add_symlink(top, &format!("usr/{top}"), 0, 0)?;
    }
    let mut versions = BTreeMap::new();
    for (package, paths) in packages.iter().zip(needed.values()) {
        let deb = spec.deb_cache.join(&package.deb);
        let tree = scratch.path().join(&package.name);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        for path in paths {
            add_from_package(&mut base, &tree, path.trim_start_matches('/'))?;
        }
        let doc = format!("usr/share/doc/{}", package.name);
        if tree.join(&doc).is_symlink() {
            // To another package's doc dir, whose copyright is in `needed`.
            let target = std::fs::read_link(tree.join(&doc))?;
            base.add_symlink(&doc, target.to_str().context("non-UTF-8 link")?, 0, 0)?;
        } else if tree.join(&doc).join("copyright").is_file() {
            add_from_package(&mut base, &tree, &format!("{doc}/copyright"))?;
        }
        if package.name == "ca-certificates" {
            base.add_file(CA_BUNDLE, ca_bundle(&tree)?, 0o644, 0, 0)?;
        }
        let control = run(Command::new("dpkg-deb").arg("-f").arg(&deb))?;
        base.add_file(
            &format!("var/lib/dpkg/status.d/{}", package.name),
            control,
            0o644,
            0,
            0,
        )?;
        versions.insert(package.name.clone(), package.version.clone());
    }
    base.add_file(
        "etc/passwd",
        // `nobody` too: charts may run the pod as 65534 (a uid the host's libvirtd knows), and ssh
        // refuses to run for a uid without an entry.
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\n\
             {USER_NAME}:x:{UID}:{UID}:{USER_NAME}:/home/{USER_NAME}:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        0o644,
        0,
        0,
    )?;
    base.add_file(
        "etc/group",
        format!("root:x:0:\n{USER_NAME}:x:{UID}:\nnogroup:x:65534:\n"),
        0o644,
        0,
        0,
    )?;
    base.add_file(
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n",
        0o644,
        0,
        0,
    )?;
    base.add_dir("tmp", 0o1777, 0, 0)?;
    base.add_dir("root", 0o700, 0, 0)?;
    base.add_dir(&format!("home/{USER_NAME}"), 0o700, UID, UID)?;

    let mut top = LayerBuilder::new("the manager binary")?;
    top.add_file_from(ENTRYPOINT, &spec.binary, 0o755, 0, 0)?;

    let layers = [base.build()?, top.build()?];
    let digest = oci::write_archive(&layers, &config()?, &spec.reference, &spec.out)?;
    let archive_size = std::fs::metadata(&spec.out)?.len();
    Ok(BuiltImage {
        archive: spec.out.clone(),
        reference: spec.reference.clone(),
        digest,
        archive_size,
        unpacked_size: layers.iter().map(|l| l.content_size).sum(),
        layers: layers.iter().map(layer_sizes).collect(),
        packages: versions,
        downloaded,
        elapsed: started.elapsed(),
    })
}

fn layer_sizes(layer: &Layer) -> (String, u64, u64) {
    (
        layer.created_by.clone(),
        layer.blob.len() as u64,
        layer.content_size,
    )
}

/// The image config: non-root, `/manager` as entrypoint, OCI labels from `Cargo.toml`.
pub fn config() -> Result<ImageConfig> {
    let mut labels = BTreeMap::from([
        ("org.opencontainers.image.title", env!("CARGO_PKG_NAME")),
        (
            "org.opencontainers.image.description",
            env!("CARGO_PKG_DESCRIPTION"),
        ),
        (
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION"),
        ),
        (
            "org.opencontainers.image.licenses",
            env!("CARGO_PKG_LICENSE"),
        ),
        ("org.opencontainers.image.base.name", "debian:bookworm"),
    ])
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect::<BTreeMap<_, _>>();
    if !env!("CARGO_PKG_REPOSITORY").is_empty() {
        labels.insert(
            "org.opencontainers.image.source".into(),
            env!("CARGO_PKG_REPOSITORY").into(),
        );
    }
    Ok(ImageConfig {
        entrypoint: vec![ENTRYPOINT.into()],
        env: vec![format!("PATH={PATH}"), format!("SSL_CERT_FILE={CA_BUNDLE}")],
        user: Some(USER.into()),
        working_dir: Some("/".into()),
        labels,
        exposed_ports: vec!["9443/tcp".into(), "8080/tcp".into(), "9440/tcp".into()],
        stop_signal: Some("SIGTERM".into()),
        ..ImageConfig::default()
    })
}

/// [`build`] with the defaults: the release binary, ssh included, the archive at
/// `<cache>/image/<name>.oci.tar`, `.deb`s cached under `<cache>/debs`.
pub fn build_default(with_ssh: bool) -> Result<BuiltImage> {
    let cache = super::tools::cache_dir()?;
    let binary = build_release_binary()?;
    let name = if with_ssh { "manager" } else { "manager-nossh" };
    build(&ImageSpec {
        binary,
        with_ssh,
        reference: default_reference(),
        out: cache.join("image").join(format!("{name}.oci.tar")),
        deb_cache: cache.join("debs"),
    })
}

/// `tests/testbed image [--no-ssh] [--cold] [--out PATH]`: builds the image and prints the
/// archive's path, name, digest, sizes and times (`--cold`: an empty `.deb` cache).
pub fn cli(flags: &[String]) -> Result<()> {
    let mut with_ssh = true;
    let mut cold = false;
    let mut out = None;
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        match flag.as_str() {
            "--no-ssh" => with_ssh = false,
            "--cold" => cold = true,
            "--out" => out = Some(PathBuf::from(flags.next().context("--out needs a path")?)),
            other => bail!("unknown flag {other} (image [--no-ssh] [--cold] [--out PATH])"),
        }
    }
    let cache = super::tools::cache_dir()?;
    let cold_cache = tempfile::tempdir()?;
    let cargo_started = Instant::now();
    let binary = build_release_binary()?;
    let cargo_time = cargo_started.elapsed();
    let name = if with_ssh { "manager" } else { "manager-nossh" };
    let built = build(&ImageSpec {
        binary,
        with_ssh,
        reference: default_reference(),
        out: out.unwrap_or_else(|| cache.join("image").join(format!("{name}.oci.tar"))),
        deb_cache: if cold {
            cold_cache.path().to_owned()
        } else {
            cache.join("debs")
        },
    })?;
    let mb = |bytes: u64| bytes as f64 / 1e6;
    println!("archive   {}", built.archive.display());
    println!("reference {}", built.reference);
    println!("digest    {}", built.digest);
    println!(
        "size      {:.1} MB compressed archive, {:.1} MB unpacked",
        mb(built.archive_size),
        mb(built.unpacked_size)
    );
    for (created_by, compressed, unpacked) in &built.layers {
        println!(
            "layer     {:.1} MB compressed, {:.1} MB unpacked: {created_by}",
            mb(*compressed),
            mb(*unpacked)
        );
    }
    let packages: Vec<String> = built
        .packages
        .iter()
        .map(|(p, v)| format!("{p}={v}"))
        .collect();
    println!("packages  {} ({})", packages.len(), packages.join(" "));
    println!(
        "time      cargo build --release {:.1}s, image {:.1}s ({} .debs downloaded)",
        cargo_time.as_secs_f64(),
        built.elapsed.as_secs_f64(),
        built.downloaded
    );
    Ok(())
}
