//! Cluster-side settings of the Kubernetes backend: where instances go, how
//! they are exposed, their images and resources. Flags with `FLOWGATE_*`
//! environment fallbacks.

use crate::instance::TtlPolicy;
use clap::{Args, ValueEnum};
use std::time::Duration;

/// Backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Kubernetes or OpenShift (kubeconfig or in-cluster).
    Kubernetes,
    /// Local MLflow processes on this machine (with `serve`).
    Local,
    /// MlflowInstance resources, reconciled by `flowgate operator`.
    Operator,
}

/// How instances are exposed. [`KubeSettings::route_kind_for`] is the one
/// rule that picks and checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RouteKind {
    /// An OpenShift Route if the API serves route.openshift.io; else an
    /// HTTPRoute if it serves gateway.networking.k8s.io/v1 HTTPRoutes and
    /// --gateway names a Gateway; else an Ingress.
    Auto,
    /// networking.k8s.io/v1 Ingress.
    Ingress,
    /// route.openshift.io/v1 Route.
    Route,
    /// gateway.networking.k8s.io/v1 HTTPRoute attached to --gateway (whose
    /// listener terminates TLS).
    Gateway,
}

/// The Gateway the instances' HTTPRoutes attach to, `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    /// The Gateway's namespace.
    pub namespace: String,
    /// The Gateway's name.
    pub name: String,
}

impl std::str::FromStr for GatewayRef {
    type Err = String;

    fn from_str(raw: &str) -> std::result::Result<Self, String> {
        let (namespace, name) = raw
            .split_once('/')
            .ok_or_else(|| format!("{raw:?}: expected NAMESPACE/NAME"))?;
        // A namespace is a DNS label, a Gateway's name a DNS subdomain.
        let dns = |s: &str, dots: bool, max: usize| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
                })
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        if !dns(namespace, false, 63) {
            return Err(format!("{raw:?}: {namespace:?} is not a namespace name"));
        }
        if !dns(name, true, 253) {
            return Err(format!("{raw:?}: {name:?} is not a Gateway name"));
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::fmt::Display for GatewayRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The route APIs a cluster serves (from discovery), which
/// [`KubeSettings::route_kind_for`] chooses among.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteApis {
    /// route.openshift.io (OpenShift Routes).
    pub openshift_routes: bool,
    /// gateway.networking.k8s.io/v1 HTTPRoute.
    pub http_routes: bool,
}

impl RouteApis {
    /// Without a cluster to ask (`create --dry-run`): the kind asked for is
    /// taken as served, and `auto` is taken to find no OpenShift (so it shows
    /// an HTTPRoute when a Gateway is configured, else an Ingress).
    pub fn assumed(requested: RouteKind) -> Self {
        Self {
            openshift_routes: requested == RouteKind::Route,
            http_routes: true,
        }
    }
}

