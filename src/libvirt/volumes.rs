//! Storage volumes: create from a plan, upload content through a libvirt stream (so it works on
//! remote hosts too), download a file's tail, report pool space.

use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::machine::is_not_found;
use super::{Error, Host, Result};

/// Free and total bytes of a storage pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpace {
    /// Total bytes.
    pub capacity: u64,
    /// Free bytes.
    pub available: u64,
}

impl Host {
    fn pool(&self, name: &str) -> Result<StoragePool> {
        self.connection()
            .lookup_storage_pool_by_name(name)
            .map_err(|error| self.call("virStoragePoolLookupByName", error))
    }

    fn volume(&self, pool: &str, name: &str) -> Result<Option<StorageVol>> {
        match self.pool(pool)?.lookup_storage_vol_by_name(name) {
            Ok(vol) => Ok(Some(vol)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(error) => Err(self.call("virStorageVolLookupByName", error)),
        }
    }

    /// Creates a volume from XML in `pool` unless one of that name exists.
    pub fn ensure_volume(&self, pool: &str, name: &str, xml: &str) -> Result<()> {
        if self.volume(pool, name)?.is_some() {
            return Ok(());
        }
        StorageVol::create_xml(&self.pool(pool)?, xml, 0)
            .map(|_| ())
            .map_err(|error| self.call("virStorageVolCreateXML", error))
    }

    /// Deletes one volume; a missing volume or pool is fine.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        let volume = match self.volume(pool, name) {
            Ok(Some(volume)) => volume,
            Ok(None) => return Ok(()),
            Err(error) if error.is_not_found() => return Ok(()),
            Err(error) => return Err(error),
        };
        match volume.delete(0) {
            Err(e) if !is_not_found(&e) => Err(self.call("virStorageVolDelete", e)),
            _ => Ok(()),
        }
    }

    /// Whether `pool` holds a volume called `name`.
    pub fn volume_exists(&self, pool: &str, name: &str) -> Result<bool> {
        Ok(self.volume(pool, name)?.is_some())
    }

    /// Host path of a volume (what QEMU opens; also the backing path of overlays).
    pub fn volume_path(&self, pool: &str, name: &str) -> Result<String> {
        let vol = self
            .volume(pool, name)?
            .ok_or_else(|| Error::Missing(format!("volume {pool}/{name}")))?;
        vol.path()
            .map_err(|error| self.call("virStorageVolGetPath", error))
    }

    /// Writes `chunks` into the existing volume `pool/name` from offset 0, streaming: at most a
    /// few chunks are in memory at any time. Fails on drivers without volume upload (the test
    /// driver), saying so.
    pub fn upload(
        &self,
        pool: &str,
        name: &str,
        chunks: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<u64> {
        let vol = self
            .volume(pool, name)?
            .ok_or_else(|| Error::Missing(format!("volume {pool}/{name}")))?;
        let stream =
            Stream::new(self.connection(), 0).map_err(|error| self.call("virStreamNew", error))?;
        vol.upload(&stream, 0, 0, 0).map_err(|error| {
            if self.is_test_driver() {
                Error::Unsupported(format!(
                    "volume upload on {}: the test driver cannot store volume content; use a real libvirtd",
                    self.uri()
                ))
            } else {
                self.call("virStorageVolUpload", error)
            }
        })?;
        let mut written = 0u64;
        for chunk in chunks {
            let mut rest = chunk.as_slice();
            while !rest.is_empty() {
                match stream.send(rest) {
                    Ok(n) if n > 0 => {
                        let n = n as usize;
                        rest = &rest[n..];
                        written += n as u64;
                    }
                    Ok(_) => continue,
                    Err(error) => {
                        let _ = stream.abort();
                        return Err(self.call("virStreamSend", error));
                    }
                }
            }
        }
        stream
            .finish()
            .map_err(|error| self.call("virStreamFinish", error))?;
        Ok(written)
    }

    /// Creates `pool/name` from `xml` (replacing an existing one) and uploads `bytes` into it.
    pub fn replace_volume_with(
        &self,
        pool: &str,
        name: &str,
        xml: &str,
        bytes: Vec<u8>,
    ) -> Result<()> {
        self.delete_volume(pool, name)?;
        self.ensure_volume(pool, name, xml)?;
        self.upload(pool, name, [bytes]).map(|_| ())
    }

    /// The last `max` bytes of a volume (e.g. a serial console log kept in a pool).
    pub fn download_tail(&self, pool: &str, name: &str, max: u64) -> Result<Vec<u8>> {
        let Some(vol) = self.volume(pool, name)? else {
            return Ok(Vec::new());
        };
        self.tail_of(&vol, max)
    }

    /// The last `max` bytes of the volume at host path `path`; empty when no pool holds it
    /// (pools are refreshed once to pick up files QEMU created).
    pub fn download_tail_at(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let lookup = || match self.connection().lookup_storage_vol_by_path(path) {
            Ok(vol) => Ok(Some(vol)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(error) => Err(self.call("virStorageVolLookupByPath", error)),
        };
        let vol = match lookup()? {
            Some(vol) => Some(vol),
            None => {
                self.refresh_active_pools()?;
                lookup()?
            }
        };
        match vol {
            Some(vol) => self.tail_of(&vol, max),
            None => Ok(Vec::new()),
        }
    }

    /// Refreshes every active pool (files created behind libvirt's back become volumes).
    pub fn refresh_active_pools(&self) -> Result<()> {
        let pools = self
            .connection()
            .list_all_storage_pools(sys::VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
            .map_err(|error| self.call("virConnectListAllStoragePools", error))?;
        for pool in pools {
            match pool.refresh(0) {
                Err(e) if super::machine::is_busy(&e) => {
                    tracing::debug!(uri = self.uri(), error = %e, "pool busy; not refreshed");
                }
                Err(e) if !is_not_found(&e) => {
                    return Err(self.call("virStoragePoolRefresh", e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn tail_of(&self, vol: &StorageVol, max: u64) -> Result<Vec<u8>> {
        let size = vol
            .info()
            .map_err(|error| self.call("virStorageVolGetInfo", error))?
            .capacity;
        let offset = size.saturating_sub(max);
        let stream =
            Stream::new(self.connection(), 0).map_err(|error| self.call("virStreamNew", error))?;
        vol.download(&stream, offset, size - offset, 0)
            .map_err(|error| self.call("virStorageVolDownload", error))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n as usize]),
                Ok(_) => continue,
                Err(error) => {
                    let _ = stream.abort();
                    return Err(self.call("virStreamRecv", error));
                }
            }
        }
        stream
            .finish()
            .map_err(|error| self.call("virStreamFinish", error))?;
        Ok(out)
    }

    /// Capacity and free space of a pool (placement input).
    pub fn pool_space(&self, pool: &str) -> Result<PoolSpace> {
        let info = self
            .pool(pool)?
            .info()
            .map_err(|error| self.call("virStoragePoolGetInfo", error))?;
        Ok(PoolSpace {
            capacity: info.capacity,
            available: info.available,
        })
    }

    /// Whether this is libvirt's in-process test driver (no volume content, no DHCP, no agent).
    pub fn is_test_driver(&self) -> bool {
        self.uri().starts_with("test:")
    }
}
