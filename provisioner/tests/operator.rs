//! The operator against a real control plane (testenv/k8s: etcd,
//! kube-apiserver, kube-controller-manager with its garbage collector,
//! kube-scheduler and kwok, which makes Pods Ready). The operator runs
//! in-process (its future spawned on the test runtime, stopped through a
//! cancellation token), except in the test of the `flowgate` binary.

mod support;

use futures_util::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use kube::{Client, ResourceExt};
use provisioner::Error;
use provisioner::backend::{Backend, ListFilter};
use provisioner::instance::{Access, Artifacts, CreateRequest, Phase, Workload};
use provisioner::kube::objects::{http_route_resource, route_resource};
use provisioner::operator::backend::OperatorBackend;
use provisioner::operator::crd::{
    ArtifactsSource, ContainerResources, ImageOverrides, RequestLimit, ResourceOverrides, crd_yaml,
};
use provisioner::operator::leader::LeaseSettings;
use provisioner::operator::metrics::Metrics;
use provisioner::operator::{MlflowInstance, MlflowInstanceSpec, OperatorConfig, instance_id, run};
use provisioner::settings::{KubeSettings, RouteKind};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

// ---------------------------------------------------------------- helpers

/// Installs the checked-in CRD (server-side apply: idempotent, safe from
/// tests running at once) and waits until it is served.
async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(repo().join("k8s/crd/mlflowinstance.yaml")).unwrap();
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).unwrap();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        "mlflowinstances.flowgate.io",
        &PatchParams::apply("flowgate-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    eventually(
        "the CRD to be Established",
        Duration::from_secs(30),
        || async {
            let c = crds.get("mlflowinstances.flowgate.io").await.ok()?;
            c.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

/// A namespace with the CRD installed.
async fn setup() -> (Client, String) {
    let client = admin().await;
    install_crd(&client).await;
    let ns = namespace(&client).await;
    (client, ns)
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sha_of(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn spec(workload: &str) -> MlflowInstanceSpec {
    MlflowInstanceSpec {
        workload: workload.into(),
        owner: "alice".into(),
        artifacts: ArtifactsSource {
            url: format!("https://store.example.test/{workload}.tgz"),
            sha256: sha_of(workload),
        },
        ttl: Some("1h".into()),
        expires_at: None,
        image: None,
        resources: None,
        writes: false,
        access: Access::Link,
        credentials: None,
        idle_after: None,
    }
}

async fn create(api: &Api<MlflowInstance>, name: &str, spec: MlflowInstanceSpec) -> MlflowInstance {
    api.create(&PostParams::default(), &MlflowInstance::new(name, spec))
        .await
        .unwrap()
}

/// Waits until the resource's status has `phase`.
async fn phase(
    api: &Api<MlflowInstance>,
    name: &str,
    want: Phase,
    timeout: Duration,
) -> MlflowInstance {
    eventually(&format!("{name} to be {want}"), timeout, || async {
        let r = api.get(name).await.ok()?;
        (r.status.as_ref()?.phase == Some(want)).then_some(r)
    })
    .await
}

/// An operator running in-process.
struct Running {
    token: CancellationToken,
    task: JoinHandle<provisioner::Result<()>>,
    metrics: Arc<Metrics>,
}

impl Running {
    /// Graceful stop (running reconciles finish, the Lease is released).
    async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// As if the process died: nothing is released.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn config(settings: KubeSettings, identity: &str, lease: Option<LeaseSettings>) -> OperatorConfig {
    let mut c = OperatorConfig::new(settings);
    c.identity = identity.into();
    c.leader_election = lease;
    c.pending_recheck = Duration::from_secs(2);
    c.policy.mlflow_images = vec!["flowgate/mlflow:custom".into()];
    c
}

/// Short timings, so that take-overs happen within seconds.
fn fast_lease() -> LeaseSettings {
    LeaseSettings {
        name: "flowgate-operator".into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(300),
    }
}

fn spawn_operator(client: Client, config: OperatorConfig) -> Running {
    let token = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let task = tokio::spawn(run(client, config, Arc::clone(&metrics), token.clone()));
    Running {
        token,
        task,
        metrics,
    }
}

/// The operator for `ns`, alone (no leader election).
fn operator(client: &Client, ns: &str) -> Running {
    spawn_operator(client.clone(), config(settings(ns), "solo", None))
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

// ---------------------------------------------------------------- the CRD

#[test]
fn the_checked_in_crd_is_the_generated_one() {
    let path = repo().join("k8s/crd/mlflowinstance.yaml");
    let generated = crd_yaml();
    if std::env::var_os("FLOWGATE_UPDATE_CRD").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        checked_in == generated,
        "{} differs from what the code generates: run `cargo run -p provisioner -- crd > k8s/crd/mlflowinstance.yaml` \
         (or FLOWGATE_UPDATE_CRD=1 cargo test -p provisioner --test operator the_checked_in_crd)",
        path.display()
    );
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&checked_in).unwrap();
    assert_eq!(crd.spec.group, "flowgate.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["mli".to_string()][..])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let columns: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["ID", "Workload", "Phase", "URL", "Expires", "Age"]
    );
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_schema() {
    let (client, ns) = setup().await;
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let rejected =
        |name: &'static str, mutate: fn(&mut MlflowInstanceSpec), expect: &'static str| {
            let api = api.clone();
            async move {
                let mut s = spec(name);
                mutate(&mut s);
                let err = api
                    .create(&PostParams::default(), &MlflowInstance::new(name, s))
                    .await
                    .expect_err(name);
                let kube::Error::Api(status) = &err else {
                    panic!("{name}: {err}")
                };
                assert_eq!(status.code, 422, "{name}: {status:?}");
                assert!(
                    status.message.contains(expect),
                    "{name}: {:?} does not mention {expect:?}",
                    status.message
                );
            }
        };
    // idleAfter: a Go duration of at least a minute, or 0
    rejected(
        "eager-sleeper",
        |s| s.idle_after = Some("30s".into()),
        "idleAfter must be 0 (never) or at least 1m",
    )
    .await;
    rejected(
        "vague-sleeper",
        |s| s.idle_after = Some("soon".into()),
        "spec.idleAfter",
    )
    .await;
    // OpenAPI validation.
    rejected(
        "bad-sha",
        |s| s.artifacts.sha256 = "AB".repeat(32),
        "spec.artifacts.sha256",
    )
    .await;
    rejected(
        "short-sha",
        |s| s.artifacts.sha256 = "ab".into(),
        "spec.artifacts.sha256",
    )
    .await;
    rejected(
        "ftp-url",
        |s| s.artifacts.url = "ftp://x/a.tgz".into(),
        "spec.artifacts.url",
    )
    .await;
    rejected(
        "spacey-url",
        |s| s.artifacts.url = "https://x/a b.tgz".into(),
        "spec.artifacts.url",
    )
    .await;
    rejected(
        "long-workload",
        |s| s.workload = "x".repeat(254),
        "spec.workload",
    )
    .await;
    rejected(
        "empty-workload",
        |s| s.workload = String::new(),
        "spec.workload",
    )
    .await;
    rejected(
        "padded-workload",
        |s| s.workload = " 42".into(),
        "spec.workload",
    )
    .await;
    rejected("spacey-owner", |s| s.owner = "a b".into(), "spec.owner").await;
    rejected("ttl-pattern", |s| s.ttl = Some("1d".into()), "spec.ttl").await;
    // CEL.
    rejected(
        "both",
        |s| s.expires_at = Some(Time("2030-01-01T00:00:00Z".parse().unwrap())),
        "give exactly one of ttl and expiresAt",
    )
    .await;
    rejected(
        "neither",
        |s| s.ttl = None,
        "give exactly one of ttl and expiresAt",
    )
    .await;
    rejected(
        "short-ttl",
        |s| s.ttl = Some("30s".into()),
        "ttl must be at least 1m",
    )
    .await;
    rejected(
        "request-over-limit",
        |s| {
            s.resources = Some(ResourceOverrides {
                mlflow: Some(ContainerResources {
                    cpu: Some(RequestLimit {
                        request: "2".into(),
                        limit: "500m".into(),
                    }),
                    memory: None,
                }),
                ..Default::default()
            })
        },
        "the request must not exceed the limit",
    )
    .await;
    rejected(
        "not-a-quantity",
        |s| {
            s.resources = Some(ResourceOverrides {
                store_size: Some("lots".into()),
                ..Default::default()
            })
        },
        "storeSize must be a quantity",
    )
    .await;

    // Artefacts are immutable; the expiry is not (ttl → expiresAt, as extend does).
    create(&api, "fine", spec("fine")).await;
    let err = api
        .patch(
            "fine",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"artifacts": {"url": "https://elsewhere.test/b.tgz"}}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("artifacts are immutable"), "{err}");
    api.patch(
        "fine",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ttl": null, "expiresAt": "2030-01-01T00:00:00Z"}})),
    )
    .await
    .unwrap();
}

// ---------------------------------------------------------------- reconcile

#[tokio::test]
async fn a_resource_gets_owned_objects_a_status_and_events_and_deleting_it_cascades() {
    let (client, ns) = setup().await;
    let op = operator(&client, &ns);
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let mut s = spec("6543210");
    s.image = Some(ImageOverrides {
        mlflow: Some("flowgate/mlflow:custom".into()),
        adapter: None,
    });
    s.resources = Some(ResourceOverrides {
        mlflow: Some(ContainerResources {
            cpu: None,
            memory: Some(RequestLimit {
                request: "1Gi".into(),
                limit: "4Gi".into(),
            }),
        }),
        ..Default::default()
    });
    let created = create(&api, "job-6543210", s).await;
    let uid = created.uid().unwrap();
    let id = instance_id(&uid);
    let name = id.object_name();

    let ready = phase(&api, "job-6543210", Phase::Ready, Duration::from_secs(90)).await;
    let status = ready.status.clone().unwrap();
    assert_eq!(status.id.as_deref(), Some(id.as_str()));
    assert_eq!(
        status.url.as_deref(),
        Some(format!("https://ml.example.test/{id}/").as_str())
    );
    assert_eq!(status.ready_replicas, Some(1));
    assert_eq!(status.observed_generation, ready.metadata.generation);
    let created_at = ready.metadata.creation_timestamp.clone().unwrap().0;
    assert_eq!(
        status
            .expires_at
            .unwrap()
            .0
            .duration_since(created_at)
            .as_secs(),
        3600
    );
    for (type_, want) in [
        ("Ready", "True"),
        ("ArtefactsVerified", "True"),
        ("Expired", "False"),
    ] {
        let c = ready
            .condition(type_)
            .unwrap_or_else(|| panic!("no {type_}"));
        assert_eq!(c.status, want, "{type_}: {c:?}");
        assert!(!c.reason.is_empty());
    }
    assert_eq!(ready.labels()["flowgate.io/instance"], id.as_str());
    assert_eq!(ready.labels()["flowgate.io/workload"], "6543210");

    // The objects, all owned by the resource, made by the provisioner's builders.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let ingresses = Api::<Ingress>::namespaced(client.clone(), &ns);
    let d = deployments.get(&name).await.unwrap();
    let svc = services.get(&name).await.unwrap();
    let ing = ingresses.get(&name).await.unwrap();
    for (kind, meta) in [
        ("Deployment", &d.metadata),
        ("Service", &svc.metadata),
        ("Ingress", &ing.metadata),
    ] {
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1, "{kind}");
        assert_eq!(owners[0].kind, "MlflowInstance", "{kind}");
        assert_eq!(owners[0].uid, uid, "{kind}");
        assert_eq!(owners[0].controller, Some(true), "{kind}");
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], "flowgate-operator",
            "{kind}"
        );
        assert_eq!(labels["flowgate.io/instance"], id.as_str(), "{kind}");
    }
    let managers: Vec<_> = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, ["flowgate-operator"]);
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("flowgate/mlflow:custom")
    );
    assert_eq!(
        pod.containers[1].image.as_deref(),
        Some("flowgate/adapter:0.1.0")
    );
    let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
    assert_eq!(limits["memory"].0, "4Gi");
    assert_eq!(
        pod.init_containers.unwrap()[0].args.as_ref().unwrap()[4],
        sha_of("6543210")
    );
    let rules = ing.spec.unwrap().rules.unwrap();
    let path = &rules[0].http.as_ref().unwrap().paths[0];
    assert_eq!(path.path.as_deref(), Some(id.prefix().as_str()));

    // Events for the transitions.
    let events = events_for(&client, &ns, "job-6543210").await;
    let reasons: Vec<_> = events.iter().map(|(r, _)| r.as_str()).collect();
    assert!(reasons.contains(&"Created"), "{events:?}");
    assert!(reasons.contains(&"Ready"), "{events:?}");

    // `kubectl delete mli`: the garbage collector takes the objects.
    api.delete("job-6543210", &DeleteParams::background())
        .await
        .unwrap();
    assert!(gone(&deployments, &name).await, "Deployment left behind");
    assert!(gone(&services, &name).await, "Service left behind");
    assert!(gone(&ingresses, &name).await, "Ingress left behind");
    assert!(op.metrics.reconciles() > 0);
    op.stop().await;
}

