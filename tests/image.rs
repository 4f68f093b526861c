//! The base-image pipeline against the bed's real libvirtd: download rules (loopback, metadata,
//! redirects, resolved addresses), limits, proxies from the environment, header checks of URL
//! images and existing volumes, and replicas sharing a pool.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use capl::api::{ChecksumType, ImageFormat};
use capl::libvirt::Host;
use capl::libvirt::hosts::Hosts;
use capl::libvirt::image::{Error as ImageError, ImageCache, ImageRequest, ImageSettings};
use capl::libvirt::qcow2::HeaderError;
use support::libvirtd::{bed_pool, qcow2, qemu_img};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the test server answers.
#[derive(Clone)]
enum Reply {
    /// The bytes, with or without a Content-Length, in four parts `pause` apart.
    Body {
        bytes: Arc<Vec<u8>>,
        length: bool,
        pause: Duration,
    },
    /// 302 to the location.
    Redirect(String),
    /// An empty answer with this status.
    Status(u16),
    /// Headers promising a body that never comes.
    Stall,
}

fn body(bytes: &[u8]) -> Reply {
    Reply::Body {
        bytes: Arc::new(bytes.to_vec()),
        length: true,
        pause: Duration::ZERO,
    }
}

/// A minimal HTTP/1 server on `ip` (a loopback address) answering each request by its path;
/// returns its address and a request counter.
async fn serve(
    ip: &str,
    respond: impl Fn(&str) -> Reply + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let (counter, respond) = (hits.clone(), Arc::new(respond));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (counter, respond) = (counter.clone(), respond.clone());
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let _ = answer(&mut stream, respond(&path)).await;
            });
        }
    });
    (addr, hits)
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

async fn answer(stream: &mut tokio::net::TcpStream, reply: Reply) -> std::io::Result<()> {
    match reply {
        Reply::Body {
            bytes,
            length,
            pause,
        } => {
            let length = if length {
                format!("Content-Length: {}\r\n", bytes.len())
            } else {
                String::new()
            };
            let head = format!("HTTP/1.1 200 OK\r\n{length}Connection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            for part in bytes.chunks(bytes.len().div_ceil(4).max(1)) {
                tokio::time::sleep(pause).await;
                stream.write_all(part).await?;
            }
            stream.shutdown().await
        }
        Reply::Redirect(to) => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await
        }
        Reply::Status(status) => {
            let head = format!(
                "HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await
        }
        Reply::Stall => {
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n";
            stream.write_all(head.as_bytes()).await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
    }
}

/// A forwarding HTTP/1 proxy on loopback (absolute-form requests only) that counts requests.
async fn proxy() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut client).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let (line, rest) = head.split_once("\r\n").expect("request line");
                let mut parts = line.split(' ');
                let (method, target) = (parts.next().expect("method"), parts.next().expect("uri"));
                let url = url::Url::parse(target).expect("absolute-form URI");
                let origin = format!(
                    "{}:{}",
                    url.host_str().expect("host"),
                    url.port_or_known_default().expect("port")
                );
                let mut server = tokio::net::TcpStream::connect(origin)
                    .await
                    .expect("origin");
                let head = format!("{method} {} HTTP/1.1\r\n{rest}", url.path());
                server.write_all(head.as_bytes()).await.expect("forward");
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (addr, hits)
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn request(url: String, bytes: &[u8], format: ImageFormat) -> ImageRequest {
    ImageRequest {
        url,
        algorithm: ChecksumType::Sha256,
        digest: sha256(bytes),
        format,
    }
}

/// Raw image content of `size` bytes, different for every `seed`.
fn raw_image(seed: u8, size: usize) -> Vec<u8> {
    let mut bytes = vec![seed; size];
    bytes[..8].copy_from_slice(b"rawdisk\n");
    bytes
}

/// Settings that admit the tests' image servers on 127.0.0.1 (and nothing else on loopback).
fn loopback_settings() -> ImageSettings {
    ImageSettings {
        loopback_for_tests: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ..Default::default()
    }
}

