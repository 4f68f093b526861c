//! Deterministic OCI image-layout archives, written without a container engine.
//!
//! A [`Layer`] is a gzipped tar built from entries kept sorted by path ([`LayerBuilder`]): every
//! entry has the same mtime (`SOURCE_DATE_EPOCH`, else 0), an explicit uid/gid/mode, no user or
//! group names, and the gzip header carries no file name and no timestamp. [`write_archive`]
//! packs layers and an [`ImageConfig`] into an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/*`) as one tar, the format `ctr images import` and `skopeo copy oci-archive:`
//! read. The same inputs give byte-identical archives, so the manifest digest names the content.
//!
//! [`read_archive`] is the other direction (digests verified), for tests and the bed's launcher.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use flate2::Compression;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Media type of the image index (`index.json`).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzipped tar layer.
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The index annotation containerd names an imported image by.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI index annotation for the image's reference (its tag).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The gzip level of every layer: fixed, so the compressed bytes are too.
const GZIP_LEVEL: u32 = 6;

/// The timestamp of every entry and of the image: `SOURCE_DATE_EPOCH` when set (the
/// reproducible-builds convention), else 0.
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Who owns the entries [`LayerBuilder::add_tree`] adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The uid/gid each file has on disk.
    FromTree,
    /// The same uid/gid for every entry (e.g. `0, 0` so a tree extracted by anyone is root's).
    Fixed { uid: u32, gid: u32 },
}

/// The content of one layer entry.
#[derive(Clone, Debug)]
enum Kind {
    Dir,
    /// File content, in memory.
    Bytes(Vec<u8>),
    /// File content, read from this path when the layer is built.
    FileAt(PathBuf),
    /// Symbolic link to this target (kept as is, relative or absolute).
    Symlink(PathBuf),
}

#[derive(Clone, Debug)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Collects a layer's entries, keyed (and so written) in path order; see [`LayerBuilder::build`].
#[derive(Clone, Debug)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
    mtime: u64,
    created_by: String,
}

/// A built layer: its compressed blob and the digests the manifest and config name it by.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The gzipped tar (the blob).
    pub blob: Vec<u8>,
    /// `sha256:` of [`Layer::blob`] (the manifest's layer digest).
    pub digest: String,
    /// `sha256:` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Size of the uncompressed tar in bytes.
    pub tar_size: u64,
    /// Sum of the file sizes in the layer (what it takes unpacked, without metadata).
    pub content_size: u64,
    /// The config history's `created_by` for this layer.
    pub created_by: String,
}

/// A layer path: relative, `/`-separated, no `.`/`..`, no trailing slash; "" is the root.
fn normalize(path: &str) -> Result<String> {
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => parts.push(
                part.to_str()
                    .with_context(|| format!("{path:?} is not UTF-8"))?
                    .to_owned(),
            ),
            Component::ParentDir | Component::Prefix(_) => {
                bail!("layer path {path:?} leaves the root")
            }
        }
    }
    Ok(parts.join("/"))
}

impl LayerBuilder {
    /// An empty layer whose entries get the mtime [`source_date_epoch`].
    pub fn new(created_by: &str) -> Result<Self> {
        Ok(Self {
            entries: BTreeMap::new(),
            mtime: source_date_epoch()?,
            created_by: created_by.to_owned(),
        })
    }

