//! `flowgate-adapter fetch` against real archives served over loopback HTTP:
//! good ones install, hostile or broken ones are refused with a clear error and
//! leave DEST as it was.

mod common;

use adapter::fetch::{FetchError, FetchOptions, Limits, MARKER, Outcome, fetch};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Serves `files` by path; `/flaky/...` answers 503 twice before the file.
async fn serve_files(files: HashMap<String, Vec<u8>>) -> SocketAddr {
    let files = Arc::new(files);
    let flaky_hits = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let files = Arc::clone(&files);
            let flaky_hits = Arc::clone(&flaky_hits);
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let files = Arc::clone(&files);
                    let flaky_hits = Arc::clone(&flaky_hits);
                    async move {
                        let path = req.uri().path();
                        let name = path.strip_prefix("/flaky").unwrap_or(path);
                        if path.starts_with("/flaky")
                            && flaky_hits.fetch_add(1, Ordering::SeqCst) < 2
                        {
                            return Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(503)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            );
                        }
                        Ok(match files.get(name) {
                            Some(data) => http::Response::new(Full::new(Bytes::from(data.clone()))),
                            None => http::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        })
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A tar entry written by hand, so hostile names get through unchanged.
struct Entry<'a> {
    name: &'a str,
    kind: tar::EntryType,
    link: &'a str,
    data: &'a [u8],
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Entry<'a> {
    Entry {
        name,
        kind: tar::EntryType::Regular,
        link: "",
        data,
    }
}

fn tar_gz(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut header = tar::Header::new_gnu();
        let raw = header.as_old_mut();
        raw.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        raw.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        header.set_entry_type(e.kind);
        header.set_size(e.data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, e.data).unwrap();
    }
    common::gzip(&builder.into_inner().unwrap())
}

fn zip_archive(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data) in files {
        w.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn options(url: String, sha256: String, dest: &Path) -> FetchOptions {
    FetchOptions {
        url,
        sha256,
        dest: dest.to_path_buf(),
        limits: Limits::default(),
        retries: 3,
        backoff: Duration::from_millis(20),
        timeouts: Default::default(),
        credentials: Default::default(),
    }
}

fn store() -> Vec<u8> {
    tar_gz(&[
        Entry {
            name: "mlruns/",
            kind: tar::EntryType::Directory,
            link: "",
            data: b"",
        },
        file("mlruns/0/meta.yaml", b"name: Default\n"),
        file("mlruns/0/r1/metrics/accuracy", b"1700000000000 0.9375 19\n"),
        Entry {
            name: "mlruns/latest",
            kind: tar::EntryType::Symlink,
            link: "0/r1",
            data: b"",
        },
        Entry {
            name: "mlruns/0/r1/copy",
            kind: tar::EntryType::Link,
            link: "mlruns/0/meta.yaml",
            data: b"",
        },
    ])
}

/// The whole tree under `dir`, for before/after comparisons.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else {
                out.push((
                    p.display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn installs_verifies_and_is_idempotent() {
    let archive = store();
    let addr = serve_files(HashMap::from([("/store.tgz".to_string(), archive.clone())])).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("store");
    let opts = options(
        format!("http://{addr}/store.tgz"),
        sha(&archive).to_uppercase(),
        &dest,
    );

    let outcome = fetch(&opts).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Installed { entries: 5, .. }),
        "{outcome:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("mlruns/0/r1/metrics/accuracy")).unwrap(),
        "1700000000000 0.9375 19\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("mlruns/latest/metrics/accuracy")).unwrap(),
        "1700000000000 0.9375 19\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("mlruns/0/r1/copy")).unwrap(),
        "name: Default\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join(MARKER)).unwrap().trim(),
        sha(&archive)
    );
    assert_eq!(fetch(&opts).await.unwrap(), Outcome::AlreadyPresent);
    // Nothing but DEST is left beside it (no staging or download leftovers).
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["store"]);
}

