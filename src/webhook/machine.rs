//! Admission of `LibvirtMachine` and `LibvirtMachineTemplate`.

use std::collections::BTreeSet;

use super::admission::{AdmissionPolicy, Admit, Kind, RequestInfo, Verdict, quote};
use super::checks;
use crate::api::{
    ChecksumType, CpuMode, Firmware, ImageFormat, LibvirtMachine, LibvirtMachineSpec,
    LibvirtMachineTemplate, NicModel, TemplateMeta,
};
use crate::egress;

pub const MIN_VCPUS: i32 = 1;
pub const MAX_VCPUS: i32 = 255;
pub const MIN_MEMORY_MIB: i32 = 256;
pub const MAX_MEMORY_MIB: i32 = 4_194_304;
pub const MAX_DISK_GIB: i32 = 65_536;

/// Fills the machine defaults: CPU mode, firmware, image format, NIC model.
pub fn default_spec(spec: &mut LibvirtMachineSpec) {
    spec.cpu_mode.get_or_insert(CpuMode::HostPassthrough);
    spec.firmware.get_or_insert(Firmware::Bios);
    if spec.image.url.is_some() {
        spec.image.format.get_or_insert(ImageFormat::Qcow2);
    }
    for nic in spec.network_interfaces.iter_mut().flatten() {
        nic.model.get_or_insert(NicModel::Virtio);
    }
}

/// Every semantic rule of a machine spec; `at` is the spec's path (`spec`, `spec.template.spec`).
pub fn validate_spec(spec: &LibvirtMachineSpec, at: &str, v: &mut Verdict) {
    if let Some(id) = &spec.provider_id {
        if let Err(message) = checks::provider_id(id) {
            v.error(format!("{at}.providerID"), message);
        } else if !id.starts_with("libvirt://") {
            v.warn(
                format!("{at}.providerID"),
                "does not start with libvirt://, so it will not match the Node this provider boots",
            );
        }
    }
    if let Some(uuid) = &spec.domain_uuid {
        let canonical = uuid::Uuid::parse_str(uuid)
            .is_ok_and(|parsed| parsed.hyphenated().to_string() == *uuid);
        if !canonical {
            v.error(
                format!("{at}.domainUUID"),
                format!(
                    "must be a lowercase UUID (8-4-4-4-12 hex digits), got {}",
                    quote(uuid)
                ),
            );
        }
    }
    name(
        v,
        &format!("{at}.host"),
        spec.host.as_deref(),
        checks::dns_label,
    );
    range(v, &format!("{at}.vcpus"), spec.vcpus, MIN_VCPUS, MAX_VCPUS);
    if spec.vcpus == 1 {
        v.warn(
            format!("{at}.vcpus"),
            "kubeadm control planes need at least 2 vCPUs",
        );
    }
    range(
        v,
        &format!("{at}.memoryMiB"),
        spec.memory_mib,
        MIN_MEMORY_MIB,
        MAX_MEMORY_MIB,
    );
    if (MIN_MEMORY_MIB..2048).contains(&spec.memory_mib) {
        v.warn(
            format!("{at}.memoryMiB"),
            format!(
                "{} MiB is below the 2048 MiB a Kubernetes node needs in practice",
                spec.memory_mib
            ),
        );
    }
    validate_image(spec, at, v);
    let root = format!("{at}.rootVolume");
    range(
        v,
        &format!("{root}.sizeGiB"),
        spec.root_volume.size_gib,
        1,
        MAX_DISK_GIB,
    );
    if (1..20).contains(&spec.root_volume.size_gib) {
        v.warn(
            format!("{root}.sizeGiB"),
            "a node's root disk usually needs at least 20 GiB for container images and logs; it must also hold the image's virtual size",
        );
    }
    name(
        v,
        &format!("{root}.pool"),
        spec.root_volume.pool.as_deref(),
        checks::libvirt_name,
    );
    validate_data_volumes(spec, at, v);
    validate_interfaces(spec, at, v);
    validate_ssh_keys(spec, at, v);
}