#[tokio::test]
async fn a_resource_gets_only_the_images_resources_and_time_the_operator_allows() {
    let (client, ns) = setup().await;
    let op = operator(&client, &ns);
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    type Edit = fn(&mut MlflowInstanceSpec);
    let refused: [(&str, Edit, &str); 6] = [
        (
            "open-door",
            |s| s.access = Access::Public,
            "is not one the operator allows",
        ),
        (
            "borrowed-secret",
            |s| s.credentials = Some("flowgate-access-keys".into()),
            "are not granted to alice",
        ),
        (
            "miner",
            |s| {
                s.image = Some(ImageOverrides {
                    mlflow: Some("example.test/miner:latest".into()),
                    adapter: None,
                })
            },
            "is not one the operator allows",
        ),
        (
            "sidecar",
            |s| {
                s.image = Some(ImageOverrides {
                    mlflow: None,
                    adapter: Some("example.test/adapter:evil".into()),
                })
            },
            "is not one the operator allows",
        ),
        (
            "greedy-cpu",
            |s| {
                s.resources = Some(ResourceOverrides {
                    mlflow: Some(ContainerResources {
                        cpu: Some(RequestLimit {
                            request: "1".into(),
                            limit: "64".into(),
                        }),
                        memory: None,
                    }),
                    ..Default::default()
                })
            },
            "above the operator's ceiling",
        ),
        (
            "huge-store",
            |s| {
                s.resources = Some(ResourceOverrides {
                    store_size: Some("1Ti".into()),
                    ..Default::default()
                })
            },
            "above the operator's ceiling",
        ),
    ];
    for (name, mutate, want) in refused {
        let mut s = spec(name);
        mutate(&mut s);
        let r = create(&api, name, s).await;
        let failed = phase(&api, name, Phase::Failed, Duration::from_secs(60)).await;
        let message = failed.status.unwrap().message.unwrap_or_default();
        assert!(message.contains(want), "{name}: {message}");
        let id = instance_id(&r.uid().unwrap());
        assert!(
            Api::<Deployment>::namespaced(client.clone(), &ns)
                .get_opt(&id.object_name())
                .await
                .unwrap()
                .is_none(),
            "{name}: a Deployment was made"
        );
    }
    // A TTL past the operator's maximum (7 days) is capped.
    let mut long = spec("long");
    long.ttl = Some("10000h".into());
    let r = create(&api, "long", long).await;
    let ready = phase(&api, "long", Phase::Ready, Duration::from_secs(90)).await;
    let created_at = r.metadata.creation_timestamp.clone().unwrap().0;
    let expires = ready.status.unwrap().expires_at.unwrap().0;
    assert_eq!(expires.duration_since(created_at).as_secs(), 7 * 24 * 3600);
    let id = instance_id(&r.uid().unwrap());
    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(&id.object_name())
        .await
        .unwrap();
    assert_eq!(
        d.metadata.annotations.unwrap()["flowgate.io/expires-at"],
        expires.to_string()
    );
    op.stop().await;
}