    /// Overrides the mtime of every entry.
    pub fn mtime(mut self, seconds: u64) -> Self {
        self.mtime = seconds;
        self
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = normalize(path)?;
        ensure!(
            !path.is_empty(),
            "a layer entry needs a path below the root"
        );
        // Parents first, as root-owned 0755 directories unless added explicitly.
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => bail!("{parent:?} is not a directory in this layer (adding {path:?})"),
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            kind: Kind::Dir,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                        },
                    );
                }
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Adds (or replaces) a directory.
    pub fn add_dir(&mut self, path: &str, mode: u32, uid: u32, gid: u32) -> Result<()> {
        let kind = Kind::Dir;
        self.insert(
            path,
            Entry {
                kind,
                mode,
                uid,
                gid,
            },
        )
    }

    /// Adds (or replaces) a file with this content.
    pub fn add_file(
        &mut self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        let kind = Kind::Bytes(data.into());
        self.insert(
            path,
            Entry {
                kind,
                mode,
                uid,
                gid,
            },
        )
    }

    /// Adds (or replaces) a file whose content is read from `source` at [`LayerBuilder::build`].
    pub fn add_file_from(
        &mut self,
        path: &str,
        source: &Path,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        let kind = Kind::FileAt(source.to_owned());
        self.insert(
            path,
            Entry {
                kind,
                mode,
                uid,
                gid,
            },
        )
    }

    /// Adds (or replaces) a symbolic link.
    pub fn add_symlink(&mut self, path: &str, target: &str, uid: u32, gid: u32) -> Result<()> {
        let kind = Kind::Symlink(PathBuf::from(target));
        self.insert(
            path,
            Entry {
                kind,
                mode: 0o777,
                uid,
                gid,
            },
        )
    }

    /// Adds everything below `source` (not `source` itself) under `dest` in the layer: regular
    /// files (hard links become copies), directories and symlinks (kept, not followed), with their
    /// permission bits (setuid, sticky included) and the given ownership. Other file types fail.
    pub fn add_tree(&mut self, source: &Path, dest: &str, owner: Owner) -> Result<()> {
        let walk = walkdir::WalkDir::new(source)
            .min_depth(1)
            .follow_links(false)
            .sort_by_file_name();
        for item in walk {
            let item = item.with_context(|| format!("walking {}", source.display()))?;
            let relative = item
                .path()
                .strip_prefix(source)
                .context("walkdir left the tree")?;
            let relative = relative
                .to_str()
                .with_context(|| format!("{} is not UTF-8", item.path().display()))?;
            let path = format!("{dest}/{relative}");
            let meta = item
                .path()
                .symlink_metadata()
                .with_context(|| format!("stat {}", item.path().display()))?;
            let (uid, gid) = match owner {
                Owner::FromTree => (meta.uid(), meta.gid()),
                Owner::Fixed { uid, gid } => (uid, gid),
            };
            let mode = meta.mode() & 0o7777;
            let file_type = meta.file_type();
            if file_type.is_dir() {
                self.add_dir(&path, mode, uid, gid)?;
            } else if file_type.is_file() {
                self.add_file_from(&path, item.path(), mode, uid, gid)?;
            } else if file_type.is_symlink() {
                let target = std::fs::read_link(item.path())
                    .with_context(|| format!("readlink {}", item.path().display()))?;
                let target = target
                    .to_str()
                    .with_context(|| format!("{} has a non-UTF-8 target", item.path().display()))?;
                self.add_symlink(&path, target, uid, gid)?;
            } else {
                bail!(
                    "{} is neither a file, a directory nor a symlink",
                    item.path().display()
                );
            }
        }
        Ok(())
    }

    /// The paths in this layer, in the order they are written.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Writes the tar (GNU headers for long names, numeric ids only) and gzips it.
    pub fn build(self) -> Result<Layer> {
        let gzip = flate2::GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(Vec::new(), Compression::new(GZIP_LEVEL));
        let mut tar = tar::Builder::new(Hashing::new(gzip));
        tar.mode(tar::HeaderMode::Deterministic);
        let mut content_size = 0u64;
        for (path, entry) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(entry.mode);
            header.set_uid(entry.uid.into());
            header.set_gid(entry.gid.into());
            header.set_mtime(self.mtime);
            match &entry.kind {
                Kind::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{path}/"), io::empty())
                }
                Kind::Bytes(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    content_size += data.len() as u64;
                    tar.append_data(&mut header, path, data.as_slice())
                }
                Kind::FileAt(source) => {
                    let file = std::fs::File::open(source)
                        .with_context(|| format!("opening {}", source.display()))?;
                    let size = file.metadata()?.len();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(size);
                    content_size += size;
                    // Exactly `size` bytes, even if the file changes under us.
                    tar.append_data(&mut header, path, file.take(size))
                }
                Kind::Symlink(target) => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    tar.append_link(&mut header, path, target)
                }
            }
            .with_context(|| format!("adding {path} to the layer"))?;
        }
        let hashing = tar.into_inner().context("finishing the layer's tar")?;
        let (gzip, diff_id, tar_size) = hashing.finish();
        let blob = gzip.finish().context("finishing the layer's gzip")?;
        Ok(Layer {
            digest: sha256_digest(&blob),
            blob,
            diff_id,
            tar_size,
            content_size,
            created_by: self.created_by,
        })
    }
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{:x}", self.hasher.finalize());
        (self.inner, digest, self.count)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The runtime part of an image config (what `docker inspect` shows under `Config`), plus the
/// platform and creation time.
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    /// The command prefix (`Entrypoint`).
    pub entrypoint: Vec<String>,
    /// Default arguments (`Cmd`).
    pub cmd: Vec<String>,
    /// `NAME=value` environment entries.
    pub env: Vec<String>,
    /// `uid[:gid]` or a user name the container runs as; `None`: root.
    pub user: Option<String>,
    /// The working directory; `None`: `/`.
    pub working_dir: Option<String>,
    /// Image labels (`org.opencontainers.image.*` and others).
    pub labels: BTreeMap<String, String>,
    /// Ports documented as exposed, e.g. `9443/tcp`.
    pub exposed_ports: Vec<String>,
    /// The signal that stops the container, e.g. `SIGTERM`; `None`: the runtime's default.
    pub stop_signal: Option<String>,
    /// GOARCH-style architecture; `None`: this machine's.
    pub architecture: Option<String>,
    /// `created` as seconds since the epoch; `None`: [`source_date_epoch`].
    pub created: Option<u64>,
}

