//! The Kubernetes backend against a real control plane (testenv/k8s: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and kwok, which
//! makes Pods Ready without running them).

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use provisioner::Error;
use provisioner::backend::{Backend, ListFilter};
use provisioner::credentials::CredentialRules;
use provisioner::instance::{Access, Artifacts, CreateRequest, InstanceId, Phase, Workload};
use provisioner::kube::KubeBackend;
use provisioner::kube::objects::{http_route_resource, route_resource};
use provisioner::kube::served_route_apis;
use provisioner::service::Provisioner;
use provisioner::settings::{RouteApis, RouteKind};
use std::sync::Arc;
use std::time::Duration;
use support::*;

fn request(workload: &str, seed: &str) -> CreateRequest {
    let sha = format!("{:0>64}", hex_of(seed));
    CreateRequest {
        workload: Workload::parse(workload).unwrap(),
        owner: "alice".into(),
        artifacts: Artifacts::validated(
            &format!("https://store.example.test/{seed}.tgz"),
            &sha,
            &["https"],
        )
        .unwrap(),
        ttl: Duration::from_secs(24 * 3600),
        writes: false,
        // these tests are about objects and lifecycles; link access has its own
        access: Access::Public,
        credentials: None,
        idle_after: None,
    }
}

/// The backend of `ns` and the service over it.
async fn both(
    client: &kube::Client,
    settings: provisioner::settings::KubeSettings,
) -> (Arc<KubeBackend>, Provisioner) {
    let ns = settings.namespace.clone();
    let ttl = settings.ttl;
    let b = Arc::new(backend(client.clone(), settings).await);
    let p = service(b.clone(), client.clone(), &ns, ttl);
    (b, p)
}

/// Moves an instance's expiry into the past, as time would.
async fn expire(client: &kube::Client, ns: &str, id: &InstanceId) {
    let past = serde_json::json!({"metadata": {"annotations": {"flowgate.io/expires-at": "2020-01-01T00:00:00Z"}}});
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            &id.object_name(),
            &PatchParams::default(),
            &Patch::Merge(&past),
        )
        .await
        .unwrap();
}

fn hex_of(s: &str) -> String {
    s.bytes()
        .map(|b| format!("{:02x}", b % 16))
        .collect::<String>()
        .chars()
        .take(64)
        .collect()
}

#[tokio::test]
async fn create_makes_hardened_owned_objects_that_become_ready() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let created = p.create(request("6543210", "a")).await.unwrap();
    assert!(created.created);
    let i = created.instance;
    let name = i.id.object_name();
    assert_eq!(i.url, format!("https://ml.example.test/{}/", i.id));
    // kwok may mark the pod Ready before the create returns on a busy machine
    assert!(
        matches!(i.phase, Phase::Pending | Phase::Ready),
        "{:?}",
        i.phase
    );
    assert_eq!(
        i.expires_at.duration_since(i.created_at).as_secs(),
        24 * 3600
    );

    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    let labels = d.metadata.labels.clone().unwrap();
    assert_eq!(labels["flowgate.io/instance"], i.id.as_str());
    assert_eq!(labels["flowgate.io/workload"], "6543210");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "flowgate");
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()["flowgate.io/state"],
        "complete"
    );
    let uid = d.metadata.uid.clone().unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    assert_eq!(svc.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
    let ing = Api::<Ingress>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    assert_eq!(ing.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
    let rules = ing.spec.unwrap().rules.unwrap();
    let path = &rules[0].http.as_ref().unwrap().paths[0];
    assert_eq!(path.path.as_deref(), Some(i.id.prefix().as_str()));

    // The namespace enforces Pod Security `restricted`: a Pod that becomes
    // Ready was admitted by the real apiserver.
    let ready = p
        .wait_ready(&i.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();
    assert_eq!(ready.phase, Phase::Ready);
    assert_eq!(b.get(&i.id).await.unwrap().phase, Phase::Ready);
}

/// What the adapter and fetch are told: the public host (anything else is a
/// 421), writes off unless asked for, and download/unpack limits below the
/// store volume, as the real apiserver stores them.
#[tokio::test]
async fn instances_are_read_only_by_default_and_bounded_by_their_volume() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let read_only = p.create(request("4711", "e")).await.unwrap().instance;
    assert!(!read_only.writes);
    let mut asked = request("4711", "e");
    asked.writes = true;
    let writable = p.create(asked).await.unwrap();
    assert!(
        writable.created,
        "a writable instance is not the read-only one"
    );
    assert!(writable.instance.writes);
    assert!(b.get(&writable.instance.id).await.unwrap().writes);
    assert!(!b.get(&read_only.id).await.unwrap().writes);

    let deployments = Api::<Deployment>::namespaced(client, &ns);
    for (i, want) in [(&read_only, "off"), (&writable.instance, "on")] {
        let d = deployments.get(&i.id.object_name()).await.unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let adapter = pod.containers.iter().find(|c| c.name == "adapter").unwrap();
        let env: std::collections::BTreeMap<_, _> = adapter
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["FLOWGATE_WRITES"], want);
        assert_eq!(env["FLOWGATE_PUBLIC_HOST"], "ml.example.test");
        let size = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "data")
            .unwrap();
        let size = size
            .empty_dir
            .as_ref()
            .unwrap()
            .size_limit
            .as_ref()
            .unwrap()
            .0
            .clone();
        let size = provisioner::settings::quantity_bytes(&size).unwrap();
        let args = pod.init_containers.as_ref().unwrap()[0]
            .args
            .clone()
            .unwrap();
        let flag = |name: &str| -> u64 {
            let at = args
                .iter()
                .position(|a| a == name)
                .unwrap_or_else(|| panic!("{name} in {args:?}"));
            args[at + 1].parse().unwrap()
        };
        let (down, unpacked) = (flag("--max-download-bytes"), flag("--max-unpacked-bytes"));
        assert!(down + unpacked < size, "{down} + {unpacked} >= {size}");
    }
}