/// A client acting as `user` (impersonated by the admin).
async fn as_user(user: &str, groups: &[&str]) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(user.into());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| (*g).to_owned()).collect());
    Client::try_from(config).unwrap()
}

/// Installs the admission policy of k8s/operator (cluster-wide; idempotent).
async fn install_admission_policy(client: &Client) {
    let text = std::fs::read_to_string(repo().join("k8s/operator/admission-policy.yaml")).unwrap();
    let docs = serde_saphyr::from_str_multiple::<serde_json::Value, Vec<_>>(&text).unwrap();
    for value in docs {
        let kind = value["kind"].as_str().unwrap();
        let name = value["metadata"]["name"].as_str().unwrap().to_owned();
        let resource = kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind),
            &match kind.to_lowercase().strip_suffix('y') {
                Some(stem) => format!("{stem}ies"),
                None => format!("{}s", kind.to_lowercase()),
            },
        );
        let object: DynamicObject = serde_json::from_value(value).unwrap();
        Api::<DynamicObject>::all_with(client.clone(), &resource)
            .patch(
                &name,
                &PatchParams::apply("flowgate-tests").force(),
                &Patch::Apply(&object),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_owner_is_the_requesting_user() {
    let (admin, ns) = setup().await;
    install_admission_policy(&admin).await;
    // The API's ServiceAccount, and alice and bob, may create MlflowInstances
    // here (the client Role).
    let token = token_for_role(
        &admin,
        &ns,
        "k8s/operator/client-role.yaml",
        "flowgate-provisioner",
    )
    .await;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "people"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "flowgate-mlflowinstances"},
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"},
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"},
        ],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let alice: Api<MlflowInstance> = Api::namespaced(as_user("alice", &[]).await, &ns);
    let mut for_bob = spec("for-bob");
    for_bob.owner = "bob".into();
    // The policy takes a moment to be loaded: wait until alice is refused.
    let message = eventually(
        "the admission policy to refuse alice's instance for bob",
        Duration::from_secs(60),
        || async {
            match alice
                .create(
                    &PostParams::default(),
                    &MlflowInstance::new("for-bob", for_bob.clone()),
                )
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Some(s.message),
                Ok(_) => {
                    let _ = alice.delete("for-bob", &DeleteParams::default()).await;
                    None
                }
                Err(e) => panic!("{e}"),
            }
        },
    )
    .await;
    assert!(message.contains("spec.owner"), "{message}");
    // Her own: fine; and she cannot hand it to bob afterwards.
    alice
        .create(
            &PostParams::default(),
            &MlflowInstance::new("mine", spec("mine")),
        )
        .await
        .unwrap();
    let err = alice
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"owner": "bob"}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.owner"), "{err}");
    // bob likewise cannot create in alice's name.
    let bob: Api<MlflowInstance> = Api::namespaced(as_user("bob", &[]).await, &ns);
    assert!(
        bob.create(
            &PostParams::default(),
            &MlflowInstance::new("bobs", spec("bobs"))
        )
        .await
        .is_err()
    );
    // The API's ServiceAccount creates on behalf of its token owners.
    let api_sa: Api<MlflowInstance> = Api::namespaced(client_with_token(&token).await, &ns);
    let mut for_carol = spec("for-carol");
    for_carol.owner = "carol".into();
    api_sa
        .create(
            &PostParams::default(),
            &MlflowInstance::new("for-carol", for_carol),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn hand_edits_of_the_objects_are_put_back() {
    let (client, ns) = setup().await;
    let op = operator(&client, &ns);
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = create(&api, "drift", spec("drift")).await;
    let name = instance_id(&r.uid().unwrap()).object_name();
    phase(&api, "drift", Phase::Ready, Duration::from_secs(90)).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let ingresses = Api::<Ingress>::namespaced(client.clone(), &ns);

    // As `kubectl scale`, `kubectl set image`, `kubectl edit` and `kubectl delete` would.
    let by_hand = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    deployments
        .patch(
            &name,
            &by_hand,
            &Patch::Strategic(json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "mlflow", "image": "evil/mlflow:latest"}]}}}})),
        )
        .await
        .unwrap();
    // (A replaced port list: SSA alone cannot merge the operator's port back
    // next to one of the same name, so the Service is recreated.)
    services
        .patch(
            &name,
            &by_hand,
            &Patch::Merge(json!({"spec": {"ports": [{"name": "http", "port": 81, "targetPort": "http", "protocol": "TCP"}]}})),
        )
        .await
        .unwrap();
    ingresses
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();

    eventually(
        "the Deployment to be put back",
        Duration::from_secs(30),
        || async {
            let d = deployments.get(&name).await.ok()?;
            let spec = d.spec?;
            let image = spec.template.spec?.containers[0].image.clone()?;
            (spec.replicas == Some(1) && image == "flowgate/mlflow:0.1.0").then_some(())
        },
    )
    .await;
    eventually(
        "the Service to be put back",
        Duration::from_secs(30),
        || async {
            let ports = services.get(&name).await.ok()?.spec?.ports?;
            (ports.len() == 1 && ports[0].port == 80).then_some(())
        },
    )
    .await;
    let ing = eventually(
        "the Ingress to come back",
        Duration::from_secs(30),
        || async { ingresses.get_opt(&name).await.ok()? },
    )
    .await;
    assert_eq!(
        ing.metadata.owner_references.unwrap()[0].uid,
        r.uid().unwrap()
    );
    phase(&api, "drift", Phase::Ready, Duration::from_secs(60)).await;
    let events = events_for(&client, &ns, "drift").await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "Recreated" && n.starts_with("Service")),
        "{events:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn expired_resources_are_deleted_with_their_objects() {
    let (client, ns) = setup().await;
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    // Expired before the operator even starts.
    let mut past = spec("past");
    past.ttl = None;
    past.expires_at = Some(Time("2020-01-01T00:00:00Z".parse().unwrap()));
    create(&api, "past", past).await;
    let op = operator(&client, &ns);
    // Expires a few seconds after it is Ready: the requeue at expiry deletes it.
    let mut soon = spec("soon");
    soon.ttl = None;
    let expiry = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(8);
    soon.expires_at = Some(Time(expiry));
    let r = create(&api, "soon", soon).await;
    let name = instance_id(&r.uid().unwrap()).object_name();
    let ready = phase(&api, "soon", Phase::Ready, Duration::from_secs(60)).await;
    assert_eq!(ready.condition("Expired").unwrap().status, "False");
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    assert!(deployments.get_opt(&name).await.unwrap().is_some());

    assert!(gone(&api, "past").await, "the expired resource stays");
    // It lives until its expiry, and not much longer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_seen = jiff::Timestamp::now();
    while api.get_opt("soon").await.unwrap().is_some() {
        last_seen = jiff::Timestamp::now();
        assert!(
            Instant::now() < deadline,
            "the resource outlived its expiry"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last_seen >= expiry - jiff::SignedDuration::from_millis(500),
        "deleted at {last_seen}, before its expiry {expiry}"
    );
    assert!(gone(&deployments, &name).await, "its Deployment stays");
    assert!(gone(&Api::<Service>::namespaced(client.clone(), &ns), &name).await);
    for r in ["past", "soon"] {
        let events = events_for(&client, &ns, r).await;
        assert!(
            events.iter().any(|(reason, _)| reason == "Expired"),
            "{r}: {events:?}"
        );
    }
    op.stop().await;
}

#[tokio::test]
async fn routes_are_made_where_the_cluster_serves_them() {
    let (client, ns) = setup().await;
    let op = spawn_operator(
        client.clone(),
        config(settings(&ns).route_kind(RouteKind::Auto), "routes", None),
    );
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = create(&api, "routed", spec("routed")).await;
    let id = instance_id(&r.uid().unwrap());
    phase(&api, "routed", Phase::Ready, Duration::from_secs(90)).await;
    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &route_resource());
    let route = routes.get(&id.object_name()).await.unwrap();
    assert_eq!(route.data["spec"]["path"], id.prefix());
    assert_eq!(
        route.metadata.owner_references.as_ref().unwrap()[0].uid,
        r.uid().unwrap()
    );
    // Drift on a Route is watched too.
    routes
        .delete(&id.object_name(), &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the Route to come back",
        Duration::from_secs(30),
        || async { routes.get_opt(&id.object_name()).await.ok()? },
    )
    .await;
    assert!(
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .get_opt(&id.object_name())
            .await
            .unwrap()
            .is_none()
    );
    op.stop().await;
}