fn validate_image(spec: &LibvirtMachineSpec, at: &str, v: &mut Verdict) {
    let image = &spec.image;
    let at = format!("{at}.image");
    match (&image.url, &image.volume) {
        (Some(_), Some(_)) | (None, None) => {
            v.error(&at, "exactly one of url or volume must be set");
        }
        _ => {}
    }
    if let Some(url) = &image.url {
        match egress::image_url(url) {
            Err(message) => v.error(format!("{at}.url"), message),
            Ok(parsed) if parsed.scheme() == "http" => v.warn(
                format!("{at}.url"),
                "uses plain http: the download is verified against the checksum, but not private",
            ),
            Ok(_) => {}
        }
        match &image.checksum {
            None => v.error(format!("{at}.checksum"), "is required with url"),
            Some(sum) => {
                let len = match sum.kind {
                    ChecksumType::Sha256 => 64,
                    ChecksumType::Sha512 => 128,
                };
                if let Err(message) = checks::checksum(sum.kind.as_str(), &sum.value, len) {
                    v.error(format!("{at}.checksum.value"), message);
                }
            }
        }
    } else if image.checksum.is_some() || image.format.is_some() {
        v.error(&at, "checksum and format apply only to url");
    }
    if let Some(volume) = &image.volume {
        name(
            v,
            &format!("{at}.volume.pool"),
            Some(&volume.pool),
            checks::libvirt_name,
        );
        name(
            v,
            &format!("{at}.volume.name"),
            Some(&volume.name),
            checks::volume_name,
        );
    }
}

fn validate_data_volumes(spec: &LibvirtMachineSpec, at: &str, v: &mut Verdict) {
    let volumes = spec.data_volumes.as_deref().unwrap_or_default();
    if volumes.len() > 16 {
        v.error(
            format!("{at}.dataVolumes"),
            format!("must have at most 16 items, got {}", volumes.len()),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, volume) in volumes.iter().enumerate() {
        let here = format!("{at}.dataVolumes[{i}]");
        name(
            v,
            &format!("{here}.name"),
            Some(&volume.name),
            checks::dns_label,
        );
        if !seen.insert(volume.name.as_str()) {
            v.error(
                format!("{here}.name"),
                format!("duplicate data volume name {}", quote(&volume.name)),
            );
        }
        range(
            v,
            &format!("{here}.sizeGiB"),
            volume.size_gib,
            1,
            MAX_DISK_GIB,
        );
        name(
            v,
            &format!("{here}.pool"),
            volume.pool.as_deref(),
            checks::libvirt_name,
        );
    }
}

fn validate_interfaces(spec: &LibvirtMachineSpec, at: &str, v: &mut Verdict) {
    let nics = spec.network_interfaces.as_deref().unwrap_or_default();
    if nics.len() > 8 {
        v.error(
            format!("{at}.networkInterfaces"),
            format!("must have at most 8 items, got {}", nics.len()),
        );
    }
    let (mut names, mut macs) = (BTreeSet::new(), BTreeSet::new());
    for (i, nic) in nics.iter().enumerate() {
        let here = format!("{at}.networkInterfaces[{i}]");
        let name_ok = !nic.name.is_empty()
            && nic.name.len() <= 15
            && nic.name.starts_with(|c: char| c.is_ascii_lowercase())
            && nic
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            v.error(
                format!("{here}.name"),
                format!(
                    "must be 1-15 lowercase letters, digits or '-', starting with a letter, got {}",
                    quote(&nic.name)
                ),
            );
        }
        if !names.insert(nic.name.as_str()) {
            v.error(
                format!("{here}.name"),
                format!("duplicate interface name {}", quote(&nic.name)),
            );
        }
        // Neither: the interface takes the LibvirtCluster's network.
        if nic.network.is_some() && nic.bridge.is_some() {
            v.error(
                &here,
                "at most one of network or bridge may be set (neither means the LibvirtCluster's network)",
            );
        }
        name(
            v,
            &format!("{here}.network"),
            nic.network.as_deref(),
            checks::libvirt_name,
        );
        if let Some(bridge) = &nic.bridge
            && (bridge.len() > 15 || checks::libvirt_name(bridge).is_err())
        {
            v.error(
                format!("{here}.bridge"),
                format!(
                    "must be a Linux interface name (1-15 letters, digits, '_', '.', '-'), got {}",
                    quote(bridge)
                ),
            );
        }
        if let Some(mac) = &nic.mac_address {
            match checks::mac(mac) {
                Err(message) => v.error(format!("{here}.macAddress"), message),
                Ok(bytes) => {
                    if !macs.insert(bytes) {
                        v.error(
                            format!("{here}.macAddress"),
                            format!("duplicate MAC address {}", quote(mac)),
                        );
                    }
                    if !checks::locally_administered(bytes) {
                        v.warn(
                            format!("{here}.macAddress"),
                            "is a vendor-assigned (globally administered) address and may collide with real hardware",
                        );
                    }
                }
            }
        }
    }
}