/// Flags of the Kubernetes backend.
#[derive(Args, Clone, Debug)]
pub struct KubeArgs {
    /// The kubeconfig file [default: $KUBECONFIG, ~/.kube/config, or the pod's ServiceAccount]
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use [default: its current context]
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the instances [default: the kubeconfig's, or the pod's]
    #[arg(long, short = 'n', env = "FLOWGATE_NAMESPACE", global = true)]
    pub namespace: Option<String>,
    /// Shared host name the instances live under
    #[arg(
        long,
        env = "FLOWGATE_HOST",
        default_value = "flowgate.local",
        global = true
    )]
    pub host: String,
    /// Scheme of the URLs given to users (the router terminates TLS)
    #[arg(
        long,
        env = "FLOWGATE_URL_SCHEME",
        default_value = "https",
        global = true
    )]
    pub url_scheme: String,
    /// What exposes each instance at /<id>: an Ingress, an OpenShift Route or
    /// a Gateway API HTTPRoute
    #[arg(
        long,
        env = "FLOWGATE_ROUTE_KIND",
        value_enum,
        default_value = "auto",
        global = true
    )]
    pub route_kind: RouteKind,
    /// The Gateway the instances' HTTPRoutes attach to (needed by
    /// --route-kind gateway; lets auto pick HTTPRoutes). Its listener for
    /// --host terminates TLS and must allow routes from the instances'
    /// namespace (allowedRoutes)
    #[arg(
        long,
        env = "FLOWGATE_GATEWAY",
        value_name = "NAMESPACE/NAME",
        global = true
    )]
    pub gateway: Option<GatewayRef>,
    /// IngressClass of the Ingresses
    #[arg(long, env = "FLOWGATE_INGRESS_CLASS", global = true)]
    pub ingress_class: Option<String>,
    /// TLS secret for the Ingresses' host (none: the ingress's default). Not
    /// for HTTPRoutes: their Gateway's listener holds the certificate
    #[arg(long, env = "FLOWGATE_TLS_SECRET", global = true)]
    pub tls_secret: Option<String>,
    /// MLflow image
    #[arg(
        long,
        env = "FLOWGATE_MLFLOW_IMAGE",
        default_value = "flowgate/mlflow:0.1.0",
        global = true
    )]
    pub mlflow_image: String,
    /// Adapter image (sidecar and init container)
    #[arg(
        long,
        env = "FLOWGATE_ADAPTER_IMAGE",
        default_value = "flowgate/adapter:0.1.0",
        global = true
    )]
    pub adapter_image: String,
    /// MLflow container: CPU request,limit
    #[arg(
        long,
        env = "FLOWGATE_MLFLOW_CPU",
        default_value = "100m,1",
        global = true
    )]
    pub mlflow_cpu: String,
    /// MLflow container: memory request,limit
    #[arg(
        long,
        env = "FLOWGATE_MLFLOW_MEMORY",
        default_value = "512Mi,2Gi",
        global = true
    )]
    pub mlflow_memory: String,
    /// Adapter and fetch containers: CPU request,limit
    #[arg(
        long,
        env = "FLOWGATE_ADAPTER_CPU",
        default_value = "20m,500m",
        global = true
    )]
    pub adapter_cpu: String,
    /// Adapter and fetch containers: memory request,limit
    #[arg(
        long,
        env = "FLOWGATE_ADAPTER_MEMORY",
        default_value = "32Mi,256Mi",
        global = true
    )]
    pub adapter_memory: String,
    /// Size limit of the artefact volume
    #[arg(
        long,
        env = "FLOWGATE_STORE_SIZE",
        default_value = "10Gi",
        global = true
    )]
    pub store_size: String,
    /// Default time to live
    #[arg(long, env = "FLOWGATE_DEFAULT_TTL", default_value = "24h", value_parser = humantime::parse_duration, global = true)]
    pub default_ttl: Duration,
    /// Longest time to live (and extension, from now)
    #[arg(long, env = "FLOWGATE_MAX_TTL", default_value = "7d", value_parser = humantime::parse_duration, global = true)]
    pub max_ttl: Duration,
    /// An instance still half-made after this long is removed by gc
    #[arg(long, env = "FLOWGATE_STUCK_AFTER", default_value = "10m", value_parser = humantime::parse_duration, global = true)]
    pub stuck_after: Duration,
    /// ServiceAccount whose Pod-bound token lets the fetch init container
    /// report its download progress in its Pod's status (k8s/base makes
    /// `flowgate-fetch`); none: no progress until the download ends
    #[arg(long, env = "FLOWGATE_FETCH_SERVICE_ACCOUNT", global = true)]
    pub fetch_service_account: Option<String>,
    /// The installation's access keys (one per line, the first signs): needed
    /// to make `link` instances and show their access links [default with the
    /// local backend: DATA_DIR/access-keys, made at the first start]
    #[arg(long, env = "FLOWGATE_ACCESS_KEYS", global = true)]
    pub access_keys: Option<std::path::PathBuf>,
    /// The Secret (key `keys`) holding the same keys, mounted into `link`
    /// instances' adapters
    #[arg(
        long,
        env = "FLOWGATE_ACCESS_SECRET",
        default_value = "flowgate-access-keys",
        global = true
    )]
    pub access_secret: String,
    /// Credentials sets callers may name for their archives' fetch: NAME
    /// (every owner) or NAME=OWNER+OWNER (those owners only); comma-separated.
    /// A name is a Secret in the instances' namespace (local backend: a
    /// directory under --credentials-root)
    #[arg(
        long,
        env = "FLOWGATE_ALLOW_CREDENTIALS",
        value_delimiter = ',',
        value_name = "NAME[=OWNER+OWNER]",
        global = true
    )]
    pub allow_credentials: Vec<crate::credentials::Grant>,
    /// Credentials set used when a create names none
    #[arg(long, env = "FLOWGATE_DEFAULT_CREDENTIALS", value_name = "NAME", value_parser = credentials_name, global = true)]
    pub default_credentials: Option<String>,
}

fn credentials_name(raw: &str) -> std::result::Result<String, String> {
    crate::credentials::validate_name(raw).map_err(|e| e.to_string())
}

