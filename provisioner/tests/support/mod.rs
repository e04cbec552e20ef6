//! A real control plane for the tests: `testenv/k8s/k8s-up` once per test
//! binary (or the one named by `FLOWGATE_TEST_KUBECONFIG`), a watcher that
//! stops it when the test process ends, and a fresh namespace per test.
#![allow(dead_code, missing_docs)]

use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use provisioner::kube::KubeBackend;
use provisioner::settings::{KubeArgs, KubeSettings, RouteKind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub struct Cluster {
    pub kubeconfig: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The shared control plane, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        if let Ok(path) = std::env::var("FLOWGATE_TEST_KUBECONFIG") {
            return Cluster { kubeconfig: PathBuf::from(path) };
        }
        let dir = tempfile::Builder::new().prefix("flowgate-k8s-").tempdir().unwrap().keep();
        let root = repo_root();
        let up = Command::new(root.join("testenv/k8s/k8s-up")).arg(&dir).status().expect("running testenv/k8s/k8s-up");
        assert!(up.success(), "testenv/k8s/k8s-up failed; see {}/logs", dir.display());
        // Stop the cluster when this test process is gone, whatever happens.
        let watcher = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {down} {dir} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            down = root.join("testenv/k8s/k8s-down").display(),
            dir = dir.display()
        );
        // `setsid -f` forks the watcher off and returns at once.
        let started = Command::new("setsid")
            .args(["-f", "bash", "-c", &watcher])
            .status()
            .expect("starting the cluster watcher");
        assert!(started.success(), "starting the cluster watcher: {started}");
        Cluster { kubeconfig: dir.join("kubeconfig") }
    })
}

/// Waits (up to 90 s: the garbage collector can be slow while other tests
/// make hundreds of objects) until `name` no longer exists.
pub async fn gone<K>(api: &Api<K>, name: &str) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..450 {
        if api.get_opt(name).await.unwrap().is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// An admin client.
pub async fn admin() -> Client {
    let path = cluster().kubeconfig.clone();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A client authenticated by a bearer token instead of the admin's.
pub async fn client_with_token(token: &str) -> Client {
    let path = cluster().kubeconfig.clone();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info.token = Some(token.to_owned().into());
    Client::try_from(config).unwrap()
}

/// A fresh namespace enforcing the `restricted` Pod Security level, with its
/// default ServiceAccount in place (Pods need it).
pub async fn namespace(client: &Client) -> String {
    let name = format!("t-{}", provisioner::instance::InstanceId::random());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    for _ in 0..100 {
        if sas.get_opt("default").await.unwrap().is_some() {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("namespace {name} never got its default ServiceAccount");
}

/// Settings as the CLI would resolve them, for a namespace: Ingresses, no
/// Gateway, no TLS Secret.
pub fn settings(ns: &str) -> KubeSettings {
    #[derive(clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        kube: KubeArgs,
    }
    let args = <Wrap as clap::Parser>::parse_from([
        "flowgate",
        "--host",
        "ml.example.test",
        "--namespace",
        ns,
        "--route-kind",
        "ingress",
    ])
    .kube;
    let mut s = KubeSettings::from_args(&args, "default").unwrap();
    // whatever FLOWGATE_* a shell exported (testenv's node env sets a Gateway)
    s.gateway = None;
    s.tls_secret = None;
    s
}

/// Fluent tweaks on settings.
pub trait SettingsExt {
    fn route_kind(self, kind: RouteKind) -> Self;
    /// The Gateway of the instances' HTTPRoutes, `NAMESPACE/NAME`.
    fn gateway(self, gateway: &str) -> Self;
    fn stuck_after(self, d: Duration) -> Self;
}

impl SettingsExt for KubeSettings {
    fn route_kind(mut self, kind: RouteKind) -> Self {
        self.route_kind = kind;
        self
    }
    fn gateway(mut self, gateway: &str) -> Self {
        self.gateway = Some(gateway.parse().unwrap());
        self
    }
    fn stuck_after(mut self, d: Duration) -> Self {
        self.stuck_after = d;
        self
    }
}

pub async fn backend(client: Client, settings: KubeSettings) -> KubeBackend {
    KubeBackend::new(client, settings).await.unwrap()
}

/// The service over a backend of `ns`, as the CLI runs it: claims in Leases
/// of `ns`, the settings' TTL bounds, no quotas.
pub fn service(
    backend: Arc<dyn provisioner::backend::Backend>,
    client: Client,
    ns: &str,
    ttl: provisioner::instance::TtlPolicy,
) -> provisioner::service::Provisioner {
    provisioner::service::Provisioner::new(
        backend,
        Arc::new(provisioner::kube::ledger::LeaseLedger::new(client, ns)),
        provisioner::service::Policy {
            ttl,
            quotas: provisioner::service::Quotas::unlimited(),
            allow_file: false,
            streams_per_caller: usize::MAX,
        },
    )
    .with_links(test_links())
}

/// Access links signed with a test key (instances are `link` by default).
pub fn test_links() -> provisioner::access::Links {
    let keys = adapter::access::Keys::parse(&"t".repeat(40), "test keys").unwrap();
    provisioner::access::Links::new(keys, provisioner::access::Links::DEFAULT_TTL)
}

/// Cuts every request after the first Deployment apply, as if the API server
/// went away in the middle of a create (the one fault the real server cannot
/// be made to produce at that exact point).
#[derive(Clone, Default)]
pub struct CutAfterDeploymentApply(pub Arc<AtomicBool>);

impl<S> tower::Layer<S> for CutAfterDeploymentApply {
    type Service = Cut<S>;
    fn layer(&self, inner: S) -> Cut<S> {
        Cut {
            inner,
            cut: Arc::clone(&self.0),
        }
    }
}

#[derive(Clone)]
pub struct Cut<S> {
    inner: S,
    cut: Arc<AtomicBool>,
}

impl<S, B> tower::Service<http::Request<B>> for Cut<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<S::Response, tower::BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.cut.load(Ordering::SeqCst) {
            return Box::pin(async { Err("connection refused: the API server is gone".into()) });
        }
        let is_deployment_apply =
            req.method() == http::Method::PATCH && req.uri().path().contains("/deployments/");
        let cut = Arc::clone(&self.cut);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await.map_err(Into::into);
            if is_deployment_apply {
                cut.store(true, Ordering::SeqCst);
            }
            response
        })
    }
}

/// The activator of a sleeper on a loopback listener, answering the tests'
/// host `ml.example.test`, until [`TestActivator::stop`].
pub struct TestActivator {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<adapter::server::Drain>,
}

impl TestActivator {
    pub async fn start(sleeper: Arc<provisioner::kube::sleep::Sleeper>) -> Self {
        use adapter::server::{ConnectionLimits, serve};
        use provisioner::hosts::PublicHosts;
        use provisioner::kube::activator::Activator;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let activator = Arc::new(Activator::new(
            sleeper,
            None,
            Arc::new(PublicHosts::parse("ml.example.test").unwrap()),
        ));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            serve(activator, &ConnectionLimits::default(), listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Self { addr, stop, served }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.unwrap();
    }
}