#[tokio::test]
async fn a_different_checksum_replaces_the_content() {
    let first = store();
    let second = zip_archive(&[
        ("mlflow.db", b"SQLite format 3\0"),
        ("artifacts/1/a.txt", b"new"),
    ]);
    let addr = serve_files(HashMap::from([
        ("/a".into(), first.clone()),
        ("/b".into(), second.clone()),
    ]))
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("store");
    fetch(&options(format!("http://{addr}/a"), sha(&first), &dest))
        .await
        .unwrap();
    fetch(&options(format!("http://{addr}/b"), sha(&second), &dest))
        .await
        .unwrap();
    assert!(!dest.join("mlruns").exists());
    assert_eq!(
        std::fs::read(dest.join("artifacts/1/a.txt")).unwrap(),
        b"new"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join(MARKER)).unwrap().trim(),
        sha(&second)
    );
}

#[tokio::test]
async fn file_urls_and_retries() {
    let archive = store();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store.tar.gz");
    std::fs::write(&path, &archive).unwrap();
    let dest = tmp.path().join("from-file");
    fetch(&options(
        format!("file://{}", path.display()),
        sha(&archive),
        &dest,
    ))
    .await
    .unwrap();
    assert!(dest.join("mlruns/0/meta.yaml").is_file());

    let addr = serve_files(HashMap::from([("/store.tgz".to_string(), archive.clone())])).await;
    let dest = tmp.path().join("after-retries");
    fetch(&options(
        format!("http://{addr}/flaky/store.tgz"),
        sha(&archive),
        &dest,
    ))
    .await
    .unwrap();
    assert!(dest.join("mlruns/0/meta.yaml").is_file());
}

#[tokio::test]
async fn failures_are_clear_and_leave_dest_as_it_was() {
    let good = store();
    let truncated = {
        let mut t = tar_gz(&[file("mlruns/big", &[7u8; 300_000])]);
        t.truncate(t.len() / 2);
        t
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "zip-slip tar",
            tar_gz(&[file("../evil.txt", b"x")]),
            "climbs out",
        ),
        (
            "absolute tar",
            tar_gz(&[file("/tmp/evil.txt", b"x")]),
            "absolute path",
        ),
        (
            "symlink out",
            tar_gz(&[Entry {
                name: "mlruns/link",
                kind: tar::EntryType::Symlink,
                link: "../../../etc",
                data: b"",
            }]),
            "points outside",
        ),
        (
            "absolute symlink",
            tar_gz(&[Entry {
                name: "link",
                kind: tar::EntryType::Symlink,
                link: "/etc/passwd",
                data: b"",
            }]),
            "points outside",
        ),
        (
            "link chain",
            tar_gz(&[
                Entry {
                    name: "d/l",
                    kind: tar::EntryType::Symlink,
                    link: "..",
                    data: b"",
                },
                Entry {
                    name: "x",
                    kind: tar::EntryType::Symlink,
                    link: "d/l/..",
                    data: b"",
                },
            ]),
            "through another symbolic link",
        ),
        (
            "hard link out",
            tar_gz(&[Entry {
                name: "h",
                kind: tar::EntryType::Link,
                link: "../outside",
                data: b"",
            }]),
            "points outside",
        ),
        (
            "device",
            tar_gz(&[Entry {
                name: "dev",
                kind: tar::EntryType::Char,
                link: "",
                data: b"",
            }]),
            "special file",
        ),
        (
            "zip-slip zip",
            zip_archive(&[("ok.txt", b"fine"), ("../../evil.txt", b"x")]),
            "climbs out",
        ),
        ("truncated gzip", truncated, "truncated"),
        (
            "not an archive",
            b"just some text, not an archive at all".to_vec(),
            "not a .tar.gz",
        ),
    ];
    let mut files: HashMap<String, Vec<u8>> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, data, _))| (format!("/{i}"), data.clone()))
        .collect();
    files.insert("/good".into(), good.clone());
    let addr = serve_files(files).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("store");
    fetch(&options(format!("http://{addr}/good"), sha(&good), &dest))
        .await
        .unwrap();
    let before = snapshot(tmp.path());

    for (i, (what, data, want)) in cases.iter().enumerate() {
        let err = fetch(&options(format!("http://{addr}/{i}"), sha(data), &dest))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(want), "{what}: {err}");
        assert_eq!(
            snapshot(tmp.path()),
            before,
            "{what} changed the destination"
        );
    }

    let err = fetch(&options(
        format!("http://{addr}/good"),
        sha(b"something else"),
        &dest,
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::ChecksumMismatch { .. }), "{err}");
    assert!(err.to_string().contains("nothing was unpacked"));
    let err = fetch(&options(
        format!("http://{addr}/missing"),
        sha(b"other"),
        &dest,
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    let err = fetch(&options(
        format!("http://127.0.0.1:{}/x", common::free_port()),
        sha(b"other"),
        &dest,
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Transfer { .. }), "{err}");
    let err = fetch(&options("ftp://example.org/x".into(), sha(b"other"), &dest))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("only http, https and file"),
        "{err}"
    );
    let err = fetch(&options(format!("http://{addr}/good"), "abc".into(), &dest))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("64 hex digits"), "{err}");
    assert_eq!(snapshot(tmp.path()), before);
}