/// A credentials Secret is one the installation grants the owner, and the
/// real apiserver stores it mounted into the fetch init container only.
#[tokio::test]
async fn credentials_are_granted_and_reach_the_fetch_container_only() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let p = p.with_credentials(CredentialRules {
        default: None,
        grants: vec!["panda-token=alice".parse().unwrap()],
    });
    // (sleep is the local backend's so far: an idle_after is refused here)
    let mut asked = request("8080", "c");
    asked.idle_after = Some(Duration::from_secs(3600));
    assert!(matches!(
        p.create(asked).await,
        Err(Error::Invalid {
            field: "idle_after",
            ..
        })
    ));
    let mut asked = request("8080", "c");
    asked.credentials = Some("other-team-proxy".into());
    assert!(matches!(p.create(asked).await, Err(Error::Forbidden(_))));
    let mut asked = request("8080", "c");
    asked.owner = "bob".into();
    asked.credentials = Some("panda-token".into());
    assert!(matches!(p.create(asked).await, Err(Error::Forbidden(_))));
    assert!(b.list(&ListFilter::default()).await.unwrap().is_empty());

    let mut asked = request("8080", "c");
    asked.credentials = Some("panda-token".into());
    let i = p.create(asked).await.unwrap().instance;
    assert_eq!(i.credentials.as_deref(), Some("panda-token"));
    assert_eq!(
        b.get(&i.id).await.unwrap().credentials.as_deref(),
        Some("panda-token")
    );

    let d = Api::<Deployment>::namespaced(client, &ns)
        .get(&i.id.object_name())
        .await
        .unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("panda-token"))
        .expect("the Secret's volume");
    let mounts = |c: &k8s_openapi::api::core::v1::Container| -> Vec<(String, bool)> {
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.name == volume.name)
            .map(|m| (m.mount_path.clone(), m.read_only == Some(true)))
            .collect()
    };
    let fetch = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(
        mounts(fetch),
        vec![("/etc/flowgate-fetch".to_owned(), true)]
    );
    assert!(
        fetch
            .args
            .iter()
            .flatten()
            .any(|a| a == "--credentials-dir"),
        "{:?}",
        fetch.args
    );
    for c in &pod.containers {
        assert!(mounts(c).is_empty(), "{} mounts the credentials", c.name);
    }
}

#[tokio::test]
async fn create_is_idempotent_and_lists_filter() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let first = p.create(request("task/77 (retry)", "b")).await.unwrap();
    let again = p.create(request("task/77 (retry)", "b")).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.instance.id, first.instance.id);
    let other = p.create(request("task/77 (retry)", "c")).await.unwrap();
    assert_ne!(other.instance.id, first.instance.id);
    let mut bob = request("8888", "d");
    bob.owner = "bob".into();
    p.create(bob).await.unwrap();

    let deployments = Api::<Deployment>::namespaced(client, &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(deployments.items.len(), 3);
    // The claims Leases are not instances.
    assert_eq!(
        deployments
            .items
            .iter()
            .filter(|d| d.metadata.name.as_deref().unwrap().starts_with("mlflow-"))
            .count(),
        3
    );
    let by_workload = b
        .list(&ListFilter {
            workload: Some("task/77 (retry)".into()),
            owner: None,
        })
        .await
        .unwrap();
    assert_eq!(by_workload.len(), 2);
    assert!(by_workload.iter().all(|i| i.workload == "task/77 (retry)"));
    let by_owner = b
        .list(&ListFilter {
            workload: None,
            owner: Some("bob".into()),
        })
        .await
        .unwrap();
    assert_eq!(by_owner.len(), 1);
    assert_eq!(by_owner[0].workload, "8888");
    assert_eq!(b.list(&ListFilter::default()).await.unwrap().len(), 3);
}

