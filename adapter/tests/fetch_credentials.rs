//! `fetch` from archives behind credentials, on loopback HTTPS servers under
//! a CA made here: a bearer token (re-read at each retry), a client
//! certificate (two files, or one PEM as a grid proxy is), a private CA; and
//! the credentials never reach another origin a redirect leads to, a log line
//! or an error.

use adapter::fetch::{Credentials, FetchError, FetchOptions, Limits, Outcome, fetch};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_rustls::rustls;

const TOKEN: &str = "wlcg-token-s3cret";
const ROTATED: &str = "wlcg-token-rotated-s3cret";

/// A CA, a server certificate for `localhost` and `127.0.0.1`, and a client
/// certificate, all made here.
struct Pki {
    ca_pem: String,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key: rustls::pki_types::PrivateKeyDer<'static>,
    client_pem: String,
    client_key_pem: String,
    roots: rustls::RootCertStore,
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Flowgate Test Grid CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();

    let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate().unwrap();
    let server_cert = server.signed_by(&server_key, &ca).unwrap();

    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(DnType::CommonName, "/DC=ch/DC=cern/CN=atlas-user");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &ca).unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_chain: vec![server_cert.der().clone()],
        server_key: rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        client_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        roots,
    }
}

/// What a server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    authorization: Option<String>,
    rucio: Option<String>,
    client_cert: bool,
}

type Handler = Arc<dyn Fn(&Seen) -> http::Response<Full<Bytes>> + Send + Sync>;

/// A loopback HTTPS server: `client_auth` None (no client certificate
/// asked), Some(false) (asked, optional) or Some(true) (required).
async fn serve_tls(
    pki: &Pki,
    client_auth: Option<bool>,
    handler: Handler,
) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some(required) => {
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(pki.roots.clone()),
                provider,
            );
            let v = if required {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(v.build().unwrap())
        }
    };
    let mut config = builder
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let handler = Arc::clone(&handler);
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                // A handshake refused (no client certificate, unknown CA) ends here.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let header = |n: &str| {
                        req.headers()
                            .get(n)
                            .map(|v| v.to_str().unwrap_or("?").to_owned())
                    };
                    let s = Seen {
                        path: req.uri().path().to_owned(),
                        authorization: header("authorization"),
                        rucio: header("x-rucio-auth-token"),
                        client_cert,
                    };
                    log.lock().unwrap().push(s.clone());
                    let response = handler(&s);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn status(code: u16) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(code)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn redirect(to: String) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(302)
        .header("location", to)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn archive() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let data = b"1700000000000 0.9375 19\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "mlruns/0/r1/metrics/accuracy", &data[..])
        .unwrap();
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn ok(data: &[u8]) -> http::Response<Full<Bytes>> {
    http::Response::new(Full::new(Bytes::copy_from_slice(data)))
}

fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn options(url: String, data: &[u8], dest: &Path, credentials: Credentials) -> FetchOptions {
    FetchOptions {
        url,
        sha256: hex::encode(Sha256::digest(data)),
        dest: dest.to_path_buf(),
        limits: Limits::default(),
        retries: 2,
        backoff: Duration::from_millis(20),
        timeouts: Default::default(),
        credentials,
    }
}

/// The server answered 401 to a request that carried no credentials.
fn refused_without_credentials(err: &FetchError) {
    assert!(
        matches!(
            err,
            FetchError::HttpStatus {
                status: 401,
                credentials: false,
                ..
            }
        ),
        "{err}"
    );
}

fn installed(o: Result<Outcome, FetchError>) {
    assert!(matches!(o, Ok(Outcome::Installed { .. })), "{o:?}");
}

