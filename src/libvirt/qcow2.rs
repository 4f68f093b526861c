//! The first bytes of a disk image, checked before it may back a machine's root disk.
//!
//! QEMU follows whatever a qcow2 header names: a backing file, an external data file. A user who
//! can choose a base image could name a host file there and read it from inside the guest. So a
//! base image must be exactly the format it claims: a qcow2 image without a backing file, data
//! file, encryption or features this check does not know; or raw content that does not start
//! like another image format (tools that probe the format, libvirt's storage pools among them,
//! would otherwise read it as that format and follow its references).
//!
//! Layout from QEMU's `docs/interop/qcow2.txt`; all numbers are big-endian.

use crate::api::ImageFormat;

/// How many bytes from the start of an image [`check`] needs: the header and its extensions
/// (they end within the first cluster, in practice within the first few hundred bytes).
pub const HEAD_BYTES: usize = 64 * 1024;

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// Header length of version 2; version 3 stores its own (at least 104).
const V2_HEADER_LENGTH: u64 = 72;
const V3_MIN_HEADER_LENGTH: u64 = 104;

/// Incompatible feature bit 2: guest data lives in an external file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 1: QEMU found the image corrupt.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Every incompatible feature bit this check knows (dirty, corrupt, data file, compression type,
/// extended L2 entries).
const INCOMPAT_KNOWN: u64 = 0b1_1111;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Formats whose headers may name other files (or that tools would probe as such), by the
/// magic bytes at an offset.
const FOREIGN_MAGIC: &[(usize, &[u8], &str)] = &[
    (0, QCOW2_MAGIC, "qcow"),
    (0, b"QED\0", "QED"),
    (0, b"KDMV", "VMDK"),
    (0, b"COWD", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK descriptor"),
    (0, b"conectix", "VHD"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"OOOM", "COW"),
    (0, b"WithoutFreeSpace", "Parallels"),
    (0, b"WithouFreSpacExt", "Parallels"),
    (0, b"Bochs Virtual HD Image", "Bochs"),
    (64, b"\x7f\x10\xda\xbe", "VDI"),
];

/// Why an image's header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Declared qcow2, but the content is not.
    #[error("it is declared qcow2 but does not start with the qcow2 magic")]
    NotQcow2,
    /// Declared raw, but the content starts like another format.
    #[error("it is declared raw but starts with a {0} header")]
    NotRaw(&'static str),
    /// A qcow2 version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    Version(u32),
    /// The content ends inside the header or its extensions.
    #[error("the qcow2 header is truncated")]
    Truncated,
    /// A header field outside the range QEMU accepts.
    #[error("qcow2 header field {field} is out of range ({value})")]
    OutOfRange {
        /// The field's name in the qcow2 specification.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The header names a backing file (or its format).
    #[error("it names a backing file, through which a guest could read host files")]
    BackingFile,
    /// The header names an external data file.
    #[error("it uses an external data file, through which a guest could read host files")]
    DataFile,
    /// The image is encrypted (QEMU would need a secret to open it).
    #[error("it is encrypted (method {0})")]
    Encrypted(u32),
    /// QEMU marked the image corrupt.
    #[error("it is marked corrupt")]
    Corrupt,
    /// Incompatible feature bits this check does not know.
    #[error("it uses unknown incompatible qcow2 features ({0:#x})")]
    UnknownFeatures(u64),
}

/// Checks that `head` (the first [`HEAD_BYTES`] of an image, or all of a shorter one) is a safe
/// base image of the `declared` format.
pub fn check(head: &[u8], declared: ImageFormat) -> Result<(), HeaderError> {
    match declared {
        ImageFormat::Qcow2 => check_qcow2(head),
        ImageFormat::Raw => check_raw(head),
    }
}

fn check_raw(head: &[u8]) -> Result<(), HeaderError> {
    for (offset, magic, format) in FOREIGN_MAGIC {
        if head.get(*offset..offset + magic.len()) == Some(*magic) {
            return Err(HeaderError::NotRaw(format));
        }
    }
    Ok(())
}

fn check_qcow2(head: &[u8]) -> Result<(), HeaderError> {
    if head.get(..4) != Some(QCOW2_MAGIC) {
        return Err(HeaderError::NotQcow2);
    }
    let version = be32(head, 4)?;
    if version != 2 && version != 3 {
        return Err(HeaderError::Version(version));
    }
    // QEMU opens a backing file whenever the offset is set; refuse any trace of one.
    if be64(head, 8)? != 0 || be32(head, 16)? != 0 {
        return Err(HeaderError::BackingFile);
    }
    let cluster_bits = be32(head, 20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(out_of_range("cluster_bits", cluster_bits.into()));
    }
    let cluster_size = 1u64 << cluster_bits;
    let crypt_method = be32(head, 32)?;
    if crypt_method != 0 {
        return Err(HeaderError::Encrypted(crypt_method));
    }

    let header_length = if version == 2 {
        V2_HEADER_LENGTH
    } else {
        let incompatible = be64(head, 72)?;
        if incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(HeaderError::DataFile);
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(HeaderError::Corrupt);
        }
        if incompatible & !INCOMPAT_KNOWN != 0 {
            return Err(HeaderError::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
        }
        let refcount_order = be32(head, 96)?;
        if refcount_order > 6 {
            return Err(out_of_range("refcount_order", refcount_order.into()));
        }
        let length = u64::from(be32(head, 100)?);
        if length < V3_MIN_HEADER_LENGTH || length % 8 != 0 || length > cluster_size {
            return Err(out_of_range("header_length", length));
        }
        length
    };
    check_extensions(head, header_length, cluster_size)
}

/// Walks the header extensions (type, length, data padded to 8 bytes) up to the end marker.
/// They must end within the first cluster, as QEMU requires.
fn check_extensions(head: &[u8], start: u64, cluster_size: u64) -> Result<(), HeaderError> {
    let mut offset = start;
    loop {
        if offset + 8 > cluster_size {
            return Err(out_of_range("header extensions", offset));
        }
        let at = usize::try_from(offset).map_err(|_| HeaderError::Truncated)?;
        let kind = be32(head, at)?;
        let length = u64::from(be32(head, at + 4)?);
        match kind {
            EXT_END => return Ok(()),
            EXT_DATA_FILE => return Err(HeaderError::DataFile),
            EXT_BACKING_FORMAT => return Err(HeaderError::BackingFile),
            _ => {}
        }
        offset += 8 + length.div_ceil(8) * 8;
        if offset > cluster_size {
            return Err(out_of_range("header extension length", length));
        }
    }
}

fn out_of_range(field: &'static str, value: u64) -> HeaderError {
    HeaderError::OutOfRange { field, value }
}

fn be32(head: &[u8], at: usize) -> Result<u32, HeaderError> {
    let bytes = head.get(at..at + 4).ok_or(HeaderError::Truncated)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    Ok(u32::from_be_bytes(word))
}

fn be64(head: &[u8], at: usize) -> Result<u64, HeaderError> {
    let bytes = head.get(at..at + 8).ok_or(HeaderError::Truncated)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    Ok(u64::from_be_bytes(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal, valid version-3 header with 64 KiB clusters and no extensions.
    fn v3() -> Vec<u8> {
        let mut head = vec![0u8; 512];
        head[..4].copy_from_slice(QCOW2_MAGIC);
        head[4..8].copy_from_slice(&3u32.to_be_bytes());
        head[20..24].copy_from_slice(&16u32.to_be_bytes());
        head[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        head[96..100].copy_from_slice(&4u32.to_be_bytes());
        head[100..104].copy_from_slice(&112u32.to_be_bytes());
        head
    }

    fn with_extension(mut head: Vec<u8>, kind: u32, data: &[u8]) -> Vec<u8> {
        head[112..116].copy_from_slice(&kind.to_be_bytes());
        head[116..120].copy_from_slice(&(data.len() as u32).to_be_bytes());
        head[120..120 + data.len()].copy_from_slice(data);
        head
    }

    #[test]
    fn a_plain_qcow2_header_passes() {
        assert_eq!(check(&v3(), ImageFormat::Qcow2), Ok(()));
        let unknown = with_extension(v3(), 0x6803_f857, b"feature table");
        assert_eq!(check(&unknown, ImageFormat::Qcow2), Ok(()));
    }

    #[test]
    fn backing_and_data_files_are_refused_in_every_place() {
        let mut backing = v3();
        backing[8..16].copy_from_slice(&512u64.to_be_bytes());
        assert_eq!(
            check(&backing, ImageFormat::Qcow2),
            Err(HeaderError::BackingFile)
        );
        let mut backing_size = v3();
        backing_size[16..20].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            check(&backing_size, ImageFormat::Qcow2),
            Err(HeaderError::BackingFile)
        );
        let format = with_extension(v3(), EXT_BACKING_FORMAT, b"raw");
        assert_eq!(
            check(&format, ImageFormat::Qcow2),
            Err(HeaderError::BackingFile)
        );
        let mut bit = v3();
        bit[79] |= INCOMPAT_DATA_FILE as u8;
        assert_eq!(check(&bit, ImageFormat::Qcow2), Err(HeaderError::DataFile));
        let name = with_extension(v3(), EXT_DATA_FILE, b"/etc/shadow");
        assert_eq!(check(&name, ImageFormat::Qcow2), Err(HeaderError::DataFile));
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(check(b"", ImageFormat::Qcow2), Err(HeaderError::NotQcow2));
        assert_eq!(
            check(&v3()[..90], ImageFormat::Qcow2),
            Err(HeaderError::Truncated)
        );
        let mut version = v3();
        version[7] = 4;
        assert_eq!(
            check(&version, ImageFormat::Qcow2),
            Err(HeaderError::Version(4))
        );
        let mut clusters = v3();
        clusters[23] = 40;
        assert!(matches!(
            check(&clusters, ImageFormat::Qcow2),
            Err(HeaderError::OutOfRange {
                field: "cluster_bits",
                ..
            })
        ));
        let mut length = v3();
        length[103] = 105;
        assert!(matches!(
            check(&length, ImageFormat::Qcow2),
            Err(HeaderError::OutOfRange {
                field: "header_length",
                ..
            })
        ));
        let huge = with_extension(v3(), 0x1234, b"");
        let mut huge = huge;
        huge[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            check(&huge, ImageFormat::Qcow2),
            Err(HeaderError::OutOfRange { .. })
        ));
        let mut crypt = v3();
        crypt[35] = 2;
        assert_eq!(
            check(&crypt, ImageFormat::Qcow2),
            Err(HeaderError::Encrypted(2))
        );
        let mut unknown = v3();
        unknown[78] = 1;
        assert_eq!(
            check(&unknown, ImageFormat::Qcow2),
            Err(HeaderError::UnknownFeatures(1 << 8))
        );
        // Extensions that never end before the data we have.
        let mut endless = v3();
        for chunk in endless[112..].chunks_mut(8) {
            chunk[..4].copy_from_slice(&7u32.to_be_bytes());
        }
        assert_eq!(
            check(&endless, ImageFormat::Qcow2),
            Err(HeaderError::Truncated)
        );
    }

    #[test]
    fn raw_content_that_looks_like_another_format_is_refused() {
        assert_eq!(check(&[0u8; 4096], ImageFormat::Raw), Ok(()));
        assert_eq!(check(b"", ImageFormat::Raw), Ok(()));
        assert_eq!(
            check(&v3(), ImageFormat::Raw),
            Err(HeaderError::NotRaw("qcow"))
        );
        assert_eq!(
            check(
                b"# Disk DescriptorFile\nparentFileNameHint=\"/etc/shadow\"",
                ImageFormat::Raw
            ),
            Err(HeaderError::NotRaw("VMDK descriptor"))
        );
        let mut vdi = vec![0u8; 128];
        vdi[64..68].copy_from_slice(b"\x7f\x10\xda\xbe");
        assert_eq!(
            check(&vdi, ImageFormat::Raw),
            Err(HeaderError::NotRaw("VDI"))
        );
        assert_eq!(
            check(b"QED\0....", ImageFormat::Raw),
            Err(HeaderError::NotRaw("QED"))
        );
    }
}