#[tokio::test]
async fn bounds_are_enforced() {
    let bomb = tar_gz(&[file("zeros", &vec![0u8; 4 << 20])]);
    let many = zip_archive(
        &(0..50)
            .map(|i| {
                (
                    Box::leak(format!("f{i}").into_boxed_str()) as &str,
                    b"x" as &[u8],
                )
            })
            .collect::<Vec<_>>(),
    );
    let addr = serve_files(HashMap::from([
        ("/bomb".into(), bomb.clone()),
        ("/many".into(), many.clone()),
    ]))
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("store");
    let mut o = options(format!("http://{addr}/bomb"), sha(&bomb), &dest);
    o.limits.max_unpacked_bytes = 1 << 20;
    let err = fetch(&o).await.unwrap_err();
    assert!(err.to_string().contains("passes the limit"), "{err}");
    o.limits = Limits {
        max_download_bytes: 1000,
        ..Limits::default()
    };
    let err = fetch(&o).await.unwrap_err();
    assert!(
        err.to_string().contains("over the limit") || err.to_string().contains("download limit"),
        "{err}"
    );
    let mut o = options(format!("http://{addr}/many"), sha(&many), &dest);
    o.limits.max_entries = 10;
    let err = fetch(&o).await.unwrap_err();
    assert!(err.to_string().contains("entries"), "{err}");
    assert!(!dest.exists());
}

#[test]
fn the_binary_reports_failures_with_a_nonzero_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate-adapter"))
        .args([
            "fetch",
            "--url",
            "file:///nonexistent/x.tgz",
            "--sha256",
            &"0".repeat(64),
            "--dest",
        ])
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.tgz"));
}