#[tokio::test]
async fn http_routes_are_made_when_a_gateway_is_configured() {
    let (client, ns) = setup().await;
    let op = spawn_operator(
        client.clone(),
        config(
            settings(&ns)
                .route_kind(RouteKind::Gateway)
                .gateway("gateway-system/shared"),
            "http-routes",
            None,
        ),
    );
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = create(&api, "via-gateway", spec("via-gateway")).await;
    let id = instance_id(&r.uid().unwrap());
    let name = id.object_name();
    phase(&api, "via-gateway", Phase::Ready, Duration::from_secs(90)).await;
    let routes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &http_route_resource());
    let route = routes.get(&name).await.unwrap();
    let spec_ = &route.data["spec"];
    assert_eq!(spec_["parentRefs"][0]["namespace"], "gateway-system");
    assert_eq!(spec_["parentRefs"][0]["name"], "shared");
    assert_eq!(spec_["hostnames"], json!(["ml.example.test"]));
    assert_eq!(
        spec_["rules"][0]["matches"][0]["path"],
        json!({"type": "PathPrefix", "value": id.prefix()})
    );
    assert_eq!(spec_["rules"][0]["backendRefs"][0]["name"], name);
    assert_eq!(spec_["rules"][0]["backendRefs"][0]["port"], 80);
    assert_eq!(
        route.metadata.owner_references.as_ref().unwrap()[0].uid,
        r.uid().unwrap()
    );
    assert_eq!(
        route.labels()["app.kubernetes.io/managed-by"],
        "flowgate-operator"
    );
    assert!(
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .get_opt(&name)
            .await
            .unwrap()
            .is_none()
    );
    eventually(
        "an Event naming the HTTPRoute",
        Duration::from_secs(30),
        || async {
            let events = events_for(&client, &ns, "via-gateway").await;
            events
                .iter()
                .any(|(reason, note)| reason == "Created" && note.contains("HTTPRoute"))
                .then_some(())
        },
    )
    .await;

    // The Gateway refuses it (as its controller would write): the status says so.
    routes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"parents": [{
                "parentRef": {"namespace": "gateway-system", "name": "shared"},
                "controllerName": "flowgate.test/gateway-controller",
                "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
                    "message": "routes from this namespace are not allowed",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
            }]}})),
        )
        .await
        .unwrap();
    eventually(
        "the refusal in the status",
        Duration::from_secs(30),
        || async {
            let message = api.get("via-gateway").await.ok()?.status?.message?;
            message
                .contains("Gateway gateway-system/shared refused the route: NotAllowedByListeners")
                .then_some(())
        },
    )
    .await;
    // Drift on an HTTPRoute is watched too.
    routes
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the HTTPRoute to come back",
        Duration::from_secs(30),
        || async {
            routes
                .get_opt(&name)
                .await
                .ok()?
                .filter(|r| r.uid() != route.uid())
        },
    )
    .await;
    api.delete("via-gateway", &DeleteParams::default())
        .await
        .unwrap();
    assert!(gone(&routes, &name).await, "HTTPRoute left behind");
    op.stop().await;
}

#[tokio::test]
async fn reconcile_errors_go_to_the_status_and_are_retried_with_backoff() {
    let (client, ns) = setup().await;
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = create(&api, "blocked", spec("blocked")).await;
    let name = instance_id(&r.uid().unwrap()).object_name();
    // A Service of that name controlled by something else: the operator's
    // apply (a second controller reference) is refused, and it must not
    // delete what is not its own.
    let cms = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns);
    let other = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "other-owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let squatter: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "other-owner",
            "uid": other.uid().unwrap(), "controller": true,
        }]},
        "spec": {"ports": [{"port": 80}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &squatter)
        .await
        .unwrap();

    let op = operator(&client, &ns);
    let failing = eventually(
        "the error in the status",
        Duration::from_secs(30),
        || async {
            let r = api.get("blocked").await.ok()?;
            (r.condition("Ready")?.reason == "ReconcileError").then_some(r)
        },
    )
    .await;
    let status = failing.status.clone().unwrap();
    assert!(
        status.message.unwrap().contains("Controller"),
        "{:?}",
        failing.status
    );
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(
        status.id.as_deref(),
        Some(name.trim_start_matches("mlflow-"))
    );
    let events = events_for(&client, &ns, "blocked").await;
    assert!(
        events.iter().any(|(r, _)| r == "ReconcileError"),
        "{events:?}"
    );
    // Backoff: 1 s, 2 s, 4 s ... (plus the odd retry on a watch event), not a hot loop.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failures = op.metrics.failures();
    assert!(
        (2..=12).contains(&failures),
        "{failures} failed reconciles in ~6 s"
    );
    assert_eq!(
        services.get(&name).await.unwrap().owner_references()[0].uid,
        other.uid().unwrap(),
        "the operator took over a Service it does not own"
    );

    // The obstacle goes: the next retry converges and clears the error.
    services
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let ready = phase(&api, "blocked", Phase::Ready, Duration::from_secs(90)).await;
    assert!(ready.status.unwrap().message.is_none());
    op.stop().await;
}

#[tokio::test]
async fn a_failing_pod_fails_the_instance_with_a_reason() {
    let (client, ns) = setup().await;
    let op = operator(&client, &ns);
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = create(&api, "broken", spec("broken")).await;
    let name = instance_id(&r.uid().unwrap()).object_name();
    // kwok does not run containers: the fetch init container is made to look
    // as a kubelet reports one that keeps failing (a checksum mismatch).
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
    let pod = eventually("the pod", Duration::from_secs(60), || async {
        pods.list(&ListParams::default().labels(&format!(
            "flowgate.io/instance={}",
            name.trim_start_matches("mlflow-")
        )))
        .await
        .ok()?
        .items
        .into_iter()
        .next()
    })
    .await;
    // kwok marks a pod Ready once (while it has no podIP); after that the
    // status is ours to write, as a kubelet would.
    eventually(
        "kwok to mark the pod Ready",
        Duration::from_secs(60),
        || async {
            let p = pods.get(&pod.name_any()).await.ok()?;
            p.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    phase(&api, "broken", Phase::Ready, Duration::from_secs(60)).await;
    let failing = json!({"status": {
        "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
        "initContainerStatuses": [{
            "name": "fetch", "image": "flowgate/adapter:0.1.0", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "sha256 mismatch: expected ab.., got cd.."}},
        }],
    }});
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Strategic(failing),
    )
    .await
    .unwrap();
    let failed = eventually("the instance to fail", Duration::from_secs(30), || async {
        let r = api.get("broken").await.ok()?;
        let c = r.condition("ArtefactsVerified")?;
        (c.status == "False").then_some(r)
    })
    .await;
    let c = failed.condition("ArtefactsVerified").unwrap();
    assert_eq!(c.reason, "FetchFailed");
    assert!(c.message.contains("sha256 mismatch"), "{c:?}");
    let failed = phase(&api, "broken", Phase::Failed, Duration::from_secs(30)).await;
    assert_eq!(failed.condition("Ready").unwrap().reason, "FetchFailed");
    assert!(
        failed
            .status
            .unwrap()
            .message
            .unwrap()
            .contains("sha256 mismatch")
    );
    let events = events_for(&client, &ns, "broken").await;
    assert!(events.iter().any(|(r, _)| r == "FetchFailed"), "{events:?}");
    // Through the backend, as the portal would see it.
    let b = OperatorBackend::new(client.clone(), settings(&ns));
    let i = b.get(&instance_id(&r.uid().unwrap())).await.unwrap();
    assert_eq!(i.phase, Phase::Failed);
    op.stop().await;
}

// ---------------------------------------------------------------- sleep and wake

