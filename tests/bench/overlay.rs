//! Root-disk creation cost against base image size: a qcow2 overlay on the base (what the
//! provider does) versus a full copy of the base, on a real libvirtd (in its own network
//! namespace). `cargo bench --bench overlay`.

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use capl::libvirt::xml::VolumePlan;
use support::libvirtd::Libvirtd;
use support::process::Lifetime;

const REPEATS: u32 = 5;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("overlay benchmark: run it with `cargo bench --bench overlay`");
        return;
    }
    let temp = tempfile::Builder::new()
        .prefix("capl-bench-")
        .tempdir()
        .expect("temp dir");
    let libvirtd =
        Libvirtd::start(&temp.path().join("libvirt"), Lifetime::TestProcess).expect("libvirtd");
    let host = libvirtd.connect().expect("connect");
    let pool_dir = libvirtd.images().join("pool");
    std::fs::create_dir_all(&pool_dir).expect("pool dir");
    let pool = host
        .connection()
        .define_storage_pool_xml(
            &format!(
                "<pool type='dir'><name>bench</name><target><path>{}</path></target></pool>",
                pool_dir.display()
            ),
            0,
        )
        .expect("pool");
    pool.create(0).expect("start pool");

    println!(
        "{:>10} {:>16} {:>16}",
        "base MiB", "overlay (median)", "full copy"
    );
    for mib in [16u64, 256, 2048] {
        let base = pool_dir.join(format!("base-{mib}.raw"));
        let out = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none", "conv=fsync"])
            .arg(format!("of={}", base.display()))
            .arg(format!("count={mib}"))
            .output()
            .expect("dd");
        assert!(out.status.success());
        pool.refresh(0).expect("refresh");
        let mut overlay = Vec::new();
        for i in 0..REPEATS {
            let name = format!("overlay-{mib}-{i}.qcow2");
            let xml = VolumePlan {
                name: name.clone(),
                capacity_gib: 20,
                format: "qcow2".into(),
                backing: Some((base.display().to_string(), "raw".into())),
            }
            .to_xml()
            .expect("xml");
            let start = Instant::now();
            host.ensure_volume("bench", &name, &xml).expect("overlay");
            overlay.push(start.elapsed());
            host.delete_volume("bench", &name).expect("delete");
        }
        overlay.sort();
        let source = pool
            .lookup_storage_vol_by_name(&format!("base-{mib}.raw"))
            .expect("base volume");
        let start = Instant::now();
        let copy = virt::storage_vol::StorageVol::create_xml_from(
            &pool,
            &format!("<volume><name>copy-{mib}.raw</name><capacity unit='MiB'>{mib}</capacity><target><format type='raw'/></target></volume>"),
            &source,
            0,
        )
        .expect("full copy");
        let copied = start.elapsed();
        copy.delete(0).expect("delete copy");
        println!(
            "{mib:>10} {:>13.1} ms {:>13.1} ms",
            ms(overlay[overlay.len() / 2]),
            ms(copied)
        );
        std::fs::remove_file(&base).expect("remove base");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