impl KubeArgs {
    /// The credentials sets callers may name, and the default.
    pub fn credential_rules(&self) -> crate::credentials::CredentialRules {
        crate::credentials::CredentialRules {
            default: self.default_credentials.clone(),
            grants: self.allow_credentials.clone(),
        }
    }

    /// A client for the cluster `--kubeconfig` and `--context` name, as
    /// kubectl picks it: without them $KUBECONFIG, ~/.kube/config, then the
    /// pod's ServiceAccount.
    pub async fn client(&self) -> crate::Result<kube::Client> {
        let no_config = |e: &dyn std::fmt::Display| {
            crate::Error::Internal(format!("no Kubernetes configuration: {e}"))
        };
        if self.kubeconfig.is_none() && self.context.is_none() {
            return kube::Client::try_default().await.map_err(|e| no_config(&e));
        }
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                    crate::Error::invalid("kubeconfig", format!("{}: {e}", path.display()))
                })?;
                kube::Config::from_custom_kubeconfig(file, &options).await
            }
            None => kube::Config::from_kubeconfig(&options).await,
        }
        .map_err(|e| crate::Error::invalid("context", e.to_string()))?;
        kube::Client::try_from(config).map_err(|e| no_config(&e))
    }
}

/// Resolved settings.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// Namespace.
    pub namespace: String,
    /// Host.
    pub host: String,
    /// URL scheme.
    pub url_scheme: String,
    /// Requested route kind (auto resolved by [`Self::route_kind_for`]).
    pub route_kind: RouteKind,
    /// The Gateway of the instances' HTTPRoutes.
    pub gateway: Option<GatewayRef>,
    /// Ingress class.
    pub ingress_class: Option<String>,
    /// TLS secret.
    pub tls_secret: Option<String>,
    /// Images.
    pub mlflow_image: String,
    /// Images.
    pub adapter_image: String,
    /// (request, limit) pairs.
    pub mlflow_cpu: (String, String),
    /// (request, limit).
    pub mlflow_memory: (String, String),
    /// (request, limit).
    pub adapter_cpu: (String, String),
    /// (request, limit).
    pub adapter_memory: (String, String),
    /// emptyDir size limit.
    pub store_size: String,
    /// TTL bounds.
    pub ttl: TtlPolicy,
    /// When a half-made instance is abandoned.
    pub stuck_after: Duration,
    /// The fetch container's ServiceAccount, for progress reports.
    pub fetch_service_account: Option<String>,
    /// The Secret with the access keys, mounted into `link` instances.
    pub access_secret: String,
}