/// The Service's selector and target port, once they are `want`.
async fn service_targets(
    services: &Api<Service>,
    name: &str,
    selector: &std::collections::BTreeMap<String, String>,
    port: &str,
) {
    eventually(
        &format!("the Service to target {selector:?} on {port}"),
        Duration::from_secs(30),
        || async {
            let spec = services.get(name).await.ok()?.spec?;
            let target = serde_json::to_value(&spec.ports?[0].target_port).ok()?;
            (spec.selector.as_ref() == Some(selector) && target == port).then_some(())
        },
    )
    .await;
}

/// Sleep and wake of the operator's instances on the real control plane
/// (kwok makes the pods Ready; the activity read and the Ingress are the
/// real node's, testenv/node/e2e): while the Deployment is asleep the
/// reconcile keeps it at zero replicas with its Service on the operator's
/// pods (the activator), even across a spec change, and the status says
/// Sleeping; ten page visits wake it once and the Service comes back when a
/// pod is available. An operator without an activator wakes what was left
/// asleep and refuses a resource's idleAfter with the reason.
#[tokio::test]
async fn idle_instances_sleep_and_a_visit_wakes_them_once() {
    use provisioner::kube::sleep::{Manager, SleepSettings, Sleeper, Wake};
    use provisioner::kube::watch::Watch;

    let (client, ns) = setup().await;
    let activator_labels = SleepSettings::parse_selector(
        "app.kubernetes.io/name=flowgate,app.kubernetes.io/component=operator",
    )
    .unwrap();
    let mut c = config(settings(&ns), "solo", None);
    c.activator = Some(activator_labels.clone());
    // `public`: the activator's gate lets visitors through without a link
    c.policy.access.push(Access::Public);
    let op = spawn_operator(client.clone(), c);
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let mut sleepy = spec("sleepy");
    sleepy.idle_after = Some("2h".into());
    sleepy.access = Access::Public;
    let r = create(&api, "sleepy", sleepy).await;
    let id = instance_id(&r.uid().unwrap());
    let name = id.object_name();
    phase(&api, "sleepy", Phase::Ready, Duration::from_secs(90)).await;
    let own =
        std::collections::BTreeMap::from([("flowgate.io/instance".to_owned(), id.to_string())]);
    let d = deployments.get(&name).await.unwrap();
    assert_eq!(d.annotations()["flowgate.io/idle-after"], "2h");
    let b = OperatorBackend::new(client.clone(), settings(&ns));
    assert_eq!(b.get(&id).await.unwrap().idle_after.as_deref(), Some("2h"));

    let watch = Watch::start(client.clone(), &ns);
    let sleeper = Arc::new(
        Sleeper::new(
            client.clone(),
            &ns,
            Arc::clone(&watch),
            SleepSettings::new(Manager::Operator, None, activator_labels.clone()),
        )
        .unwrap(),
    );
    watch.ready().await;

    // Asleep: the reconcile points the Service at the activator and keeps
    // the replicas at zero, through a spec change too.
    assert!(sleeper.sleep(&id, &d).await.unwrap());
    phase(&api, "sleepy", Phase::Sleeping, Duration::from_secs(30)).await;
    service_targets(&services, &name, &activator_labels, "activator").await;
    api.patch(
        "sleepy",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"idleAfter": "3h"}})),
    )
    .await
    .unwrap();
    eventually(
        "the spec change applied",
        Duration::from_secs(30),
        || async {
            let d = deployments.get(&name).await.ok()?;
            (d.annotations().get("flowgate.io/idle-after")? == "3h").then_some(d)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = deployments.get(&name).await.unwrap();
    assert_eq!(
        d.spec.as_ref().unwrap().replicas,
        Some(0),
        "a reconcile woke it"
    );
    assert_eq!(d.annotations()["flowgate.io/sleep"], "sleeping");
    service_targets(&services, &name, &activator_labels, "activator").await;
    assert_eq!(b.get(&id).await.unwrap().phase, Phase::Sleeping);
    let events = events_for(&client, &ns, "sleepy").await;
    assert!(events.iter().any(|(r, _)| r == "Sleeping"), "{events:?}");

    // The activator (this test's listener): a JSON call does not wake it;
    // ten page visits at once wake it once.
    let activator = TestActivator::start(Arc::clone(&sleeper)).await;
    let addr = activator.addr;
    eventually(
        "the watch to see it asleep",
        Duration::from_secs(30),
        || async { watch.look(&id).filter(|(i, _)| i.phase == Phase::Sleeping) },
    )
    .await;
    let http = reqwest::Client::new();
    let get = |accept: &'static str| {
        http.get(format!("http://{addr}/{id}/"))
            .header("host", "ml.example.test")
            .header("accept", accept)
            .send()
    };
    assert_eq!(get("application/json").await.unwrap().status(), 503);
    let visits = futures_util::future::join_all((0..10).map(|_| get("text/html"))).await;
    for v in visits {
        let v = v.unwrap();
        assert_eq!(v.status(), 503);
        assert!(v.text().await.unwrap().contains("Waking up"));
    }
    assert_eq!(sleeper.wakes(), 1, "ten visits, one wake");
    assert_eq!(sleeper.wake(&id).await.unwrap(), Wake::AlreadyWaking);
    eventually("the route handed back", Duration::from_secs(90), || async {
        sleeper.tick().await;
        let r = api.get("sleepy").await.ok()?;
        (r.status?.phase == Some(Phase::Ready)).then_some(())
    })
    .await;
    service_targets(&services, &name, &own, "http").await;
    let d = deployments.get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    assert!(!d.annotations().contains_key("flowgate.io/sleep"));
    let events = events_for(&client, &ns, "sleepy").await;
    assert!(events.iter().any(|(r, _)| r == "Waking"), "{events:?}");
    activator.stop().await;

    // Asleep again (with the operator's idle time, not its own), then an
    // operator without an activator: it wakes the instance, and refuses an
    // idleAfter it cannot honour.
    api.patch(
        "sleepy",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"idleAfter": null}})),
    )
    .await
    .unwrap();
    eventually(
        "the spec change applied",
        Duration::from_secs(30),
        || async {
            let d = deployments.get(&name).await.ok()?;
            (!d.annotations().contains_key("flowgate.io/idle-after")).then_some(())
        },
    )
    .await;
    let d = deployments.get(&name).await.unwrap();
    assert!(sleeper.sleep(&id, &d).await.unwrap());
    phase(&api, "sleepy", Phase::Sleeping, Duration::from_secs(30)).await;
    op.stop().await;
    let mut c = config(settings(&ns), "solo", None);
    c.policy.access.push(Access::Public);
    let op = spawn_operator(client.clone(), c);
    phase(&api, "sleepy", Phase::Ready, Duration::from_secs(90)).await;
    service_targets(&services, &name, &own, "http").await;
    let mut eager = spec("eager");
    eager.idle_after = Some("1h".into());
    create(&api, "eager", eager).await;
    let failed = phase(&api, "eager", Phase::Failed, Duration::from_secs(30)).await;
    let message = failed.status.unwrap().message.unwrap();
    assert!(message.contains("--activator-listen"), "{message}");
    op.stop().await;
}

// ---------------------------------------------------------------- restarts, replicas, scale