#[tokio::test]
async fn extend_and_delete() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let anyone = provisioner::service::Caller::Anyone;
    let i = p.create(request("1", "e")).await.unwrap().instance;
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
    assert_eq!(b.get(&i.id).await.unwrap().expires_at, extended.expires_at);

    b.delete(&i.id).await.unwrap();
    let name = i.id.object_name();
    // The controller-manager's garbage collector removes what the Deployment owned.
    assert!(
        gone(&Api::<Service>::namespaced(client.clone(), &ns), &name).await,
        "Service left behind"
    );
    assert!(
        gone(&Api::<Ingress>::namespaced(client.clone(), &ns), &name).await,
        "Ingress left behind"
    );
    assert!(matches!(b.get(&i.id).await, Err(Error::NotFound(_))));
    assert!(matches!(b.delete(&i.id).await, Err(Error::NotFound(_))));
    assert!(matches!(
        b.get(&InstanceId::parse("zzzzzzz").unwrap()).await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test]
async fn gc_removes_only_expired_instances_and_orphans() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let old = p.create(request("old", "f")).await.unwrap().instance;
    let live = p.create(request("live", "g")).await.unwrap().instance;
    expire(&client, &ns, &old.id).await;
    assert_eq!(b.get(&old.id).await.unwrap().phase, Phase::Expired);
    // A Service of ours whose Deployment never existed.
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let orphan: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "mlflow-orphan1", "labels": {"app.kubernetes.io/managed-by": "flowgate", "flowgate.io/instance": "orphan1"}},
        "spec": {"ports": [{"port": 80}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &orphan)
        .await
        .unwrap();
    // Not ours: never touched.
    let foreign: Service = serde_json::from_value(serde_json::json!({"metadata": {"name": "someone-else"}, "spec": {"ports": [{"port": 80}]}})).unwrap();
    services
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    let dry = b.gc(true).await.unwrap();
    let mut names: Vec<_> = dry
        .iter()
        .map(|r| format!("{} {}", r.kind, r.name))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("Deployment {}", old.id.object_name()),
            "Service mlflow-orphan1".to_string()
        ]
    );
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    assert!(
        deployments
            .get_opt(&old.id.object_name())
            .await
            .unwrap()
            .is_some(),
        "dry run removed something"
    );

    let removed = b.gc(false).await.unwrap();
    assert_eq!(removed.len(), 2);
    assert!(gone(&deployments, &old.id.object_name()).await);
    assert!(gone(&services, &old.id.object_name()).await);
    assert!(gone(&services, "mlflow-orphan1").await);
    assert!(services.get_opt("someone-else").await.unwrap().is_some());
    assert_ne!(b.get(&live.id).await.unwrap().phase, Phase::Expired);
    assert!(b.gc(false).await.unwrap().is_empty());
}

#[tokio::test]
async fn upgrade_rolls_every_instance_to_new_images() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let (b, p) = both(&client, settings(&ns)).await;
    let ids: Vec<_> = [("u1", "h"), ("u2", "i")]
        .iter()
        .map(|(w, s)| (*w, *s))
        .collect();
    let mut created = Vec::new();
    for (w, s) in ids {
        created.push(p.create(request(w, s)).await.unwrap().instance.id);
    }
    for id in &created {
        p.wait_ready(id, Duration::from_secs(90), &|_| {})
            .await
            .unwrap();
    }
    let seen = std::sync::Mutex::new(Vec::new());
    let steps = b
        .upgrade(
            Some("flowgate/mlflow:0.2.0"),
            Some("flowgate/adapter:0.2.0"),
            1,
            Some(Duration::from_secs(120)),
            &|s| seen.lock().unwrap().push(s.index),
        )
        .await
        .unwrap();
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().all(|s| s.outcome.is_ok()), "{steps:?}");
    assert_eq!(*seen.lock().unwrap(), [1, 2]);
    let deployments = Api::<Deployment>::namespaced(client, &ns);
    for id in &created {
        let d = deployments.get(&id.object_name()).await.unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let images: Vec<_> = pod
            .containers
            .iter()
            .chain(pod.init_containers.as_ref().unwrap())
            .map(|c| c.image.clone().unwrap())
            .collect();
        assert_eq!(
            images,
            [
                "flowgate/mlflow:0.2.0",
                "flowgate/adapter:0.2.0",
                "flowgate/adapter:0.2.0"
            ]
        );
        assert_eq!(b.get(id).await.unwrap().phase, Phase::Ready);
    }
}