impl KubeSettings {
    /// Resolves flags; `default_namespace` comes from the client's config.
    pub fn from_args(args: &KubeArgs, default_namespace: &str) -> crate::Result<Self> {
        let pair = |field: &'static str, s: &str| -> crate::Result<(String, String)> {
            match s.split_once(',') {
                Some((a, b)) if !a.trim().is_empty() && !b.trim().is_empty() => {
                    Ok((a.trim().to_owned(), b.trim().to_owned()))
                }
                _ => Err(crate::Error::invalid(
                    field,
                    format!("{s:?}: expected REQUEST,LIMIT such as 100m,1"),
                )),
            }
        };
        Ok(Self {
            namespace: args
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_owned()),
            host: args.host.clone(),
            url_scheme: args.url_scheme.clone(),
            route_kind: args.route_kind,
            gateway: args.gateway.clone(),
            ingress_class: args.ingress_class.clone(),
            tls_secret: args.tls_secret.clone(),
            mlflow_image: args.mlflow_image.clone(),
            adapter_image: args.adapter_image.clone(),
            mlflow_cpu: pair("mlflow-cpu", &args.mlflow_cpu)?,
            mlflow_memory: pair("mlflow-memory", &args.mlflow_memory)?,
            adapter_cpu: pair("adapter-cpu", &args.adapter_cpu)?,
            adapter_memory: pair("adapter-memory", &args.adapter_memory)?,
            store_size: {
                quantity_bytes(&args.store_size)
                    .map_err(|e| crate::Error::invalid("store-size", e))?;
                args.store_size.clone()
            },
            ttl: TtlPolicy {
                default: args.default_ttl,
                min: Duration::from_secs(60),
                max: args.max_ttl,
            },
            stuck_after: args.stuck_after,
            fetch_service_account: args.fetch_service_account.clone(),
            access_secret: args.access_secret.clone(),
        })
    }

    /// The route kind instances get on a cluster serving `apis`: the one
    /// rule for the backend, the operator and `create --dry-run`. `auto`
    /// picks, in order, an OpenShift Route (route.openshift.io served), an
    /// HTTPRoute (HTTPRoutes served and a Gateway configured), an Ingress.
    /// A kind asked for that the cluster does not serve, `gateway` without
    /// a Gateway, and an HTTPRoute with `--tls-secret` (its Gateway's
    /// listener terminates TLS, so the Secret would silently not apply) are
    /// refused.
    pub fn route_kind_for(&self, apis: RouteApis) -> crate::Result<RouteKind> {
        let kind = match self.route_kind {
            RouteKind::Auto if apis.openshift_routes => RouteKind::Route,
            RouteKind::Auto if apis.http_routes && self.gateway.is_some() => RouteKind::Gateway,
            RouteKind::Auto => RouteKind::Ingress,
            RouteKind::Route if !apis.openshift_routes => {
                return Err(crate::Error::invalid(
                    "route-kind",
                    "route was asked for, but the cluster does not serve route.openshift.io",
                ));
            }
            RouteKind::Gateway if self.gateway.is_none() => {
                return Err(crate::Error::invalid(
                    "gateway",
                    "--route-kind gateway needs --gateway NAMESPACE/NAME (FLOWGATE_GATEWAY): \
                     the Gateway the instances' HTTPRoutes attach to",
                ));
            }
            RouteKind::Gateway if !apis.http_routes => {
                return Err(crate::Error::invalid(
                    "route-kind",
                    "gateway was asked for, but the cluster does not serve \
                     gateway.networking.k8s.io/v1 HTTPRoute (install the Gateway API CRDs)",
                ));
            }
            other => other,
        };
        if let (RouteKind::Gateway, Some(secret), Some(gateway)) =
            (kind, &self.tls_secret, &self.gateway)
        {
            return Err(crate::Error::invalid(
                "tls-secret",
                format!(
                    "{secret:?} is for Ingresses; instances get HTTPRoutes here, whose TLS is \
                     terminated by the listener of Gateway {gateway} (its certificateRefs): \
                     unset --tls-secret (FLOWGATE_TLS_SECRET) or use --route-kind ingress"
                ),
            ));
        }
        Ok(kind)
    }

    /// The URL users open for an instance.
    pub fn url_for(&self, id: &crate::instance::InstanceId) -> String {
        format!("{}://{}/{}/", self.url_scheme, self.host, id)
    }
}

