# TEMPORARY (until tests/support/oci.rs lands): writes a one-layer OCI image archive.
import hashlib, io, json, sys, tarfile, os
binary, ref, out = sys.argv[1:4]
def blob(tf, data):
    d = hashlib.sha256(data).hexdigest()
    ti = tarfile.TarInfo("blobs/sha256/" + d); ti.size = len(data); ti.mtime = 0
    tf.addfile(ti, io.BytesIO(data)); return "sha256:" + d, len(data)
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as lt:
    data = open(binary, "rb").read()
    ti = tarfile.TarInfo(os.path.basename(binary)); ti.size = len(data); ti.mode = 0o755; ti.mtime = 0
    lt.addfile(ti, io.BytesIO(data))
layer = layer.getvalue()
with tarfile.open(out, "w") as tf:
    ld, ls = blob(tf, layer)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/" + os.path.basename(binary)]},
        "rootfs": {"type": "layers", "diff_ids": [ld]}}).encode()
    cd, cs = blob(tf, cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]}).encode()
    md, ms = blob(tf, man)
    idx = json.dumps({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms, "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref}}]}).encode()
    for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", idx)]:
        ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