#[tokio::test]
async fn an_operator_restarted_mid_reconcile_converges() {
    let (client, ns) = setup().await;
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    let config_ = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let dying = ClientBuilder::try_from(config_)
        .unwrap()
        .with_layer(&CutAfterDeploymentApply(Arc::clone(&cut)))
        .build();
    let first = spawn_operator(dying, config(settings(&ns), "first", Some(fast_lease())));
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    eventually(
        "the first operator to lead",
        Duration::from_secs(30),
        || async {
            let l = leases.get_opt("flowgate-operator").await.ok()??;
            (l.spec?.holder_identity.as_deref() == Some("first")).then_some(())
        },
    )
    .await;
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = create(&api, "restart", spec("restart")).await;
    let name = instance_id(&r.uid().unwrap()).object_name();
    eventually(
        "the reconcile to be cut",
        Duration::from_secs(30),
        || async { cut.load(Ordering::SeqCst).then_some(()) },
    )
    .await;
    first.crash().await;
    // Half made: the Deployment, nothing else, no status.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    assert!(deployments.get_opt(&name).await.unwrap().is_some());
    assert!(
        Api::<Service>::namespaced(client.clone(), &ns)
            .get_opt(&name)
            .await
            .unwrap()
            .is_none()
    );
    assert!(api.get("restart").await.unwrap().status.is_none());

    // A new replica waits out the dead leader's Lease, then converges.
    let started = Instant::now();
    let second = spawn_operator(
        client.clone(),
        config(settings(&ns), "second", Some(fast_lease())),
    );
    let ready = phase(&api, "restart", Phase::Ready, Duration::from_secs(90)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "took over a live lease"
    );
    assert!(ready.status.unwrap().message.is_none());
    assert!(
        Api::<Service>::namespaced(client.clone(), &ns)
            .get_opt(&name)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .get_opt(&name)
            .await
            .unwrap()
            .is_some()
    );
    let lease = leases.get("flowgate-operator").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("second"));
    assert!(lease.lease_transitions.unwrap() >= 1);
    second.stop().await;
    // A graceful stop releases the Lease.
    let lease = leases.get("flowgate-operator").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity, None);
}

#[tokio::test]
async fn of_two_replicas_one_leads_and_the_other_takes_over() {
    let (client, ns) = setup().await;
    let a = spawn_operator(
        client.clone(),
        config(settings(&ns), "a", Some(fast_lease())),
    );
    let b = spawn_operator(
        client.clone(),
        config(settings(&ns), "b", Some(fast_lease())),
    );
    let (leader, follower) = eventually("a leader", Duration::from_secs(30), || async {
        match (a.metrics.is_leader(), b.metrics.is_leader()) {
            (true, false) => Some(("a", "b")),
            (false, true) => Some(("b", "a")),
            (true, true) => panic!("two leaders"),
            _ => None,
        }
    })
    .await;
    let (leading, following) = if leader == "a" { (a, b) } else { (b, a) };
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    create(&api, "one", spec("one")).await;
    phase(&api, "one", Phase::Ready, Duration::from_secs(90)).await;
    assert!(leading.metrics.reconciles() > 0);
    assert_eq!(following.metrics.reconciles(), 0, "the follower reconciled");
    assert!(!following.metrics.is_leader());

    // The leader stops (a rolling update): it releases the Lease, the
    // follower leads within a retry period or two.
    let stopped = Instant::now();
    leading.stop().await;
    eventually("the follower to lead", Duration::from_secs(10), || async {
        following.metrics.is_leader().then_some(())
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "a released lease was not taken at once"
    );
    let holder = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("flowgate-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some(follower));
    create(&api, "two", spec("two")).await;
    phase(&api, "two", Phase::Ready, Duration::from_secs(90)).await;
    assert!(following.metrics.reconciles() > 0);
    following.stop().await;
}

#[tokio::test]
async fn two_hundred_resources_created_at_once_all_reconcile() {
    const N: usize = 200;
    let (client, ns) = setup().await;
    // The production settings (OperatorConfig::new), without a Lease.
    let mut production = OperatorConfig::new(settings(&ns));
    production.leader_election = None;
    let op = spawn_operator(client.clone(), production);
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            async move { create(&api, &format!("bulk-{i:03}"), spec(&format!("bulk-{i:03}"))).await }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let created = started.elapsed();
    let count = |want: Option<Phase>| {
        let api = api.clone();
        async move {
            api.list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .filter(|r| match want {
                    Some(p) => r.status.as_ref().and_then(|s| s.phase) == Some(p),
                    None => r.status.as_ref().and_then(|s| s.url.as_ref()).is_some(),
                })
                .count()
        }
    };
    eventually(
        "every resource to be reconciled",
        Duration::from_secs(600),
        || async { (count(None).await == N).then_some(()) },
    )
    .await;
    let reconciled = started.elapsed();
    eventually(
        "every instance to be Ready",
        Duration::from_secs(900),
        || async { (count(Some(Phase::Ready)).await == N).then_some(()) },
    )
    .await;
    let ready = started.elapsed();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=flowgate-operator"))
        .await
        .unwrap();
    assert_eq!(deployments.items.len(), N);
    eprintln!(
        "200 resources: created in {:.1} s, all reconciled (objects + status) after {:.1} s, all Ready after {:.1} s; {} reconciles, {} failed",
        created.as_secs_f64(),
        reconciled.as_secs_f64(),
        ready.as_secs_f64(),
        op.metrics.reconciles(),
        op.metrics.failures()
    );
    op.stop().await;
}

// ---------------------------------------------------------------- kubectl, backend, RBAC, binary

fn kubectl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(repo().join("testenv/k8s/bin/kubectl"))
        .arg(format!("--kubeconfig={}", cluster().kubeconfig.display()))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn kubectl_apply_of_the_example_makes_an_instance() {
    let (client, ns) = setup().await;
    let example = repo().join("k8s/crd/example.yaml");
    let example = example.to_str().unwrap();
    let dry = kubectl(&["apply", "--dry-run=server", "-n", &ns, "-f", example]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert!(String::from_utf8_lossy(&dry.stdout).contains("created (server dry run)"));
    let op = operator(&client, &ns);
    let applied = kubectl(&["apply", "-n", &ns, "-f", example]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let r = phase(&api, "job-6543210", Phase::Ready, Duration::from_secs(90)).await;
    let id = instance_id(&r.uid().unwrap());
    assert_eq!(
        r.status.unwrap().url.unwrap(),
        format!("https://ml.example.test/{id}/")
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt(&id.object_name())
            .await
            .unwrap()
            .is_some()
    );
    // The printer columns, by short name.
    let got = kubectl(&["get", "mli", "-n", &ns]);
    let table = String::from_utf8_lossy(&got.stdout);
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ID", "PHASE", "URL", "EXPIRES", "AGE"]);
    let row: Vec<_> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["job-6543210", id.as_str(), "Ready"]);
    assert_eq!(row[3], format!("https://ml.example.test/{id}/"));
    // Re-applying is a no-op; an edit of the artefacts is refused.
    let again = kubectl(&["apply", "-n", &ns, "-f", example]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("unchanged"));
    op.stop().await;
}

fn request(workload: &str) -> CreateRequest {
    CreateRequest {
        workload: Workload::parse(workload).unwrap(),
        owner: "alice".into(),
        artifacts: Artifacts::validated(
            &format!("https://store.example.test/{}.tgz", sha_of(workload)),
            &sha_of(workload),
            &["https"],
        )
        .unwrap(),
        ttl: Duration::from_secs(24 * 3600),
        writes: false,
        // the operator allows `link` only, by default
        access: Access::Link,
        credentials: None,
        idle_after: None,
    }
}

#[tokio::test]
async fn the_operator_backend_drives_the_lifecycle_through_resources() {
    let (client, ns) = setup().await;
    let op = operator(&client, &ns);
    let b = Arc::new(OperatorBackend::new(client.clone(), settings(&ns)));
    let p = service(b.clone(), client.clone(), &ns, settings(&ns).ttl);
    let anyone = provisioner::service::Caller::Anyone;
    let created = p.create(request("task/77 (retry)")).await.unwrap();
    assert!(created.created);
    let i = created.instance;
    assert_eq!(i.phase, Phase::Pending);
    assert_eq!(i.url, format!("https://ml.example.test/{}/", i.id));
    assert_eq!(
        i.expires_at.duration_since(i.created_at).as_secs(),
        24 * 3600
    );
    let again = p.create(request("task/77 (retry)")).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.instance.id, i.id);
    assert!(!i.writes);
    let mut bob = request("8888");
    bob.owner = "bob".into();
    // an idle time of its own goes into the resource as a Go duration
    bob.idle_after = Some(Duration::from_secs(5400));
    let other = p.create(bob).await.unwrap().instance;
    assert_eq!(other.idle_after.as_deref(), Some("1h 30m"));
    let resources: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let all = resources.list(&ListParams::default()).await.unwrap().items;
    let bobs = all.iter().find(|r| r.spec.workload == "8888").unwrap();
    assert_eq!(bobs.spec.idle_after.as_deref(), Some("90m"));

    let ready = p
        .wait_ready(&i.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();
    assert_eq!(ready.phase, Phase::Ready);
    assert_eq!(ready.url, i.url);
    // Its objects are named after the id the backend reported.
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt(&i.id.object_name())
            .await
            .unwrap()
            .is_some()
    );
    // writes go through the resource to the adapter; off unless asked for
    let env_of = |d: Deployment| -> std::collections::BTreeMap<String, String> {
        let pod = d.spec.unwrap().template.spec.unwrap();
        let adapter = pod
            .containers
            .into_iter()
            .find(|c| c.name == "adapter")
            .unwrap();
        adapter
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    };
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let env = env_of(deployments.get(&i.id.object_name()).await.unwrap());
    assert_eq!(env["FLOWGATE_WRITES"], "off");
    assert_eq!(env["FLOWGATE_PUBLIC_HOST"], "ml.example.test");
    let mut writable = request("task/77 (retry)");
    writable.writes = true;
    // the same workload and artefacts with writes on is another instance
    let writable = p.create(writable).await.unwrap();
    assert!(writable.created && writable.instance.writes);
    let w = writable.instance;
    assert_ne!(w.id, i.id);
    p.wait_ready(&w.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();
    assert!(b.get(&w.id).await.unwrap().writes);
    assert_eq!(
        env_of(deployments.get(&w.id.object_name()).await.unwrap())["FLOWGATE_WRITES"],
        "on"
    );
    b.delete(&w.id).await.unwrap();
    eventually(
        "the writable instance gone",
        Duration::from_secs(30),
        || async { (b.list(&ListFilter::default()).await.ok()?.len() == 2).then_some(()) },
    )
    .await;
    let bobs = b
        .list(&ListFilter {
            workload: None,
            owner: Some("bob".into()),
        })
        .await
        .unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].id, other.id);

    let extended = p
        .extend(&anyone, &i.id, Duration::from_secs(12 * 3600))
        .await
        .unwrap();
    assert_eq!(
        extended.expires_at.duration_since(i.expires_at).as_secs(),
        12 * 3600
    );
    assert!(matches!(
        p.extend(&anyone, &i.id, Duration::from_secs(30 * 24 * 3600))
            .await,
        Err(Error::Invalid { .. })
    ));
    let r = eventually(
        "the new expiry in the status",
        Duration::from_secs(30),
        || async {
            let r = Api::<MlflowInstance>::namespaced(client.clone(), &ns)
                .list(&ListParams::default().labels(&format!("flowgate.io/instance={}", i.id)))
                .await
                .ok()?
                .items
                .pop()?;
            (r.status.as_ref()?.expires_at.as_ref()?.0 == extended.expires_at).then_some(r)
        },
    )
    .await;
    assert!(r.spec.ttl.is_none());

    b.delete(&i.id).await.unwrap();
    assert!(
        gone(
            &Api::<Service>::namespaced(client.clone(), &ns),
            &i.id.object_name()
        )
        .await
    );
    assert!(matches!(b.get(&i.id).await, Err(Error::NotFound(_))));
    assert!(matches!(b.delete(&i.id).await, Err(Error::NotFound(_))));
    op.stop().await;

    // gc (for when the operator is down): only the expired resources go.
    let api: Api<MlflowInstance> = Api::namespaced(client.clone(), &ns);
    let mut past = spec("gc-me");
    past.ttl = None;
    past.expires_at = Some(Time("2020-01-01T00:00:00Z".parse().unwrap()));
    let old = create(&api, "gc-me", past).await;
    let old_id = instance_id(&old.uid().unwrap());
    assert_eq!(b.get(&old_id).await.unwrap().phase, Phase::Expired);
    let dry = b.gc(true).await.unwrap();
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0].name, "gc-me");
    assert!(api.get_opt("gc-me").await.unwrap().is_some());
    assert_eq!(b.gc(false).await.unwrap().len(), 1);
    assert!(gone(&api, "gc-me").await);
    assert_eq!(b.get(&other.id).await.unwrap().id, other.id);
}