fn cache(settings: ImageSettings) -> ImageCache {
    ImageCache::with_settings(Arc::new(Hosts::new(4)), settings).expect("image cache")
}

/// Volumes in `pool` whose name starts with `prefix`, sorted.
fn volumes(host: &Host, pool: &str, prefix: &str) -> Vec<String> {
    let storage = host
        .connection()
        .lookup_storage_pool_by_name(pool)
        .expect("pool");
    storage.refresh(0).expect("refresh");
    let mut names: Vec<String> = storage
        .list_volumes()
        .expect("volumes")
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_with_backing_or_data_files_or_the_wrong_format_are_refused_before_upload() {
    tls();
    let (uri, host, pool_dir) = bed_pool("capl-img-header");
    let work = tempfile::tempdir().expect("temp dir");
    let at = |name: &str| work.path().join(name).display().to_string();

    std::fs::write(at("secret.raw"), b"host secret").expect("secret");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &at("secret.raw"),
        "-F",
        "raw",
        &at("backed.qcow2"),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", at("data.raw")),
        &at("datafile.qcow2"),
        "1M",
    ]);
    qcow2(Path::new(&at("clean.qcow2")), "1M");
    // Smaller than the empty qcow2 libvirt would create: nothing of that may remain after it.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        &at("small.qcow2"),
        "1M",
    ]);
    let read = |name: &str| std::fs::read(at(name)).expect("image");
    let small = read("small.qcow2");
    let (backed, datafile, clean) = (
        read("backed.qcow2"),
        read("datafile.qcow2"),
        read("clean.qcow2"),
    );
    let raw = raw_image(7, 64 * 1024);

    let images: HashMap<&str, Vec<u8>> = [
        ("/backed", backed.clone()),
        ("/datafile", datafile.clone()),
        ("/clean", clean.clone()),
        ("/raw", raw.clone()),
        ("/small", small.clone()),
    ]
    .into_iter()
    .collect();
    let (addr, _) = serve("127.0.0.1", move |path| body(&images[path])).await;
    let cache = cache(loopback_settings());

    for (path, bytes, format, expected) in [
        (
            "/backed",
            &backed,
            ImageFormat::Qcow2,
            HeaderError::BackingFile,
        ),
        (
            "/datafile",
            &datafile,
            ImageFormat::Qcow2,
            HeaderError::DataFile,
        ),
        (
            "/clean",
            &clean,
            ImageFormat::Raw,
            HeaderError::NotRaw("qcow"),
        ),
        ("/raw", &raw, ImageFormat::Qcow2, HeaderError::NotQcow2),
    ] {
        let wanted = request(format!("http://{addr}{path}"), bytes, format);
        match cache.ensure(&uri, "capl-img-header", &wanted).await {
            Err(err @ ImageError::Header { .. }) => {
                assert!(err.is_permanent(), "{err}");
                let ImageError::Header { error, .. } = err else {
                    unreachable!()
                };
                assert_eq!(error, expected, "{path}");
            }
            other => panic!("{path} as {format:?}: expected a header error, got {other:?}"),
        }
        assert_eq!(
            volumes(&host, "capl-img-header", &wanted.volume_name()),
            Vec::<String>::new(),
            "{path}: nothing was uploaded"
        );
    }

    // The same bytes under their true formats pass, and the volume holds them byte for byte.
    for (path, bytes, format) in [
        ("/clean", &clean, ImageFormat::Qcow2),
        ("/raw", &raw, ImageFormat::Raw),
        ("/small", &small, ImageFormat::Qcow2),
    ] {
        let wanted = request(format!("http://{addr}{path}"), bytes, format);
        let base = cache
            .ensure(&uri, "capl-img-header", &wanted)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(&std::fs::read(&base).expect("volume"), bytes, "{path}");
        let name = base
            .strip_prefix(&format!("{}/", pool_dir.display()))
            .expect("in the pool");
        let found = capl::libvirt::image::check_base_volume(&host, "capl-img-header", name);
        assert_eq!(
            found.expect("a clean base"),
            format,
            "{path}: libvirt's view"
        );
    }
}