fn validate_ssh_keys(spec: &LibvirtMachineSpec, at: &str, v: &mut Verdict) {
    let keys = spec.ssh_authorized_keys.as_deref().unwrap_or_default();
    if keys.len() > 32 {
        v.error(
            format!("{at}.sshAuthorizedKeys"),
            format!("must have at most 32 items, got {}", keys.len()),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, key) in keys.iter().enumerate() {
        let here = format!("{at}.sshAuthorizedKeys[{i}]");
        match checks::ssh_key(key) {
            Err(message) => v.error(&here, message),
            Ok("ssh-dss") => v.warn(&here, "DSA keys are refused by OpenSSH 7.0 and later"),
            Ok(_) => {}
        }
        if !seen.insert(key.split(' ').take(2).collect::<Vec<_>>()) {
            v.warn(&here, "duplicates an earlier key");
        }
    }
}

/// Fields of two specs whose JSON differs (top-level keys), in key order.
pub fn changed_fields(old: &impl serde::Serialize, new: &impl serde::Serialize) -> Vec<String> {
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec!["<unencodable>".into()];
    };
    let empty = serde_json::Map::new();
    let (old, new) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

fn range(v: &mut Verdict, path: &str, value: i32, min: i32, max: i32) {
    if value < min {
        v.error(path, format!("must be at least {min}, got {value}"));
    } else if value > max {
        v.error(path, format!("must be at most {max}, got {value}"));
    }
}

fn name(v: &mut Verdict, path: &str, value: Option<&str>, check: fn(&str) -> Result<(), String>) {
    if let Some(Err(message)) = value.map(check) {
        v.error(path, message);
    }
}

impl Admit for LibvirtMachine {
    const KIND: Kind = Kind::LibvirtMachine;

    fn apply_defaults(&mut self) {
        default_spec(&mut self.spec);
    }

    fn validate(&self, _policy: &AdmissionPolicy, v: &mut Verdict) {
        validate_spec(&self.spec, "spec", v);
    }

    fn validate_update(&self, old: &Self, _info: &RequestInfo, v: &mut Verdict) {
        for (field, old_value, new_value) in [
            ("providerID", &old.spec.provider_id, &self.spec.provider_id),
            ("domainUUID", &old.spec.domain_uuid, &self.spec.domain_uuid),
            ("host", &old.spec.host, &self.spec.host),
        ] {
            if let Some(old_value) = old_value
                && new_value.as_ref() != Some(old_value)
            {
                v.error(
                    format!("spec.{field}"),
                    format!(
                        "can be set once and never changed (was {})",
                        quote(old_value)
                    ),
                );
            }
        }
        for field in changed_fields(&old.spec, &self.spec) {
            if !SET_ONCE_FIELDS.contains(&field.as_str()) {
                v.error(
                    format!("spec.{field}"),
                    "is immutable: Cluster API replaces machines instead of changing them",
                );
            }
        }
    }
}

/// Machine fields the provider sets once on each machine; every other spec field is immutable.
const SET_ONCE_FIELDS: [&str; 3] = ["providerID", "domainUUID", "host"];

impl Admit for LibvirtMachineTemplate {
    const KIND: Kind = Kind::LibvirtMachineTemplate;

    fn apply_defaults(&mut self) {
        default_spec(&mut self.spec.template.spec);
    }

    fn validate(&self, _policy: &AdmissionPolicy, v: &mut Verdict) {
        validate_template_meta(self.spec.template.metadata.as_ref(), v);
        validate_spec(&self.spec.template.spec, "spec.template.spec", v);
        let spec = &self.spec.template.spec;
        for (field, set) in [
            ("providerID", spec.provider_id.is_some()),
            ("domainUUID", spec.domain_uuid.is_some()),
            ("host", spec.host.is_some()),
        ] {
            if set {
                v.error(
                    format!("spec.template.spec.{field}"),
                    "is set by the provider on each machine; a template must leave it empty",
                );
            }
        }
    }

    fn validate_update(&self, old: &Self, info: &RequestInfo, v: &mut Verdict) {
        template_immutable(&old.spec.template, &self.spec.template, info, v);
    }
}

/// A template's `spec.template.metadata`, validated as Kubernetes validates an object's labels and
/// annotations: every object stamped from the template carries them, so a bad one would make
/// every stamp fail.
pub fn validate_template_meta(meta: Option<&TemplateMeta>, v: &mut Verdict) {
    let Some(meta) = meta else { return };
    let at = "spec.template.metadata";
    for (field, map, errors) in [
        (
            "labels",
            &meta.labels,
            meta.labels.as_ref().map(checks::labels),
        ),
        (
            "annotations",
            &meta.annotations,
            meta.annotations.as_ref().map(checks::annotations),
        ),
    ] {
        let count = map.as_ref().map_or(0, |m| m.len());
        if count > checks::MAX_TEMPLATE_METADATA_ENTRIES {
            v.error(
                format!("{at}.{field}"),
                format!(
                    "must have at most {} entries, got {count}",
                    checks::MAX_TEMPLATE_METADATA_ENTRIES
                ),
            );
        }
        for (value, message) in errors.unwrap_or_default() {
            let message = if value.is_empty() {
                message
            } else {
                format!("Invalid value: {}: {message}", quote(&value))
            };
            v.error(format!("{at}.{field}"), message);
        }
    }
}

/// A template's `spec.template` never changes, except in Cluster API's topology dry-runs (a
/// server-side-apply dry-run carrying the topology annotation), which must pass or every
/// ClusterClass rebase would wedge.
pub fn template_immutable<T: serde::Serialize + PartialEq>(
    old: &T,
    new: &T,
    info: &RequestInfo,
    v: &mut Verdict,
) {
    if old == new || (info.dry_run && info.topology_dry_run) {
        return;
    }
    let (Ok(old), Ok(new)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        v.error("spec.template", "is immutable");
        return;
    };
    for part in ["metadata", "spec"] {
        let (o, n) = (&old[part], &new[part]);
        let fields = if part == "spec" {
            changed_fields(o, n)
        } else if o != n {
            vec![String::new()]
        } else {
            vec![]
        };
        for field in fields {
            let path = if field.is_empty() {
                format!("spec.template.{part}")
            } else {
                format!("spec.template.{part}.{field}")
            };
            v.error(
                path,
                "is immutable: create a new template and point the owning object (MachineDeployment, control plane or ClusterClass) at it",
            );
        }
    }
}