/// A token for a new ServiceAccount bound to the Role in `role_file`.
async fn token_for_role(client: &Client, ns: &str, role_file: &str, sa: &str) -> String {
    let text = std::fs::read_to_string(repo().join(role_file)).unwrap();
    let role: Role = serde_saphyr::from_str(text.split("\n---\n").next().unwrap()).unwrap();
    let role_name = role.name_any();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap();
    sas.create(&PostParams::default(), &account).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": sa},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let tr: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let tr: TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &tr)
        .await
        .unwrap();
    tr.status.unwrap().token
}

#[tokio::test]
async fn the_least_privilege_roles_are_enough() {
    let (admin, ns) = setup().await;
    let operator_token =
        token_for_role(&admin, &ns, "k8s/operator/role.yaml", "flowgate-operator").await;
    let client_token = token_for_role(
        &admin,
        &ns,
        "k8s/operator/client-role.yaml",
        "flowgate-provisioner",
    )
    .await;
    let limited_operator = client_with_token(&operator_token).await;
    let limited_client = client_with_token(&client_token).await;
    for c in [&limited_operator, &limited_client] {
        let err = Api::<Secret>::namespaced(c.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 403),
            "{err}"
        );
    }

    // The operator, with leader election, on Ingresses and on Routes.
    let op = spawn_operator(
        limited_operator.clone(),
        config(settings(&ns), "limited", Some(fast_lease())),
    );
    let b = Arc::new(OperatorBackend::new(limited_client.clone(), settings(&ns)));
    let p = service(b.clone(), limited_client.clone(), &ns, settings(&ns).ttl);
    let i = p.create(request("rbac")).await.unwrap().instance;
    p.wait_ready(&i.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();
    let name = i.id.object_name();
    let services = Api::<Service>::namespaced(admin.clone(), &ns);
    services
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"ports": [{"name": "http", "port": 81, "targetPort": "http"}]}}),
            ),
        )
        .await
        .unwrap();
    eventually(
        "the Service to be put back",
        Duration::from_secs(30),
        || async { (services.get(&name).await.ok()?.spec?.ports?[0].port == 80).then_some(()) },
    )
    .await;
    assert_eq!(b.list(&ListFilter::default()).await.unwrap().len(), 1);
    p.extend(
        &provisioner::service::Caller::Anyone,
        &i.id,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    b.gc(false).await.unwrap();
    // Expiry: the operator deletes the resource itself.
    let api: Api<MlflowInstance> = Api::namespaced(admin.clone(), &ns);
    let mut past = spec("rbac-expired");
    past.ttl = None;
    past.expires_at = Some(Time("2020-01-01T00:00:00Z".parse().unwrap()));
    create(&api, "rbac-expired", past).await;
    assert!(gone(&api, "rbac-expired").await);
    let expired_events = events_for(&admin, &ns, "rbac-expired").await;
    assert!(
        expired_events.iter().any(|(r, _)| r == "Expired"),
        "{expired_events:?}"
    );
    b.delete(&i.id).await.unwrap();
    assert!(gone(&services, &name).await);
    assert_eq!(op.metrics.failures(), 0, "a reconcile was refused");
    op.stop().await;

    let op = spawn_operator(
        limited_operator.clone(),
        config(
            settings(&ns).route_kind(RouteKind::Route),
            "limited-routes",
            Some(fast_lease()),
        ),
    );
    let i = p.create(request("rbac-route")).await.unwrap().instance;
    p.wait_ready(&i.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();
    let routes: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &route_resource());
    assert!(routes.get_opt(&i.id.object_name()).await.unwrap().is_some());
    assert_eq!(op.metrics.failures(), 0, "a reconcile was refused");
    op.stop().await;

    let op = spawn_operator(
        limited_operator,
        config(
            settings(&ns)
                .route_kind(RouteKind::Gateway)
                .gateway("infra/shared"),
            "limited-http-routes",
            Some(fast_lease()),
        ),
    );
    let i = p.create(request("rbac-http-route")).await.unwrap().instance;
    p.wait_ready(&i.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();
    let http_routes: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), &ns, &http_route_resource());
    assert!(
        http_routes
            .get_opt(&i.id.object_name())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(op.metrics.failures(), 0, "a reconcile was refused");
    op.stop().await;
}