#[tokio::test]
async fn a_bearer_token_opens_the_archive_and_a_rotated_one_is_read_at_the_retry() {
    let pki = pki();
    let data = archive();
    let served = data.clone();
    // The token in force changes once the first attempt failed with a 503.
    let rotated = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&rotated);
    let (addr, seen) = serve_tls(
        &pki,
        None,
        Arc::new(move |s: &Seen| {
            let expected = if *flag.lock().unwrap() {
                ROTATED
            } else {
                TOKEN
            };
            match s.path.as_str() {
                "/rotate" if !*flag.lock().unwrap() => {
                    *flag.lock().unwrap() = true;
                    status(503)
                }
                _ if s.authorization.as_deref() != Some(&format!("Bearer {expected}")) => {
                    status(401)
                }
                _ => ok(&served),
            }
        }),
    )
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let ca = write(tmp.path(), "ca.pem", &pki.ca_pem);
    let token = write(tmp.path(), "token", &format!("{TOKEN}\n"));
    let with = |token: Option<PathBuf>| Credentials {
        bearer_token_file: token,
        ca: vec![ca.clone()],
        ..Credentials::none()
    };
    let url = format!("https://127.0.0.1:{}/job.tgz", addr.port());

    // Without a token: a clear 401, after no retries (it would not pass).
    let err = fetch(&options(
        url.clone(),
        &data,
        &tmp.path().join("a"),
        with(None),
    ))
    .await
    .unwrap_err();
    refused_without_credentials(&err);
    assert!(err.to_string().contains("none were sent"), "{err}");
    // what anyone may read does not tell a server that wants credentials
    // from one that is not there (fetching must not probe)
    assert_eq!(
        err.public_reason(),
        "download failed: the archive could not be downloaded from its URL"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);

    // Without the test CA, the server's certificate is refused.
    let mut no_ca = with(Some(token.clone()));
    no_ca.ca.clear();
    let err = fetch(&options(url.clone(), &data, &tmp.path().join("a"), no_ca))
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );

    // A token for another origin stays home (the caller named this URL).
    let mut elsewhere = with(Some(token.clone()));
    elsewhere.origins = Some(vec!["https://bigpanda.cern.ch".into()]);
    let before = seen.lock().unwrap().len();
    let err = fetch(&options(
        url.clone(),
        &data,
        &tmp.path().join("a"),
        elsewhere,
    ))
    .await
    .unwrap_err();
    refused_without_credentials(&err);
    assert_eq!(seen.lock().unwrap()[before].authorization, None);

    installed(
        fetch(&options(
            url.clone(),
            &data,
            &tmp.path().join("b"),
            with(Some(token.clone())),
        ))
        .await,
    );

    // The token is rotated on disk while the server fails the first attempt:
    // the retry sends the new one.
    let rotating = format!("https://127.0.0.1:{}/rotate", addr.port());
    let dest = tmp.path().join("c");
    let o = options(rotating, &data, &dest, with(Some(token.clone())));
    let rewrite = token.clone();
    let run = tokio::spawn(async move { fetch(&o).await });
    // The first attempt ends with the 503 at once; the retry waits 20 ms.
    while !*rotated.lock().unwrap() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    std::fs::write(&rewrite, ROTATED).unwrap();
    installed(run.await.unwrap());
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        last.authorization.as_deref(),
        Some(&*format!("Bearer {ROTATED}"))
    );
}