/// This machine's architecture as OCI names it.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl ImageConfig {
    /// The config blob (JSON) for these layers.
    pub fn to_json(&self, layers: &[Layer]) -> Result<Vec<u8>> {
        let created_secs = match self.created {
            Some(secs) => secs,
            None => source_date_epoch()?,
        };
        let created = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(created_secs),
        )
        .to_string();
        let mut config = serde_json::Map::new();
        if let Some(user) = &self.user {
            config.insert("User".into(), json!(user));
        }
        if !self.exposed_ports.is_empty() {
            let ports: serde_json::Map<String, Value> = self
                .exposed_ports
                .iter()
                .map(|port| (port.clone(), json!({})))
                .collect();
            config.insert("ExposedPorts".into(), Value::Object(ports));
        }
        if !self.env.is_empty() {
            config.insert("Env".into(), json!(self.env));
        }
        if !self.entrypoint.is_empty() {
            config.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            config.insert("Cmd".into(), json!(self.cmd));
        }
        if let Some(dir) = &self.working_dir {
            config.insert("WorkingDir".into(), json!(dir));
        }
        if !self.labels.is_empty() {
            config.insert("Labels".into(), json!(self.labels));
        }
        if let Some(signal) = &self.stop_signal {
            config.insert("StopSignal".into(), json!(signal));
        }
        let architecture = self
            .architecture
            .clone()
            .unwrap_or_else(|| host_architecture().to_owned());
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let history: Vec<Value> = layers
            .iter()
            .map(|l| json!({"created": created, "created_by": l.created_by}))
            .collect();
        let document = json!({
            "created": created,
            "architecture": architecture,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        Ok(serde_json::to_vec(&document)?)
    }
}

/// The tag of `reference` (`name:tag` → `tag`), or the whole reference if it has none.
pub fn tag_of(reference: &str) -> &str {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match last.split_once(':') {
        Some((_, tag)) if !last.contains('@') => tag,
        _ => reference,
    }
}

/// Writes `layers` (bottom first) and `config` as an OCI image-layout tar at `out` (atomically:
/// a temp file renamed), naming the image `reference` — give it fully qualified
/// (`localhost/name:tag`, `docker.io/library/name:tag`): containerd keeps the name as given.
/// Returns the manifest digest (`sha256:...`), the image's identity.
pub fn write_archive(
    layers: &[Layer],
    config: &ImageConfig,
    reference: &str,
    out: &Path,
) -> Result<String> {
    let config_blob = config.to_json(layers)?;
    let config_digest = sha256_digest(&config_blob);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_CONFIG,
            "digest": config_digest,
            "size": config_blob.len(),
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": MEDIA_TYPE_LAYER_GZIP,
            "digest": l.digest,
            "size": l.blob.len(),
        })).collect::<Vec<_>>(),
    });
    let manifest_blob = serde_json::to_vec(&manifest)?;
    let manifest_digest = sha256_digest(&manifest_blob);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [{
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_blob.len(),
            "annotations": {
                ANNOTATION_CONTAINERD_NAME: reference,
                ANNOTATION_REF_NAME: tag_of(reference),
            },
        }],
    });

    // Every file of the layout, sorted by path (BTreeMap), blobs deduplicated by digest.
    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    let index_blob = serde_json::to_vec(&index)?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    files.insert("oci-layout".into(), layout);
    files.insert("index.json".into(), &index_blob);
    let blob_path = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    files.insert(blob_path(&config_digest), &config_blob);
    files.insert(blob_path(&manifest_digest), &manifest_blob);
    for layer in layers {
        files.insert(blob_path(&layer.digest), &layer.blob);
    }

    let dir = out
        .parent()
        .with_context(|| format!("{} has no parent directory", out.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let mut tar = tar::Builder::new(io::BufWriter::new(temp));
    tar.mode(tar::HeaderMode::Deterministic);
    let mtime = source_date_epoch()?;
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_mtime(mtime);
        header.set_size(0);
        tar.append_data(&mut header, dir, io::empty())?;
    }
    for (path, data) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, path, *data)
            .with_context(|| format!("writing {path} into {}", out.display()))?;
    }
    let temp = tar
        .into_inner()
        .context("finishing the archive")?
        .into_inner()
        .map_err(|e| e.into_error())
        .context("flushing the archive")?;
    // A temp file is 0600; the archive is for others (an import as another user) too.
    use std::os::unix::fs::PermissionsExt;
    temp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    temp.as_file().sync_all()?;
    temp.persist(out)
        .with_context(|| format!("renaming the archive to {}", out.display()))?;
    Ok(manifest_digest)
}