#[tokio::test]
async fn openshift_routes_are_used_when_asked_or_found() {
    let client = admin().await;
    let ns = namespace(&client).await;
    // The test control plane serves route.openshift.io (the real CRD), so auto picks Route.
    let (auto, p) = both(&client, settings(&ns).route_kind(RouteKind::Auto)).await;
    assert_eq!(auto.route_kind(), RouteKind::Route);
    let i = p.create(request("r1", "j")).await.unwrap().instance;
    let routes: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &route_resource());
    let r = routes.get(&i.id.object_name()).await.unwrap();
    assert_eq!(r.data["spec"]["path"], i.id.prefix());
    assert_eq!(r.data["spec"]["to"]["name"], i.id.object_name());
    assert_eq!(r.data["spec"]["host"], "ml.example.test");
    assert_eq!(
        r.metadata.owner_references.as_ref().unwrap()[0].kind,
        "Deployment"
    );
    assert!(
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .get_opt(&i.id.object_name())
            .await
            .unwrap()
            .is_none()
    );
    auto.delete(&i.id).await.unwrap();
    assert!(
        gone(&routes, &i.id.object_name()).await,
        "Route left behind"
    );
}

/// A Gateway in a namespace of its own, taking routes from every namespace
/// (no controller runs here: the tests write its status as one would).
async fn gateway(client: &kube::Client) -> String {
    let ns = namespace(client).await;
    let gateways: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
            "gateways",
        ),
    );
    let gw: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "shared"},
        "spec": {"gatewayClassName": "flowgate-test", "listeners": [{
            "name": "web", "port": 80, "protocol": "HTTP", "hostname": "ml.example.test",
            "allowedRoutes": {"namespaces": {"from": "All"}},
        }]},
    }))
    .unwrap();
    gateways.create(&PostParams::default(), &gw).await.unwrap();
    format!("{ns}/shared")
}

/// What a Gateway controller writes when its listeners do not take a route.
fn refused_by(gateway: &str) -> serde_json::Value {
    let (namespace, name) = gateway.split_once('/').unwrap();
    serde_json::json!({"status": {"parents": [{
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": namespace, "name": name},
        "controllerName": "flowgate.test/gateway-controller",
        "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners",
            "message": "no listener allows routes from this namespace",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
    }]}})
}

#[tokio::test]
async fn http_routes_attach_instances_to_the_configured_gateway() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let gw = gateway(&client).await;
    let (b, p) = both(
        &client,
        settings(&ns).route_kind(RouteKind::Gateway).gateway(&gw),
    )
    .await;
    assert_eq!(b.route_kind(), RouteKind::Gateway);
    let i = p.create(request("gw1", "o")).await.unwrap().instance;
    let name = i.id.object_name();
    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    let routes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &http_route_resource());
    let r = routes.get(&name).await.unwrap();
    let (gw_ns, gw_name) = gw.split_once('/').unwrap();
    let parent = &r.data["spec"]["parentRefs"][0];
    assert_eq!(
        (&parent["kind"], &parent["namespace"], &parent["name"]),
        (&"Gateway".into(), &gw_ns.into(), &gw_name.into()),
        "{parent}"
    );
    assert_eq!(
        r.data["spec"]["hostnames"],
        serde_json::json!(["ml.example.test"])
    );
    let rules = r.data["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["matches"],
        serde_json::json!([{"path": {"type": "PathPrefix", "value": i.id.prefix()}}])
    );
    let backend = &rules[0]["backendRefs"][0];
    assert_eq!(backend["name"], name);
    assert_eq!(
        backend["port"],
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port
    );
    let owners = r.metadata.owner_references.as_ref().unwrap();
    assert_eq!(
        (owners[0].kind.as_str(), owners[0].uid.as_str()),
        ("Deployment", d.metadata.uid.as_deref().unwrap())
    );
    assert_eq!(r.labels()["flowgate.io/instance"], i.id.as_str());
    assert_eq!(r.labels()["app.kubernetes.io/managed-by"], "flowgate");
    assert!(
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .get_opt(&name)
            .await
            .unwrap()
            .is_none(),
        "an Ingress too"
    );
    assert_eq!(b.get(&i.id).await.unwrap().message, None);

    // The Gateway refuses the route: the instance says so.
    routes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(refused_by(&gw)),
        )
        .await
        .unwrap();
    let message = b.get(&i.id).await.unwrap().message.unwrap_or_default();
    assert!(
        message.contains(&format!(
            "Gateway {gw} refused the route: NotAllowedByListeners"
        )),
        "{message}"
    );
    let listed = b.list(&ListFilter::default()).await.unwrap();
    assert_eq!(listed[0].message.as_deref(), Some(message.as_str()));

    b.delete(&i.id).await.unwrap();
    assert!(gone(&routes, &name).await, "HTTPRoute left behind");
}