#[tokio::test]
async fn a_client_certificate_opens_the_archive_as_two_files_or_one_proxy_pem() {
    let pki = pki();
    let data = archive();
    let served = data.clone();
    let (addr, seen) = serve_tls(&pki, Some(true), Arc::new(move |_: &Seen| ok(&served))).await;
    let tmp = tempfile::tempdir().unwrap();
    let ca = write(tmp.path(), "ca.pem", &pki.ca_pem);
    let url = format!("https://localhost:{}/job.tgz", addr.port());
    let anonymous = Credentials {
        ca: vec![ca.clone()],
        system_cas: false,
        ..Credentials::none()
    };

    // Without one, the handshake is refused, and the error says TLS failed.
    let err = fetch(&options(
        url.clone(),
        &data,
        &tmp.path().join("a"),
        anonymous.clone(),
    ))
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("certificate") || text.contains("handshake") || text.contains("alert"),
        "{text}"
    );
    assert!(seen.lock().unwrap().is_empty());

    let cert = write(tmp.path(), "tls.crt", &pki.client_pem);
    let key = write(tmp.path(), "tls.key", &pki.client_key_pem);
    installed(
        fetch(&options(
            url.clone(),
            &data,
            &tmp.path().join("b"),
            Credentials {
                client_cert: Some(cert),
                client_key: Some(key),
                ..anonymous.clone()
            },
        ))
        .await,
    );

    // A grid proxy: certificate, key and CA chain in one file (as
    // voms-proxy-init writes it), found in a credentials directory.
    let secret = tmp.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    write(
        &secret,
        "proxy.pem",
        &format!("{}{}{}", pki.client_pem, pki.client_key_pem, pki.ca_pem),
    );
    write(&secret, "ca.crt", &pki.ca_pem);
    let from_dir = || {
        Credentials {
            system_cas: false,
            ..Credentials::none()
        }
        .with_dir(&secret)
    };
    // Without `origins` a directory's credentials go nowhere: the handshake
    // is refused for want of a client certificate.
    assert!(
        fetch(&options(
            url.clone(),
            &data,
            &tmp.path().join("c"),
            from_dir()
        ))
        .await
        .is_err()
    );
    assert!(seen.lock().unwrap().iter().all(|s| s.client_cert));
    // Listed for another origin: still nowhere.
    write(
        &secret,
        "origins",
        "# where these may go\nhttps://bigpanda.cern.ch\n",
    );
    assert!(
        fetch(&options(
            url.clone(),
            &data,
            &tmp.path().join("c"),
            from_dir()
        ))
        .await
        .is_err()
    );
    write(
        &secret,
        "origins",
        &format!(
            "https://bigpanda.cern.ch\nhttps://localhost:{}/\n",
            addr.port()
        ),
    );
    installed(fetch(&options(url, &data, &tmp.path().join("c"), from_dir())).await);
    assert!(seen.lock().unwrap().iter().all(|s| s.client_cert));
}