/// An image read back from an archive by [`read_archive`]; every blob's digest was checked.
#[derive(Debug)]
pub struct ImageArchive {
    /// The index's image name annotation ([`ANNOTATION_CONTAINERD_NAME`]), if any.
    pub reference: Option<String>,
    /// `sha256:` of the manifest.
    pub manifest_digest: String,
    /// The manifest document.
    pub manifest: Value,
    /// The config document.
    pub config: Value,
    /// The layer blobs (gzipped tars), bottom first.
    pub layers: Vec<Vec<u8>>,
}

/// Reads an archive [`write_archive`] wrote (one manifest, gzip layers), verifying every blob
/// against its digest and the manifest's sizes and the config's diff_ids against the layers.
pub fn read_archive(path: &Path) -> Result<ImageArchive> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        files.insert(name, data);
    }
    let blob = |digest: &str| -> Result<&Vec<u8>> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("unsupported digest {digest}"))?;
        let data = files
            .get(&format!("blobs/sha256/{hex}"))
            .with_context(|| format!("blob {digest} missing"))?;
        ensure!(
            sha256_digest(data) == digest,
            "blob {digest} does not match its digest"
        );
        Ok(data)
    };
    let layout: Value = serde_json::from_slice(files.get("oci-layout").context("no oci-layout")?)?;
    ensure!(
        layout["imageLayoutVersion"] == "1.0.0",
        "unexpected oci-layout {layout}"
    );
    let index: Value = serde_json::from_slice(files.get("index.json").context("no index.json")?)?;
    let [descriptor] = index["manifests"]
        .as_array()
        .context("index.json has no manifests")?
        .as_slice()
    else {
        bail!("index.json should list exactly one manifest: {index}");
    };
    let manifest_digest = descriptor["digest"]
        .as_str()
        .context("manifest descriptor without digest")?
        .to_owned();
    let manifest_blob = blob(&manifest_digest)?;
    ensure!(
        descriptor["size"] == manifest_blob.len(),
        "manifest size mismatch"
    );
    let manifest: Value = serde_json::from_slice(manifest_blob)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("manifest without config digest")?;
    let config_blob = blob(config_digest)?;
    ensure!(
        manifest["config"]["size"] == config_blob.len(),
        "config size mismatch"
    );
    let config: Value = serde_json::from_slice(config_blob)?;
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .context("config without rootfs.diff_ids")?;
    let descriptors = manifest["layers"]
        .as_array()
        .context("manifest without layers")?;
    ensure!(
        descriptors.len() == diff_ids.len(),
        "layers and diff_ids differ in number"
    );
    let mut layers = Vec::new();
    for (descriptor, diff_id) in descriptors.iter().zip(diff_ids) {
        ensure!(
            descriptor["mediaType"] == MEDIA_TYPE_LAYER_GZIP,
            "unsupported layer {descriptor}"
        );
        let digest = descriptor["digest"]
            .as_str()
            .context("layer without digest")?;
        let data = blob(digest)?;
        ensure!(
            descriptor["size"] == data.len(),
            "layer {digest} size mismatch"
        );
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(data.as_slice()).read_to_end(&mut tar)?;
        ensure!(
            diff_id.as_str() == Some(sha256_digest(&tar).as_str()),
            "layer {digest} does not match its diff_id {diff_id}"
        );
        layers.push(data.clone());
    }
    Ok(ImageArchive {
        reference: descriptor["annotations"][ANNOTATION_CONTAINERD_NAME]
            .as_str()
            .map(str::to_owned),
        manifest_digest,
        manifest,
        config,
        layers,
    })
}

impl ImageArchive {
    /// Extracts the layers, bottom first, into `dest` (a rootfs): modes and ownership as
    /// recorded (ownership needs root), no whiteout handling (our layers have none).
    pub fn unpack(&self, dest: &Path) -> Result<()> {
        std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer.as_slice()));
            archive.set_preserve_permissions(true);
            archive.set_preserve_ownerships(true);
            archive.set_preserve_mtime(true);
            archive.set_unpack_xattrs(false);
            archive.set_overwrite(true);
            archive
                .unpack(dest)
                .with_context(|| format!("unpacking layer {i} into {}", dest.display()))?;
        }
        Ok(())
    }

    /// The config's runtime section (`config.config`).
    pub fn runtime_config(&self) -> &Value {
        &self.config["config"]
    }
}