/// Bytes in a Kubernetes quantity such as `10Gi`, `500M`, `1.5Gi` or `2e9`
/// (rounded down). Errors name what is wrong.
pub fn quantity_bytes(raw: &str) -> std::result::Result<u64, String> {
    let s = raw.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let bad = || format!("{raw:?}: not a quantity such as 10Gi or 500M");
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => 1e-3,
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("{raw:?}: out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        kube: KubeArgs,
    }

    /// Settings with these route flags, whatever FLOWGATE_* the process has.
    fn settings(kind: RouteKind, gateway: Option<&str>, tls_secret: Option<&str>) -> KubeSettings {
        let args = Wrap::try_parse_from(["x"]).unwrap().kube;
        let mut s = KubeSettings::from_args(&args, "flowgate").unwrap();
        s.route_kind = kind;
        s.gateway = gateway.map(|g| g.parse().unwrap());
        s.tls_secret = tls_secret.map(str::to_owned);
        s
    }

    const NONE: RouteApis = RouteApis {
        openshift_routes: false,
        http_routes: false,
    };
    const OPENSHIFT: RouteApis = RouteApis {
        openshift_routes: true,
        http_routes: false,
    };
    const GATEWAY_API: RouteApis = RouteApis {
        openshift_routes: false,
        http_routes: true,
    };
    const BOTH: RouteApis = RouteApis {
        openshift_routes: true,
        http_routes: true,
    };

    #[test]
    fn auto_prefers_routes_then_http_routes_with_a_gateway_then_ingresses() {
        let plain = settings(RouteKind::Auto, None, None);
        let with_gateway = settings(RouteKind::Auto, Some("infra/shared"), None);
        let pick = |s: &KubeSettings, apis| s.route_kind_for(apis).unwrap();
        assert_eq!(pick(&with_gateway, BOTH), RouteKind::Route);
        assert_eq!(pick(&with_gateway, GATEWAY_API), RouteKind::Gateway);
        assert_eq!(pick(&with_gateway, NONE), RouteKind::Ingress);
        assert_eq!(pick(&plain, GATEWAY_API), RouteKind::Ingress);
        assert_eq!(pick(&plain, OPENSHIFT), RouteKind::Route);
        assert_eq!(pick(&plain, NONE), RouteKind::Ingress);
        // a --tls-secret makes auto's HTTPRoute an error, not a silent Ingress
        let tls = settings(RouteKind::Auto, Some("infra/shared"), Some("cert"));
        assert!(matches!(
            tls.route_kind_for(GATEWAY_API),
            Err(crate::Error::Invalid {
                field: "tls-secret",
                ..
            })
        ));
        assert_eq!(pick(&tls, NONE), RouteKind::Ingress);
    }

    #[test]
    fn gateway_needs_a_gateway_the_gateway_api_and_no_tls_secret() {
        let asked = settings(RouteKind::Gateway, Some("infra/shared"), None);
        assert_eq!(asked.route_kind_for(BOTH).unwrap(), RouteKind::Gateway);
        assert_eq!(
            asked.route_kind_for(GATEWAY_API).unwrap(),
            RouteKind::Gateway
        );
        let e = asked.route_kind_for(OPENSHIFT).unwrap_err();
        assert!(
            e.to_string()
                .contains("gateway.networking.k8s.io/v1 HTTPRoute"),
            "{e}"
        );
        let e = settings(RouteKind::Gateway, None, None)
            .route_kind_for(GATEWAY_API)
            .unwrap_err();
        assert!(
            matches!(
                &e,
                crate::Error::Invalid {
                    field: "gateway",
                    ..
                }
            ) && e.to_string().contains("--gateway NAMESPACE/NAME"),
            "{e}"
        );
        let e = settings(RouteKind::Gateway, Some("infra/shared"), Some("c"))
            .route_kind_for(GATEWAY_API)
            .unwrap_err();
        assert!(e.to_string().contains("infra/shared"), "{e}");
        // Ingresses keep their Secret; a configured Gateway does not matter to them
        let ingress = settings(RouteKind::Ingress, Some("infra/shared"), Some("c"));
        assert_eq!(ingress.route_kind_for(BOTH).unwrap(), RouteKind::Ingress);
        assert!(
            settings(RouteKind::Route, None, None)
                .route_kind_for(GATEWAY_API)
                .is_err()
        );
    }

    #[test]
    fn gateways_are_namespace_slash_name() {
        let g: GatewayRef = "gateway-system/shared.gw-1".parse().unwrap();
        assert_eq!(
            (g.namespace.as_str(), g.name.as_str()),
            ("gateway-system", "shared.gw-1")
        );
        assert_eq!(g.to_string(), "gateway-system/shared.gw-1");
        for bad in [
            "shared",
            "/shared",
            "ns/",
            "ns/a/b",
            "Ns/shared",
            "ns/-x",
            "a.b/shared",
            "ns/x y",
        ] {
            assert!(bad.parse::<GatewayRef>().is_err(), "{bad:?}");
        }
        assert!(Wrap::try_parse_from(["x", "--gateway", "shared"]).is_err());
        let args = Wrap::try_parse_from(["x", "--route-kind", "gateway", "--gateway", "infra/gw"])
            .unwrap()
            .kube;
        let s = KubeSettings::from_args(&args, "flowgate").unwrap();
        assert_eq!(s.route_kind, RouteKind::Gateway);
        assert_eq!(s.gateway, Some("infra/gw".parse().unwrap()));
    }

    #[test]
    fn without_a_cluster_what_was_asked_for_is_taken_as_served() {
        let s = settings(RouteKind::Auto, Some("infra/shared"), None);
        assert_eq!(
            s.route_kind_for(RouteApis::assumed(RouteKind::Auto))
                .unwrap(),
            RouteKind::Gateway
        );
        let s = settings(RouteKind::Route, None, None);
        assert_eq!(
            s.route_kind_for(RouteApis::assumed(RouteKind::Route))
                .unwrap(),
            RouteKind::Route
        );
        assert_eq!(
            settings(RouteKind::Auto, None, None)
                .route_kind_for(RouteApis::assumed(RouteKind::Auto))
                .unwrap(),
            RouteKind::Ingress
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("10Gi"), Ok(10 << 30));
        assert_eq!(quantity_bytes("500M"), Ok(500_000_000));
        assert_eq!(quantity_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(quantity_bytes("2e9"), Ok(2_000_000_000));
        assert_eq!(quantity_bytes("1024"), Ok(1024));
        for bad in ["", "Gi", "10GB", "-1Gi", "1..2Gi", "0", "10 Gi x", "1e999"] {
            assert!(quantity_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