#[test]
fn existing_volumes_are_checked_for_backing_files_and_their_real_format_is_read() {
    use capl::libvirt::image::check_base_volume;
    let (_, host, pool_dir) = bed_pool("capl-img-volume");
    let at = |name: &str| pool_dir.join(name).display().to_string();
    let secret = pool_dir.with_extension("secret.raw").display().to_string();
    std::fs::write(&secret, b"host secret").expect("secret");
    let data = pool_dir.with_extension("data.raw").display().to_string();

    qcow2(Path::new(&at("plain.qcow2")), "1M");
    std::fs::write(at("plain.img"), raw_image(3, 4096)).expect("raw volume");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &secret,
        "-F",
        "raw",
        &at("backed.qcow2"),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={data}"),
        &at("datafile.qcow2"),
        "1M",
    ]);
    // A raw-named file holding a qcow2 header with a backing file: libvirt probes the content.
    std::fs::copy(at("backed.qcow2"), at("disguised.img")).expect("copy");
    host.connection()
        .lookup_storage_pool_by_name("capl-img-volume")
        .expect("pool")
        .refresh(0)
        .expect("refresh");

    let check = |name: &str| check_base_volume(&host, "capl-img-volume", name);
    assert_eq!(
        check("plain.qcow2").expect("plain qcow2"),
        ImageFormat::Qcow2
    );
    assert_eq!(check("plain.img").expect("plain raw"), ImageFormat::Raw);
    for name in ["backed.qcow2", "disguised.img"] {
        let err = check(name).expect_err(name);
        assert!(err.is_permanent(), "{name}: {err}");
        assert!(
            matches!(
                err,
                ImageError::BackingStore { .. }
                    | ImageError::Header {
                        error: HeaderError::BackingFile,
                        ..
                    }
            ),
            "{name}: {err:?}"
        );
    }
    let err = check("datafile.qcow2").expect_err("data file");
    assert!(
        matches!(
            err,
            ImageError::Header {
                error: HeaderError::DataFile,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(check("missing.qcow2").is_err());

    // The test driver holds no content: its volume XML alone decides.
    let test = Host::open(&support::host_uri("test:///default")).expect("test driver");
    let pool = test
        .connection()
        .lookup_storage_pool_by_name("default-pool")
        .expect("pool");
    for (name, format, backing) in [
        ("t-raw.img", "raw", ""),
        ("t-plain.qcow2", "qcow2", ""),
        (
            "t-backed.qcow2",
            "qcow2",
            "<backingStore><path>/etc/shadow</path><format type='raw'/></backingStore>",
        ),
    ] {
        let xml = format!(
            "<volume><name>{name}</name><capacity>1048576</capacity>\
             <target><format type='{format}'/></target>{backing}</volume>"
        );
        virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0).expect("test volume");
    }
    let check = |name: &str| check_base_volume(&test, "default-pool", name);
    assert_eq!(check("t-raw.img").expect("raw"), ImageFormat::Raw);
    assert_eq!(check("t-plain.qcow2").expect("qcow2"), ImageFormat::Qcow2);
    assert!(matches!(
        check("t-backed.qcow2"),
        Err(ImageError::BackingStore { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_downloads_reach_no_loopback_or_metadata_address_directly_by_name_or_by_redirect() {
    tls();
    let (uri, host, _) = bed_pool("capl-img-egress");
    let image = raw_image(11, 4096);
    // The server the rules must keep us from: on 127.0.0.2, not the tests' allowed address.
    let bytes = image.clone();
    let (forbidden, forbidden_hits) = serve("127.0.0.2", move |_| body(&bytes)).await;
    let table: HashMap<String, Vec<IpAddr>> = [
        ("images.test", "127.0.0.2"),
        ("metadata.test", "169.254.169.254"),
        ("tests.test", "127.0.0.1"),
    ]
    .into_iter()
    .map(|(name, ip)| (name.to_owned(), vec![ip.parse().expect("ip")]))
    .collect();

    let refused = async |cache: &ImageCache, url: String| {
        let wanted = request(url.clone(), &image, ImageFormat::Raw);
        match cache.ensure(&uri, "capl-img-egress", &wanted).await {
            Err(err @ ImageError::Forbidden { .. }) => {
                assert!(err.is_permanent(), "{err}");
                err.to_string()
            }
            other => panic!("{url}: expected a refusal, got {other:?}"),
        }
    };

    // With the defaults, loopback is out in any form.
    let strict = cache(ImageSettings {
        hosts_for_tests: table.clone(),
        ..Default::default()
    });
    let (allowed, allowed_hits) = {
        let bytes = image.clone();
        serve("127.0.0.1", move |_| body(&bytes)).await
    };
    refused(&strict, format!("http://{allowed}/a.img")).await;
    refused(&strict, format!("http://127.1:{}/a.img", allowed.port())).await;
    refused(
        &strict,
        format!("http://[::ffff:127.0.0.1]:{}/a.img", allowed.port()),
    )
    .await;
    let why = refused(
        &strict,
        format!("http://tests.test:{}/a.img", allowed.port()),
    )
    .await;
    assert!(why.contains("resolves to a loopback address"), "{why}");
    refused(
        &strict,
        format!("http://images.test:{}/a.img", forbidden.port()),
    )
    .await;
    refused(&strict, "http://metadata.test/latest/meta-data/".into()).await;
    refused(&strict, format!("http://{allowed}/a%00.img")).await;
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        0,
        "no request reached loopback"
    );

    // With the tests' exception (127.0.0.1 only), every redirect is held to the same rules.
    let tests = cache(ImageSettings {
        hosts_for_tests: table,
        ..loopback_settings()
    });
    let port = forbidden.port();
    let (origin, _) = serve("127.0.0.1", move |path| match path {
        "/to-loopback" => Reply::Redirect(format!("http://127.0.0.2:{port}/a.img")),
        "/to-loopback-name" => Reply::Redirect(format!("http://images.test:{port}/a.img")),
        "/to-metadata" => Reply::Redirect("http://169.254.169.254/latest/meta-data/".into()),
        "/to-metadata-name" => Reply::Redirect("http://metadata.test/latest/meta-data/".into()),
        "/to-file" => Reply::Redirect("file:///etc/shadow".into()),
        "/loop" => Reply::Redirect("/loop".into()),
        _ => Reply::Status(404),
    })
    .await;
    for path in ["/to-loopback", "/to-metadata", "/to-file"] {
        let why = refused(&tests, format!("http://{origin}{path}")).await;
        assert!(why.contains("redirect"), "{path}: {why}");
    }
    for path in ["/to-loopback-name", "/to-metadata-name"] {
        let why = refused(&tests, format!("http://{origin}{path}")).await;
        assert!(why.contains("resolves to"), "{path}: {why}");
    }
    let wanted = request(format!("http://{origin}/loop"), &image, ImageFormat::Raw);
    let err = tests
        .ensure(&uri, "capl-img-egress", &wanted)
        .await
        .expect_err("a redirect loop");
    assert!(err.to_string().contains("redirects"), "{err}");
    assert_eq!(
        forbidden_hits.load(Ordering::SeqCst),
        0,
        "nothing reached 127.0.0.2"
    );
    assert_eq!(
        volumes(&host, "capl-img-egress", "capl-base-"),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_are_capped_time_out_keep_their_cause_and_leave_no_file_behind() {
    tls();
    let (uri, _host, _) = bed_pool("capl-img-limits");
    let image = raw_image(13, 256 * 1024);
    let bytes = image.clone();
    let (addr, _) = serve("127.0.0.1", move |path| match path {
        "/sized" => body(&bytes),
        "/chunked" => Reply::Body {
            bytes: Arc::new(bytes.clone()),
            length: false,
            pause: Duration::ZERO,
        },
        "/stall" => Reply::Stall,
        "/404" => Reply::Status(404),
        "/429" => Reply::Status(429),
        "/503" => Reply::Status(503),
        _ => body(&bytes),
    })
    .await;
    let downloads = tempfile::tempdir().expect("download dir");
    let cache = cache(ImageSettings {
        max_bytes: 100 * 1024,
        read_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        download_dir: downloads.path().to_owned(),
        ..loopback_settings()
    });
    let fetch = async |path: &str| {
        let wanted = request(format!("http://{addr}{path}"), &image, ImageFormat::Raw);
        cache.ensure(&uri, "capl-img-limits", &wanted).await
    };

    for path in ["/sized", "/chunked"] {
        let err = fetch(path).await.expect_err(path);
        assert!(
            matches!(err, ImageError::TooLarge { .. }),
            "{path}: {err:?}"
        );
        assert!(err.is_permanent());
    }
    let started = std::time::Instant::now();
    let err = fetch("/stall").await.expect_err("stalled");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the read timed out"
    );
    assert!(!err.is_permanent(), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept: {err:?}"
    );
    for (path, permanent) in [("/404", true), ("/429", false), ("/503", false)] {
        let err = fetch(path).await.expect_err(path);
        assert!(matches!(err, ImageError::Status { .. }), "{path}: {err:?}");
        assert_eq!(err.is_permanent(), permanent, "{path}");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let wanted = request(
        format!("http://127.0.0.1:{port}/x"),
        &image,
        ImageFormat::Raw,
    );
    let err = cache
        .ensure(&uri, "capl-img-limits", &wanted)
        .await
        .expect_err("nothing listens");
    assert!(!err.is_permanent(), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");

    assert_eq!(
        std::fs::read_dir(downloads.path()).expect("dir").count(),
        0,
        "no temporary file is left behind"
    );
}

/// The child half of `proxies_from_the_environment_are_honoured` (proxy variables are
/// process-wide, so each case runs in a process of its own): fetches the image named by the
/// environment.
async fn proxy_child(uri: String) {
    let url = std::env::var("CAPL_CHILD_URL").expect("url");
    let digest = std::env::var("CAPL_CHILD_DIGEST").expect("digest");
    let wanted = ImageRequest {
        url,
        algorithm: ChecksumType::Sha256,
        digest,
        format: ImageFormat::Raw,
    };
    cache(loopback_settings())
        .ensure(&support::host_uri(&uri), "capl-img-proxy", &wanted)
        .await
        .expect("fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_from_the_environment_are_honoured() {
    tls();
    if let Ok(uri) = std::env::var("CAPL_CHILD_URI") {
        return proxy_child(uri).await;
    }
    let (uri, _host, _) = bed_pool("capl-img-proxy");
    let (proxy, proxied) = proxy().await;
    let (one, two) = (raw_image(21, 8192), raw_image(22, 8192));
    let (a, b) = (one.clone(), two.clone());
    let (server, direct) = serve("127.0.0.1", move |path| {
        body(if path == "/one.img" { &a } else { &b })
    })
    .await;

    let child = |image: &[u8], path: &str, no_proxy: Option<&str>| {
        let mut command = std::process::Command::new(std::env::current_exe().expect("exe"));
        command
            .args([
                "proxies_from_the_environment_are_honoured",
                "--exact",
                "--nocapture",
            ])
            .env("CAPL_CHILD_URI", uri.as_str())
            .env("CAPL_CHILD_URL", format!("http://{server}{path}"))
            .env("CAPL_CHILD_DIGEST", sha256(image))
            .env("HTTP_PROXY", format!("http://{proxy}"));
        for name in [
            "NO_PROXY",
            "no_proxy",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            command.env_remove(name);
        }
        if let Some(no_proxy) = no_proxy {
            command.env("NO_PROXY", no_proxy);
        }
        let output = command.output().expect("child");
        assert!(
            output.status.success(),
            "child: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };

    tokio::task::block_in_place(|| child(&one, "/one.img", None));
    assert_eq!(proxied.load(Ordering::SeqCst), 1, "HTTP_PROXY was used");
    assert_eq!(direct.load(Ordering::SeqCst), 1, "through the proxy");
    tokio::task::block_in_place(|| child(&two, "/two.img", Some("127.0.0.1")));
    assert_eq!(
        proxied.load(Ordering::SeqCst),
        1,
        "NO_PROXY bypassed the proxy"
    );
    assert_eq!(direct.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_never_delete_each_others_uploads_and_share_one_verified_base() {
    tls();
    let (uri, host, pool_dir) = bed_pool("capl-img-replicas");
    let image = raw_image(31, 512 * 1024);
    let bytes = image.clone();
    let (addr, hits) = serve("127.0.0.1", move |_| Reply::Body {
        bytes: Arc::new(bytes.clone()),
        length: true,
        pause: Duration::from_millis(150),
    })
    .await;
    let wanted = request(format!("http://{addr}/base.img"), &image, ImageFormat::Raw);
    let prefix = wanted.volume_name();
    let pool = "capl-img-replicas";

    // Another replica's upload in progress (fresh, part of the bytes, no marker), and a complete
    // one a dead replica left unverified two days ago: neither may be used.
    let in_progress = format!("{prefix}-00000000000000aa.raw");
    let abandoned = format!("{prefix}-00000000000000bb.raw");
    std::fs::write(pool_dir.join(&in_progress), &image[..1000]).expect("in progress");
    std::fs::write(pool_dir.join(&abandoned), &image).expect("abandoned");
    let two_days_ago = std::process::Command::new("touch")
        .args(["-m", "-d", "2 days ago"])
        .arg(pool_dir.join(&abandoned))
        .status()
        .expect("touch");
    assert!(two_days_ago.success());
    volumes(&host, pool, &prefix); // refresh the pool

    // Two replicas at once: their own connections, caches and locks. Each may download and
    // upload its own copy; neither touches the other's.
    let (a, b) = (cache(loopback_settings()), cache(loopback_settings()));
    let (first, second) =
        tokio::join!(a.ensure(&uri, pool, &wanted), b.ensure(&uri, pool, &wanted));
    let (first, second) = (first.expect("replica A"), second.expect("replica B"));
    for path in [&first, &second] {
        assert_eq!(&std::fs::read(path).expect("base"), &image, "{path}");
        assert_ne!(path, &pool_dir.join(&in_progress).display().to_string());
    }

    let left = volumes(&host, pool, &prefix);
    assert!(
        left.contains(&in_progress),
        "the upload in progress survived: {left:?}"
    );
    assert_eq!(
        std::fs::read(pool_dir.join(&in_progress))
            .expect("in progress")
            .len(),
        1000,
        "and nobody wrote into it"
    );
    assert!(
        !left.contains(&abandoned),
        "the abandoned upload was removed: {left:?}"
    );
    let verified: Vec<String> = left
        .iter()
        .filter_map(|n| n.strip_suffix(".verified"))
        .map(str::to_owned)
        .collect();
    assert!(
        (1..=2).contains(&verified.len()),
        "one verified upload per replica that downloaded: {left:?}"
    );
    for path in [&first, &second] {
        let name = path.rsplit('/').next().expect("name");
        assert!(
            verified.iter().any(|v| v == name),
            "{name} is verified: {left:?}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), verified.len());

    // From now on both replicas pick the same verified base (the smallest name), without
    // downloading again.
    let downloads = hits.load(Ordering::SeqCst);
    let pick = pool_dir.join(&verified[0]).display().to_string();
    assert_eq!(a.ensure(&uri, pool, &wanted).await.expect("again"), pick);
    assert_eq!(b.ensure(&uri, pool, &wanted).await.expect("again"), pick);
    assert_eq!(hits.load(Ordering::SeqCst), downloads);
    assert!(volumes(&host, pool, &prefix).contains(&in_progress));
}