#[tokio::test]
async fn gc_removes_http_routes_of_expired_instances_and_orphans() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let gw = gateway(&client).await;
    let (b, p) = both(
        &client,
        settings(&ns).route_kind(RouteKind::Gateway).gateway(&gw),
    )
    .await;
    let old = p.create(request("gw-old", "p")).await.unwrap().instance;
    expire(&client, &ns, &old.id).await;
    let routes: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &http_route_resource());
    let route = |name: &str, labels: serde_json::Value| -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "labels": labels},
            "spec": {"rules": [{"backendRefs": [{"name": name, "port": 80}]}]},
        }))
        .unwrap()
    };
    // Ours, without a Deployment; and someone else's.
    routes
        .create(
            &PostParams::default(),
            &route(
                "mlflow-orphan3",
                serde_json::json!({"app.kubernetes.io/managed-by": "flowgate", "flowgate.io/instance": "orphan3"}),
            ),
        )
        .await
        .unwrap();
    routes
        .create(
            &PostParams::default(),
            &route("someone-else", serde_json::json!({})),
        )
        .await
        .unwrap();

    // An Ingress-making backend still cleans up HTTPRoutes where they are served.
    let ingress_gc = backend(client.clone(), settings(&ns)).await;
    let mut names: Vec<_> = ingress_gc
        .gc(true)
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r.kind, r.name))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("Deployment {}", old.id.object_name()),
            "HTTPRoute mlflow-orphan3".to_string()
        ]
    );
    assert_eq!(b.gc(false).await.unwrap().len(), 2);
    assert!(gone(&routes, &old.id.object_name()).await);
    assert!(gone(&routes, "mlflow-orphan3").await);
    assert!(routes.get_opt("someone-else").await.unwrap().is_some());
}

/// The route kind is chosen and checked against what the API server serves:
/// both route APIs here, so `auto` takes OpenShift's first; `gateway` needs a
/// Gateway, and an HTTPRoute never gets `--tls-secret` silently.
#[tokio::test]
async fn route_kinds_follow_the_served_apis_and_the_gateway_setting() {
    let client = admin().await;
    let ns = namespace(&client).await;
    assert_eq!(
        served_route_apis(&client).await.unwrap(),
        RouteApis {
            openshift_routes: true,
            http_routes: true
        }
    );
    let auto = backend(
        client.clone(),
        settings(&ns)
            .route_kind(RouteKind::Auto)
            .gateway("infra/shared"),
    )
    .await;
    assert_eq!(auto.route_kind(), RouteKind::Route);

    let err = KubeBackend::new(client.clone(), settings(&ns).route_kind(RouteKind::Gateway))
        .await
        .err()
        .expect("gateway without --gateway");
    assert!(
        matches!(
            &err,
            Error::Invalid {
                field: "gateway",
                ..
            }
        ) && err.to_string().contains("--gateway NAMESPACE/NAME"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 2);
    let mut with_tls = settings(&ns)
        .route_kind(RouteKind::Gateway)
        .gateway("infra/shared");
    with_tls.tls_secret = Some("cert".into());
    let err = KubeBackend::new(client.clone(), with_tls)
        .await
        .err()
        .expect("a TLS Secret for HTTPRoutes");
    assert!(
        matches!(
            &err,
            Error::Invalid {
                field: "tls-secret",
                ..
            }
        ),
        "{err}"
    );
}

/// A half-made create is rolled back when the HTTPRoute is refused (here by
/// the Gateway API's own schema: a host name it does not allow).
#[tokio::test]
async fn a_refused_http_route_rolls_the_create_back() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let mut s = settings(&ns)
        .route_kind(RouteKind::Gateway)
        .gateway("infra/shared");
    s.host = "Not_A_Host".into();
    let (b, p) = both(&client, s).await;
    let err = p.create(request("gw-bad", "q")).await.unwrap_err();
    assert!(err.to_string().contains("hostnames"), "{err}");
    assert!(b.list(&ListFilter::default()).await.unwrap().is_empty());
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(deployments.items.is_empty(), "the Deployment stayed");
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    for s in services.list(&ListParams::default()).await.unwrap().items {
        assert!(
            gone(&services, &s.metadata.name.unwrap()).await,
            "a Service stayed"
        );
    }
}

/// A token for a ServiceAccount bound to the Role in k8s/base.
async fn least_privilege_token(client: &kube::Client, ns: &str) -> String {
    let role_yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../k8s/base/provisioner-role.yaml"
    ))
    .unwrap();
    let role: Role = serde_saphyr::from_str(&role_yaml).unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "flowgate"}})).unwrap();
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "flowgate"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "flowgate-provisioner"},
        "subjects": [{"kind": "ServiceAccount", "name": "flowgate", "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let tr: TokenRequest = serde_json::from_value(
        serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600}}),
    )
    .unwrap();
    let tr: TokenRequest = sas
        .create_subresource("token", "flowgate", &PostParams::default(), &tr)
        .await
        .unwrap();
    tr.status.unwrap().token
}