/// Archives as jobs really write them: `tar -C dir -czf job.tgz .` and Python's
/// `shutil.make_archive` (tar and zip) start with a `./` entry for the root.
#[tokio::test]
async fn archives_made_by_tar_and_shutil_install() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job");
    std::fs::create_dir_all(job.join("mlruns/0/r1/metrics")).unwrap();
    std::fs::write(job.join("mlruns/0/meta.yaml"), "name: Default\n").unwrap();
    std::fs::write(
        job.join("mlruns/0/r1/metrics/accuracy"),
        "1700000000000 0.9375 19\n",
    )
    .unwrap();
    let tgz = tmp.path().join("tar.tgz");
    let out = std::process::Command::new("tar")
        .arg("-C")
        .arg(&job)
        .arg("-czf")
        .arg(&tgz)
        .arg(".")
        .output()
        .expect("tar");
    assert!(out.status.success(), "{out:?}");
    let script = "import shutil, sys\n\
                  print(shutil.make_archive(sys.argv[1] + '/shutil', 'gztar', root_dir=sys.argv[2]))\n\
                  print(shutil.make_archive(sys.argv[1] + '/shutil', 'zip', root_dir=sys.argv[2]))\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(tmp.path())
        .arg(&job)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    let mut files = HashMap::new();
    for name in ["tar.tgz", "shutil.tar.gz", "shutil.zip"] {
        files.insert(
            format!("/{name}"),
            std::fs::read(tmp.path().join(name)).unwrap(),
        );
    }
    // the tar archives really hold the root entry this is about
    for name in ["/tar.tgz", "/shutil.tar.gz"] {
        let raw = flate2::read::GzDecoder::new(&files[name][..]);
        let first = tar::Archive::new(raw)
            .entries()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .unwrap()
            .into_owned();
        assert_eq!(first, Path::new("."), "{name}");
    }
    let addr = serve_files(files.clone()).await;
    for (name, data) in &files {
        let dest = tmp
            .path()
            .join(format!("dest-{}", name.trim_start_matches('/')));
        let outcome = fetch(&options(format!("http://{addr}{name}"), sha(data), &dest))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(matches!(outcome, Outcome::Installed { .. }), "{name}");
        assert_eq!(
            std::fs::read_to_string(dest.join("mlruns/0/r1/metrics/accuracy")).unwrap(),
            "1700000000000 0.9375 19\n",
            "{name}"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("mlruns/0/meta.yaml")).unwrap(),
            "name: Default\n"
        );
    }
}

/// A root entry is only ever a directory: as a file or a link it is refused.
#[tokio::test]
async fn a_root_entry_that_is_not_a_directory_is_refused() {
    let as_file = tar_gz(&[file("./", b"x"), file("a", b"y")]);
    let as_link = tar_gz(&[Entry {
        name: ".",
        kind: tar::EntryType::Symlink,
        link: "/etc",
        data: b"",
    }]);
    let addr = serve_files(HashMap::from([
        ("/file".into(), as_file.clone()),
        ("/link".into(), as_link.clone()),
    ]))
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("store");
    for (path, data) in [("/file", &as_file), ("/link", &as_link)] {
        let err = fetch(&options(format!("http://{addr}{path}"), sha(data), &dest))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Unsafe { .. }), "{path}: {err:?}");
        assert!(!dest.exists());
    }
}

#[test]
fn the_default_entry_cap_is_far_below_a_million() {
    assert!(Limits::default().max_entries <= 100_000);
}

#[tokio::test]
async fn progress_is_reported_and_reasons_reveal_nothing() {
    let archive = store();
    let mut files = HashMap::new();
    files.insert("/good".to_owned(), archive.clone());
    let addr = serve_files(files).await;
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("store");
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |bytes: u64, total: Option<u64>| seen.lock().unwrap().push((bytes, total));
    adapter::fetch::fetch_reporting(
        &options(format!("http://{addr}/good"), sha(&archive), &dest),
        &progress,
    )
    .await
    .unwrap();
    let seen = seen.into_inner().unwrap();
    let len = archive.len() as u64;
    assert_eq!(seen.last(), Some(&(len, Some(len))), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(
        adapter::fetch::report::message(len, Some(len)),
        format!("{len}/{len} bytes")
    );

    // What anyone may read says what went wrong, not what the server holds
    // or which port answered.
    let other = tmp.path().join("other");
    let err = fetch(&options(format!("http://{addr}/good"), sha(b"x"), &other))
        .await
        .unwrap_err();
    let reason = err.public_reason();
    assert!(reason.contains("checksum mismatch"), "{reason}");
    assert!(!reason.contains(&sha(&archive)), "{reason}");
    let port = common::free_port();
    for url in [
        format!("http://127.0.0.1:{port}/x"),
        format!("http://{addr}/missing"),
    ] {
        let reason = fetch(&options(url, sha(b"x"), &other))
            .await
            .unwrap_err()
            .public_reason();
        assert_eq!(
            reason,
            "download failed: the archive could not be downloaded from its URL"
        );
    }
}