#[test]
fn the_operator_manifests_render() {
    let out = std::process::Command::new(repo().join("testenv/k8s/bin/kubectl"))
        .args(["kustomize"])
        .arg(repo().join("k8s/operator"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<serde_json::Value> = serde_saphyr::from_slice_multiple(&out.stdout).unwrap();
    let kinds: Vec<_> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "CustomResourceDefinition/mlflowinstances.flowgate.io",
        "ServiceAccount/flowgate-operator",
        "Role/flowgate-operator",
        "RoleBinding/flowgate-operator",
        "Deployment/flowgate-operator",
        "NetworkPolicy/flowgate-operator",
        "NetworkPolicy/flowgate-instances-from-operator",
        "NetworkPolicy/flowgate-operator-to-instances",
    ] {
        assert!(
            kinds.iter().any(|k| k == want),
            "{want} missing from {kinds:?}"
        );
    }
    let d = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "flowgate/provisioner:0.1.0");
    // every replica is the activator of sleeping instances, with the access
    // keys that let visitors of `link` instances wake them
    assert_eq!(
        c["args"],
        json!([
            "operator",
            "--activator-listen",
            "0.0.0.0:8082",
            "--access-keys",
            "/etc/flowgate-access/keys"
        ])
    );
    assert!(
        c["ports"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "activator", "containerPort": 8082, "protocol": "TCP"}))
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["serviceAccountName"], "flowgate-operator");
    // isolated both ways; egress never to link-local addresses
    let np = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy" && d["metadata"]["name"] == "flowgate-operator")
        .unwrap();
    let from_ingress = np["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["ports"] == json!([{"protocol": "TCP", "port": 8082}]));
    assert!(from_ingress, "the activator's port is not reachable: {np}");
    assert_eq!(np["spec"]["podSelector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .map(|l| json!({"app.kubernetes.io/name": l["app.kubernetes.io/name"], "app.kubernetes.io/component": l["app.kubernetes.io/component"]}))
        .unwrap());
    assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let blocks: Vec<&serde_json::Value> = np["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["to"].as_array().unwrap())
        .filter_map(|p| p.get("ipBlock"))
        .collect();
    assert!(!blocks.is_empty());
    for b in blocks {
        let except: Vec<&str> = b["except"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let want = if b["cidr"].as_str().unwrap().contains(':') {
            "fe80::/10"
        } else {
            "169.254.0.0/16"
        };
        assert!(except.contains(&want), "{b}");
    }
}

#[tokio::test]
async fn the_flowgate_binary_runs_the_operator_and_the_cli_and_api_work_through_it() {
    let (client, ns) = setup().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bin = env!("CARGO_BIN_EXE_flowgate");
    // the installation's access keys: instances are `link` by default
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("access-keys");
    std::fs::write(&keys, "k".repeat(40)).unwrap();
    let flowgate = |args: &[&str]| {
        let mut c = std::process::Command::new(bin);
        c.env("KUBECONFIG", &cluster().kubeconfig)
            .env("FLOWGATE_LOG_FORMAT", "text")
            .env("FLOWGATE_ACCESS_KEYS", &keys)
            .args([
                "--namespace",
                &ns,
                "--host",
                "ml.example.test",
                "--route-kind",
                "ingress",
            ])
            .args(args);
        c
    };
    let mut child = flowgate(&[
        "operator",
        "--metrics-listen",
        &format!("127.0.0.1:{port}"),
        "--lease-duration",
        "3s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "500ms",
        "--identity",
        "binary",
    ])
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually("/healthz", Duration::from_secs(30), || async {
        let r = http.get(format!("{base}/healthz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    let out = flowgate(&[
        "--backend",
        "operator",
        "-o",
        "json",
        "create",
        "--workload",
        "cli-1",
        "--artifacts",
        "https://store.example.test/cli-1.tgz",
        "--sha256",
        &sha_of("cli-1"),
        "--ttl",
        "2h",
        "--wait",
        "--wait-timeout",
        "90s",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["phase"], "Ready");
    assert_eq!(created["access"], "link");
    let link = created["access_url"].as_str().unwrap();
    assert!(
        link.starts_with(&format!(
            "{}?flowgate_access=",
            created["url"].as_str().unwrap()
        )),
        "{link}"
    );
    let id = created["id"].as_str().unwrap().to_owned();
    let listed = flowgate(&["--backend", "operator", "list"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains(&id) && table.contains("Ready"), "{table}");
    // -o name and -o yaml, as kubectl's
    let names = flowgate(&["--backend", "operator", "-o", "name", "list"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(names.lines().any(|l| l == id), "{names}");
    let yaml = flowgate(&["--backend", "operator", "-o", "yaml", "get", &id])
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(
        yaml.contains(&format!("id: {id}")) && yaml.contains("phase: Ready"),
        "{yaml}"
    );
    // --kubeconfig instead of $KUBECONFIG; --context picks one of its contexts
    let via_flags = |context: &str| {
        std::process::Command::new(bin)
            .env_remove("KUBECONFIG")
            .env("HOME", keys_dir.path())
            .arg("--kubeconfig")
            .arg(&cluster().kubeconfig)
            .args([
                "--context",
                context,
                "--namespace",
                &ns,
                "--backend",
                "operator",
            ])
            .args(["-o", "name", "list"])
            .output()
            .unwrap()
    };
    let current = kube::config::Kubeconfig::read_from(&cluster().kubeconfig)
        .unwrap()
        .current_context
        .expect("the test kubeconfig names its context");
    let out = via_flags(&current);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&id),
        "{out:?}"
    );
    let out = via_flags("no-such-context");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-context"),
        "{out:?}"
    );
    let extended = flowgate(&[
        "--backend",
        "operator",
        "-o",
        "json",
        "extend",
        &id,
        "--ttl",
        "1h",
    ])
    .output()
    .unwrap();
    assert!(
        extended.status.success(),
        "{}",
        String::from_utf8_lossy(&extended.stderr)
    );
    let upgrade = flowgate(&["--backend", "operator", "upgrade", "--mlflow-image", "x"])
        .output()
        .unwrap();
    assert_eq!(upgrade.status.code(), Some(2));
    let deleted = flowgate(&["--backend", "operator", "delete", &id])
        .output()
        .unwrap();
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let missing = flowgate(&["--backend", "operator", "get", &id])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(3));
    let crd = flowgate(&["crd"]).output().unwrap();
    assert_eq!(String::from_utf8(crd.stdout).unwrap(), crd_yaml());

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("flowgate_operator_leader 1"), "{metrics}");
    let reconciles: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flowgate_operator_reconciles_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(reconciles > 0);
    assert!(metrics.contains("flowgate_operator_reconcile_duration_seconds_bucket"));

    // `flowgate serve --backend operator`: the portal's REST API over resources.
    let api_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut serve = flowgate(&[
        "--backend",
        "operator",
        "serve",
        "--listen",
        &format!("127.0.0.1:{api_port}"),
    ])
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let api_base = format!("http://127.0.0.1:{api_port}/api/v1/instances");
    eventually("the REST API", Duration::from_secs(30), || async {
        let r = http.get(&api_base).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let body = json!({
        "workload": "api-1",
        "artifacts": {"url": "https://store.example.test/api-1.tgz", "sha256": sha_of("api-1")},
        "ttl": "2h",
    });
    let created = http.post(&api_base).json(&body).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    let api_id = created["id"].as_str().unwrap().to_owned();
    eventually(
        "the instance to be Ready through the API",
        Duration::from_secs(90),
        || async {
            let i: serde_json::Value = http
                .get(format!("{api_base}/{api_id}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (i["phase"] == "Ready").then_some(())
        },
    )
    .await;
    let again = http.post(&api_base).json(&body).send().await.unwrap();
    assert_eq!(again.status(), 200, "the live instance is returned");
    let deleted = http
        .delete(format!("{api_base}/{api_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(serve.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");

    // SIGTERM: a clean exit that releases the Lease.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let lease = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("flowgate-operator")
        .await
        .unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None);
}