#[tokio::test]
async fn the_least_privilege_role_is_enough() {
    let admin = admin().await;
    let ns = namespace(&admin).await;
    let token = least_privilege_token(&admin, &ns).await;
    let limited = client_with_token(&token).await;
    // It really is limited.
    let err = Api::<Secret>::namespaced(limited.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{err}"
    );

    for kind in [RouteKind::Ingress, RouteKind::Route, RouteKind::Gateway] {
        let (b, p) = both(
            &limited,
            settings(&ns).route_kind(kind).gateway("infra/shared"),
        )
        .await;
        let i = p
            .create(request(&format!("rbac-{kind:?}"), "k"))
            .await
            .unwrap()
            .instance;
        b.get(&i.id).await.unwrap();
        assert_eq!(
            b.list(&ListFilter::default())
                .await
                .unwrap()
                .iter()
                .filter(|x| x.id == i.id)
                .count(),
            1
        );
        p.extend(
            &provisioner::service::Caller::Anyone,
            &i.id,
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        b.gc(false).await.unwrap();
        b.upgrade(Some("flowgate/mlflow:0.3.0"), None, 1, None, &|_| {})
            .await
            .unwrap();
        b.delete(&i.id).await.unwrap();
    }
}

#[tokio::test]
async fn an_api_server_lost_mid_create_leaves_nothing_gc_cannot_clean() {
    let admin = admin().await;
    let ns = namespace(&admin).await;
    let kubeconfig = kube::config::Kubeconfig::read_from(&cluster().kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let faulty = ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&CutAfterDeploymentApply(Arc::default()))
        .build();
    let (_b, p) = both(&faulty, settings(&ns)).await;
    let err = p.create(request("cut", "l")).await.unwrap_err();
    assert!(err.to_string().contains("API server is gone"), "{err}");

    // What the server kept: a Deployment still marked `creating`, nothing routed to it.
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &ns);
    let left = deployments
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].metadata.annotations.as_ref().unwrap()["flowgate.io/state"],
        "creating"
    );
    assert!(
        Api::<Ingress>::namespaced(admin.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let healthy = backend(admin.clone(), settings(&ns)).await;
    assert!(
        healthy
            .list(&ListFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|i| i.phase != Phase::Ready)
    );

    // gc removes it once it has been half-made for longer than --stuck-after.
    let gc = backend(admin.clone(), settings(&ns).stuck_after(Duration::ZERO)).await;
    let removed = gc.gc(false).await.unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].reason.contains("half-made"));
    let name = left[0].metadata.name.clone().unwrap();
    assert!(gone(&deployments, &name).await);
    assert!(gone(&Api::<Service>::namespaced(admin.clone(), &ns), &name).await);
}