#[tokio::test]
async fn credentials_stay_with_the_archive_s_origin() {
    let pki = pki();
    let data = archive();
    let served = data.clone();
    // Elsewhere: another port, asking for (not requiring) a client
    // certificate, to see whether one would be presented.
    let (other, other_seen) =
        serve_tls(&pki, Some(false), Arc::new(move |_: &Seen| ok(&served))).await;
    let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let plain_hits = Arc::new(Mutex::new(0usize));
    let hits = Arc::clone(&plain_hits);
    tokio::spawn(async move {
        while let Ok((s, _)) = plain.accept().await {
            *hits.lock().unwrap() += 1;
            drop(s);
        }
    });
    let served = data.clone();
    let (origin, _) = serve_tls(
        &pki,
        Some(false),
        Arc::new(move |s: &Seen| match s.path.as_str() {
            "/to-other-port" => redirect(format!("https://127.0.0.1:{}/job.tgz", other.port())),
            "/to-http" => redirect(format!("http://127.0.0.1:{}/job.tgz", plain_addr.port())),
            "/to-file" => redirect("file:///etc/passwd".into()),
            "/loop" => redirect("/loop".into()),
            "/same-origin" => redirect("/here.tgz".into()),
            _ => ok(&served),
        }),
    )
    .await;

    let tmp = tempfile::tempdir().unwrap();
    let credentials = Credentials {
        bearer_token_file: Some(write(tmp.path(), "token", TOKEN)),
        header_file: Some(write(
            tmp.path(),
            "headers",
            "X-Rucio-Auth-Token: rucio-s3cret\n",
        )),
        client_cert: Some(write(tmp.path(), "tls.crt", &pki.client_pem)),
        client_key: Some(write(tmp.path(), "tls.key", &pki.client_key_pem)),
        ca: vec![write(tmp.path(), "ca.pem", &pki.ca_pem)],
        system_cas: false,
        origins: None,
    };
    let at = |path: &str| format!("https://127.0.0.1:{}{path}", origin.port());
    let dest = |n: &str| tmp.path().join(n);

    // Same origin: the redirect target gets everything.
    installed(
        fetch(&options(
            at("/same-origin"),
            &data,
            &dest("a"),
            credentials.clone(),
        ))
        .await,
    );
    // Another port: nothing.
    installed(
        fetch(&options(
            at("/to-other-port"),
            &data,
            &dest("b"),
            credentials.clone(),
        ))
        .await,
    );
    let got = other_seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].authorization, None);
    assert_eq!(got[0].rucio, None);
    assert!(
        !got[0].client_cert,
        "the client certificate went to another origin"
    );

    // https to http: refused before connecting.
    let err = fetch(&options(
        at("/to-http"),
        &data,
        &dest("c"),
        credentials.clone(),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Redirect { .. }), "{err}");
    assert!(err.to_string().contains("from https to http"), "{err}");
    assert_eq!(*plain_hits.lock().unwrap(), 0);
    for (path, why) in [("/to-file", "file URL"), ("/loop", "redirects")] {
        let err = fetch(&options(at(path), &data, &dest("d"), credentials.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{path}: {err}");
    }
    assert!(!dest("c").exists() && !dest("d").exists());
}

#[tokio::test]
async fn another_host_name_for_the_same_server_gets_no_credentials() {
    let pki = pki();
    let data = archive();
    let served = data.clone();
    let port = Arc::new(Mutex::new(0u16));
    let p = Arc::clone(&port);
    let (addr, seen) = serve_tls(
        &pki,
        Some(false),
        Arc::new(move |s: &Seen| match s.path.as_str() {
            "/to-localhost" => redirect(format!("https://localhost:{}/job.tgz", p.lock().unwrap())),
            _ => ok(&served),
        }),
    )
    .await;
    *port.lock().unwrap() = addr.port();
    let tmp = tempfile::tempdir().unwrap();
    let credentials = Credentials {
        bearer_token_file: Some(write(tmp.path(), "token", TOKEN)),
        client_cert: Some(write(tmp.path(), "tls.crt", &pki.client_pem)),
        client_key: Some(write(tmp.path(), "tls.key", &pki.client_key_pem)),
        ca: vec![write(tmp.path(), "ca.pem", &pki.ca_pem)],
        ..Credentials::none()
    };
    let url = format!("https://127.0.0.1:{}/to-localhost", addr.port());
    installed(fetch(&options(url, &data, &tmp.path().join("a"), credentials)).await);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert!(seen[0].client_cert);
    assert_eq!(seen[1].path, "/job.tgz");
    assert_eq!(seen[1].authorization, None);
    assert!(!seen[1].client_cert);
}

/// The binary, at debug level, with a token the server refuses and a header
/// file it does not want: neither appears on stderr, stdout or in the
/// termination message.
#[tokio::test]
async fn the_binary_never_prints_a_credential() {
    let pki = pki();
    let (addr, _) = serve_tls(&pki, None, Arc::new(|_: &Seen| status(403))).await;
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "token", TOKEN);
    write(tmp.path(), "headers", "X-Rucio-Auth-Token: rucio-s3cret\n");
    write(tmp.path(), "ca.crt", &pki.ca_pem);
    let termination = tmp.path().join("termination-log");
    let url = format!("https://127.0.0.1:{}/job.tgz", addr.port());
    write(
        tmp.path(),
        "origins",
        &format!("https://127.0.0.1:{}\n", addr.port()),
    );
    let bin = env!("CARGO_BIN_EXE_flowgate-adapter");
    let out = tokio::process::Command::new(bin)
        .args([
            "fetch",
            "--url",
            &url,
            "--sha256",
            &"0".repeat(64),
            "--retries",
            "0",
            "--dest",
        ])
        .arg(tmp.path().join("store"))
        .arg("--credentials-dir")
        .arg(tmp.path())
        .arg("--termination-log")
        .arg(&termination)
        .env("RUST_LOG", "debug")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let said = std::fs::read_to_string(&termination).unwrap();
    let all = format!(
        "{}{}{said}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("HTTP 403"), "{all}");
    assert!(
        said.contains("refused access with the credentials given"),
        "{said}"
    );
    assert!(!all.contains("s3cret"), "a credential was printed:\n{all}");

    // A malformed header file: the line number, never the line.
    write(tmp.path(), "headers", "rucio-s3cret\n");
    let out = tokio::process::Command::new(bin)
        .args([
            "fetch",
            "--url",
            &url,
            "--sha256",
            &"0".repeat(64),
            "--dest",
        ])
        .arg(tmp.path().join("store"))
        .arg("--credentials-dir")
        .arg(tmp.path())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("headers: line 1"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