/// Waits until `check` holds.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn launch_events_follow_the_pod_status_through_one_shared_watch() {
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
    use provisioner::kube::watch::Watch;
    use provisioner::service::Caller;

    let client = admin().await;
    let ns = namespace(&client).await;
    // kwok does not run init containers: the Pod of the instance is one the
    // test makes (never scheduled, so kwok leaves it alone) and whose status
    // it writes as a kubelet and the fetch container would. A quota of one
    // Pod keeps the ReplicaSet from adding its own.
    let quotas = Api::<ResourceQuota>::namespaced(client.clone(), &ns);
    let quota: ResourceQuota = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "one-pod"}, "spec": {"hard": {"pods": "1"}}}),
    )
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    until("the quota to be counted", || async {
        quotas
            .get("one-pod")
            .await
            .ok()
            .and_then(|q| q.status?.hard)
            .is_some()
    })
    .await;
    let settings = settings(&ns);
    let ttl = settings.ttl;
    let b = Arc::new(backend(client.clone(), settings).await);
    let p =
        service(b.clone(), client.clone(), &ns, ttl).with_events(Watch::start(client.clone(), &ns));
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "stand-in", "labels": {"app.kubernetes.io/name": "mlflow"}},
        "spec": {
            "nodeSelector": {"flowgate.io/nowhere": "true"},
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{"name": "fetch", "image": "flowgate/adapter:0.1.0",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
            "containers": [{"name": "mlflow", "image": "flowgate/mlflow:0.1.0",
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
        },
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let i = p.create(request("progress", "m")).await.unwrap().instance;
    // The stand-in becomes the instance's Pod (the ReplicaSet's own is refused by the quota).
    let name = "stand-in".to_owned();
    pods.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"labels": {"flowgate.io/instance": i.id.as_str()}}}),
        ),
    )
    .await
    .unwrap();
    let events = p.events(&Caller::Anyone, &i.id).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(events.for_each(move |e| {
        let _ = tx.send(e);
        async {}
    }));
    async fn next(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<provisioner::events::Event>,
    ) -> provisioner::events::Event {
        tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("an event")
            .expect("the stream goes on")
    }
    assert_eq!(next(&mut rx).await.step, "created");
    let status = |v: serde_json::Value| {
        let pods = pods.clone();
        let name = name.clone();
        async move {
            pods.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(serde_json::json!({"status": v})),
            )
            .await
            .unwrap();
        }
    };
    let fetch = |state: serde_json::Value| {
        serde_json::json!([{"name": "fetch", "image": "flowgate/adapter:0.1.0",
        "imageID": "", "ready": false, "restartCount": 0, "state": state}])
    };
    let progress = |m: &str| serde_json::json!([{"type": "flowgate.io/fetch", "status": "False", "reason": "Downloading", "message": m}]);
    status(serde_json::json!({"initContainerStatuses": fetch(serde_json::json!({"running": {}})), "conditions": progress("1024/4096 bytes")})).await;
    let e = next(&mut rx).await;
    assert_eq!(
        (e.step.as_str(), e.bytes, e.total),
        ("downloading", Some(1024), Some(4096)),
        "{e:?}"
    );
    status(serde_json::json!({"conditions": progress("4096/4096 bytes")})).await;
    let e = next(&mut rx).await;
    assert_eq!(
        (e.step.as_str(), e.bytes),
        ("downloading", Some(4096)),
        "{e:?}"
    );
    status(serde_json::json!({"initContainerStatuses": fetch(serde_json::json!({"terminated": {"exitCode": 0, "message": "verified"}}))})).await;
    assert_eq!(next(&mut rx).await.step, "verified");
    assert_eq!(next(&mut rx).await.step, "starting");
    status(serde_json::json!({"containerStatuses": [{"name": "mlflow", "image": "flowgate/mlflow:0.1.0", "imageID": "",
        "ready": false, "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}}]})).await;
    let e = next(&mut rx).await;
    assert_eq!(e.step, "failed", "{e:?}");
    assert!(e.message.unwrap().contains("CrashLoopBackOff"));
}

#[tokio::test]
async fn event_streams_are_capped_per_caller() {
    use provisioner::service::{Caller, Policy, Provisioner, Quotas};
    let client = admin().await;
    let ns = namespace(&client).await;
    let settings = settings(&ns);
    let ttl = settings.ttl;
    let b = Arc::new(backend(client.clone(), settings).await);
    let p = Provisioner::new(
        b,
        Arc::new(provisioner::kube::ledger::LeaseLedger::new(
            client.clone(),
            &ns,
        )),
        Policy {
            ttl,
            quotas: Quotas::unlimited(),
            allow_file: false,
            streams_per_caller: 2,
        },
    )
    .with_events(provisioner::kube::watch::Watch::start(client.clone(), &ns));
    let mut alice_req = request("capped", "n");
    alice_req.owner = "alice".into();
    let i = p.create(alice_req).await.unwrap().instance;
    let alice = Caller::Owner("alice".into());
    let one = p.events(&alice, &i.id).await.unwrap();
    let two = p.events(&alice, &i.id).await.unwrap();
    assert!(matches!(
        p.events(&alice, &i.id).await,
        Err(Error::Quota(_))
    ));
    // Others are not held back by alice's streams.
    let _anyone = p.events(&Caller::Anyone, &i.id).await.unwrap();
    drop(one);
    let _three = p.events(&alice, &i.id).await.unwrap();
    drop(two);
}

/// Sleep and wake on the real control plane (kwok makes the pods Ready; the
/// activity read and the real Ingress are the real node's, testenv/node/e2e):
/// a sleeping instance is scaled to zero with its Service on the activator's
/// pods, the activator answers its visitors (a JSON call 503 and nothing
/// woken; ten concurrent page visits wake it once), the route is handed back
/// when a pod is available, and a sleeping instance past its expiry is gc's.
#[tokio::test]
async fn sleeping_instances_wake_once_on_a_page_visit() {
    use provisioner::kube::sleep::{Manager, SleepSettings, Sleeper, Wake};
    use provisioner::kube::watch::Watch;

    let client = admin().await;
    let ns = namespace(&client).await;
    let settings = settings(&ns);
    let ttl = settings.ttl;
    let b = Arc::new(
        KubeBackend::new(client.clone(), settings)
            .await
            .unwrap()
            .with_sleep(),
    );
    let p = service(b.clone(), client.clone(), &ns, ttl);
    let mut req = request("sleepy", "s");
    req.idle_after = Some(Duration::from_secs(7200));
    let i = p.create(req).await.unwrap().instance;
    assert_eq!(i.idle_after.as_deref(), Some("2h"));
    p.wait_ready(&i.id, Duration::from_secs(90), &|_| {})
        .await
        .unwrap();

    let watch = Watch::start(client.clone(), &ns);
    let activator_labels = SleepSettings::parse_selector(
        "app.kubernetes.io/name=flowgate,app.kubernetes.io/component=api",
    )
    .unwrap();
    let sleeper = Arc::new(
        Sleeper::new(
            client.clone(),
            &ns,
            Arc::clone(&watch),
            SleepSettings {
                manager: Manager::Provisioner,
                idle_after: None,
                activator: activator_labels.clone(),
                tick: Duration::from_secs(1),
                read_timeout: Duration::from_secs(1),
            },
        )
        .unwrap(),
    );
    watch.ready().await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let name = i.id.object_name();

    // A decision made on an outdated Deployment is decided again: a status
    // or annotation change does not stop it, a wake in the meantime does.
    let stale = deployments.get(&name).await.unwrap();
    let annotate = |value: serde_json::Value| {
        let deployments = deployments.clone();
        let name = name.clone();
        async move {
            deployments
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&serde_json::json!({"metadata": {"annotations": value}})),
                )
                .await
                .unwrap()
        }
    };
    annotate(serde_json::json!({"flowgate.io/sleep": "waking"})).await;
    assert!(!sleeper.sleep(&i.id, &stale).await.unwrap());
    let d = deployments.get(&name).await.unwrap();
    assert_eq!(
        d.annotations()["flowgate.io/sleep"],
        "waking",
        "a sleep undid a wake"
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    annotate(serde_json::json!({"flowgate.io/sleep": null, "touched": "yes"})).await;
    assert_eq!(b.get(&i.id).await.unwrap().phase, Phase::Ready);

    let d = deployments.get(&name).await.unwrap();
    assert!(sleeper.sleep(&i.id, &d).await.unwrap());
    let d = deployments.get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(0));
    assert_eq!(b.get(&i.id).await.unwrap().phase, Phase::Sleeping);
    let svc = services.get(&name).await.unwrap().spec.unwrap();
    assert_eq!(svc.selector.clone().unwrap(), activator_labels);
    assert_eq!(
        serde_json::to_value(&svc.ports.as_ref().unwrap()[0].target_port).unwrap(),
        "activator"
    );
    until("the instance's pods to go", || async {
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels(&format!("flowgate.io/instance={}", i.id)))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;

    // The activator: this test's listener, answering the instances' host.
    let activator = TestActivator::start(Arc::clone(&sleeper)).await;
    let addr = activator.addr;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/{}/#/experiments/0", i.id);
    let get = |accept: &'static str| {
        http.get(url.clone())
            .header("host", "ml.example.test")
            .header("accept", accept)
            .send()
    };
    until("the watch to see it asleep", || async {
        watch
            .look(&i.id)
            .is_some_and(|(i, _)| i.phase == Phase::Sleeping)
    })
    .await;
    let r = get("application/json").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "10");
    let r = http
        .get(format!("http://{addr}/{}/", i.id))
        .header("host", "elsewhere.example")
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    assert_eq!(
        b.get(&i.id).await.unwrap().phase,
        Phase::Sleeping,
        "a JSON call woke it"
    );

    // Ten page visits at once: one wake; each visitor gets the waking page.
    let visits = futures_util::future::join_all((0..10).map(|_| get("text/html"))).await;
    for v in visits {
        let v = v.unwrap();
        assert_eq!(v.status(), 503);
        assert!(v.text().await.unwrap().contains("Waking up"));
    }
    let d = deployments.get(&name).await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(sleeper.wakes(), 1, "ten visits, one wake");
    assert_eq!(sleeper.wake(&i.id).await.unwrap(), Wake::AlreadyWaking);
    let status = http
        .get(format!("http://{addr}/{}/.flowgate/wake", i.id))
        .header("host", "ml.example.test")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains("\"waking\"") || status.contains("\"ready\""),
        "{status}"
    );

    // kwok makes the new pod Ready; the route is handed back by the visit's
    // follower (or a tick).
    until("the route handed back", || async {
        sleeper.tick().await;
        b.get(&i.id).await.unwrap().phase == Phase::Ready
    })
    .await;
    let svc = services.get(&name).await.unwrap().spec.unwrap();
    assert_eq!(
        svc.selector.unwrap(),
        std::collections::BTreeMap::from([("flowgate.io/instance".to_owned(), i.id.to_string())])
    );
    assert_eq!(
        serde_json::to_value(&svc.ports.as_ref().unwrap()[0].target_port).unwrap(),
        "http"
    );
    assert_eq!(sleeper.wake(&i.id).await.unwrap(), Wake::NotAsleep);

    // Asleep past its expiry: not woken by a visit, removed by gc.
    let d = deployments.get(&name).await.unwrap();
    assert!(sleeper.sleep(&i.id, &d).await.unwrap());
    expire(&client, &ns, &i.id).await;
    assert_eq!(sleeper.wake(&i.id).await.unwrap(), Wake::NotAsleep);
    let removed = p.gc(false).await.unwrap();
    assert!(
        removed
            .iter()
            .any(|r| r.name == name && r.reason == "expired"),
        "{removed:?}"
    );
    assert!(gone(&deployments, &name).await);
    activator.stop().await;
}
