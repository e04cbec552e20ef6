#!/usr/bin/env python3
"""Static checks of one rendered overlay (k8s/overlays/<name>), stdlib only.

    check_rendered.py OVERLAY RENDERED.json ROLE.json REPO_ROOT

RENDERED.json: the overlay's objects as JSON (a List, from `kubectl create
--dry-run=client -o json`); ROLE.json: k8s/base/provisioner-role.yaml as committed,
likewise. Prints one line per check, `ok   ...` or `FAIL ...` (with the reasons
indented below); testenv/manifests/validate counts them.
"""

import ipaddress
import json
import os
import re
import sys

NS = "flowgate"
BUILD_NS = "flowgate-build"
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


class Checks:
    def __init__(self, overlay):
        self.overlay = overlay
        self.failed = 0

    def check(self, name, problems):
        problems = [p for p in problems if p]
        if problems:
            self.failed += 1
            print(f"FAIL [{self.overlay}] {name}")
            for p in problems[:20]:
                print(f"       - {p}")
        else:
            print(f"ok   [{self.overlay}] {name}")


def items(path):
    with open(path) as f:
        data = json.load(f)
    return data["items"] if data.get("kind") == "List" else [data]


def ident(o):
    return f"{o['kind']}/{o['metadata'].get('name')}"


def pod_templates(objs):
    """(object, pod template spec, path) for every workload."""
    for o in objs:
        k = o["kind"]
        if k in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o, o["spec"]["template"], "spec.template"
        elif k == "CronJob":
            yield o, o["spec"]["jobTemplate"]["spec"]["template"], "spec.jobTemplate.spec.template"


def by(objs, kind, name=None):
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind, name):
    found = by(objs, kind, name)
    return found[0] if len(found) == 1 else None


def selects(np, labels):
    """True when the NetworkPolicy's podSelector matches `labels`."""
    sel = np["spec"].get("podSelector", {})
    if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
        return False
    for e in sel.get("matchExpressions", []):
        have, op, values = labels.get(e["key"]), e["operator"], e.get("values", [])
        if (op == "In" and have not in values) or (op == "NotIn" and have in values) \
                or (op == "Exists" and have is None) or (op == "DoesNotExist" and have is not None):
            return False
    return True


# never reachable from any Flowgate pod: link-local (cloud metadata, the node's services)
LINK_LOCAL = [ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")]
DNS_PORTS = {53, 5353}


def link_local_leaks(block):
    """Link-local networks an ipBlock admits (not taken out by its `except`)."""
    net = ipaddress.ip_network(block["cidr"], strict=False)
    excepted = [ipaddress.ip_network(e, strict=False) for e in block.get("except", [])]
    leaks = []
    for ll in LINK_LOCAL:
        if ll.version != net.version or not net.overlaps(ll):
            continue
        if not any(e.version == ll.version and (e == ll or ll.subnet_of(e)) for e in excepted):
            leaks.append(str(ll))
    return leaks


def check_network_policies(c, objs):
    nps = by(objs, "NetworkPolicy")
    # every pod Flowgate runs or makes is isolated both ways by some policy
    pods = [(ident(o), tpl["metadata"].get("labels", {})) for o, tpl, _ in pod_templates(objs)]
    pods.append(("instance pods", {"app.kubernetes.io/name": "mlflow"}))
    probs = []
    for name, labels in pods:
        for kind in ("Ingress", "Egress"):
            if not any(selects(np, labels) and kind in np["spec"].get("policyTypes", []) for np in nps):
                probs.append(f"{name}: no NetworkPolicy with {kind} selects it (open {kind.lower()})")
    c.check("NetworkPolicy: every Flowgate pod and every instance pod is isolated for ingress and egress", probs)

    probs = []
    for np in nps:
        for rule in np["spec"].get("egress", []):
            if not rule.get("to"):
                probs.append(f"{ident(np)}: an egress rule without `to` reaches everything")
            for peer in rule.get("to", []):
                if "ipBlock" in peer:
                    for leak in link_local_leaks(peer["ipBlock"]):
                        probs.append(f"{ident(np)}: ipBlock {peer['ipBlock']} reaches link-local {leak}")
                elif peer.get("namespaceSelector") == {} and not peer.get("podSelector"):
                    probs.append(f"{ident(np)}: egress to every namespace")
    c.check("NetworkPolicy: no egress rule reaches link-local addresses (169.254.0.0/16, fe80::/10, "
            "fd00:ec2::254) or everything", probs)

    egress = one(objs, "NetworkPolicy", "flowgate-instances-egress")
    probs = [] if egress else ["no NetworkPolicy flowgate-instances-egress"]
    if egress:
        s = egress["spec"]
        if s.get("podSelector") != {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}:
            probs.append(f"podSelector {s.get('podSelector')}")
        if s.get("policyTypes") != ["Egress"]:
            probs.append(f"policyTypes {s.get('policyTypes')}")
        dns = blocks = 0
        for rule in s.get("egress", []):
            peers = rule.get("to", [])
            ports = {p.get("port") for p in rule.get("ports", [])}
            if peers and all("ipBlock" in p for p in peers):
                blocks += 1
                if not rule.get("ports"):
                    probs.append("an artefact rule without ports")
            elif peers and all("ipBlock" not in p and p.get("podSelector") for p in peers) \
                    and ports and ports <= DNS_PORTS:
                dns += 1
            else:
                probs.append(f"rule {rule} is neither DNS (pods, ports 53/5353) nor artefact ipBlocks")
        if not dns:
            probs.append("no DNS rule")
        if not blocks:
            probs.append("no artefact-store rule")
    c.check("NetworkPolicy: instance pods reach DNS and the artefact store's blocks only", probs)

    api = one(objs, "NetworkPolicy", "flowgate-api")
    probs = [] if api else ["no NetworkPolicy flowgate-api"]
    if api:
        for r in api["spec"].get("ingress", []):
            if [(p.get("protocol", "TCP"), p.get("port")) for p in r.get("ports", [])] != [("TCP", 7000), ("TCP", 8081)]:
                probs.append(f"ports {r.get('ports')} are not exactly TCP 7000 and 8081 (the activator)")
            if not r.get("from"):
                probs.append("an ingress rule without `from` admits every source")
            for peer in r.get("from", []):
                if "ipBlock" in peer or peer.get("namespaceSelector") == {}:
                    probs.append(f"peer {peer} is too wide")
    c.check("NetworkPolicy: the API reachable on TCP 7000 and 8081 (activator) from the ingress namespace only", probs)

    # sleeping instances: the API reads the instance pods' metrics (8080), both ends allowed, nothing more
    api_pods = {"matchLabels": {"app.kubernetes.io/name": "flowgate", "app.kubernetes.io/component": "api"}}
    instance_pods = {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
    want = {
        "flowgate-instances-from-api": {
            "podSelector": instance_pods, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": api_pods}], "ports": [{"protocol": "TCP", "port": 8080}]}]},
        "flowgate-api-to-instances": {
            "podSelector": api_pods, "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": instance_pods}], "ports": [{"protocol": "TCP", "port": 8080}]}]},
    }
    probs = []
    for name, spec in want.items():
        np = one(objs, "NetworkPolicy", name)
        if not np:
            probs.append(f"no NetworkPolicy {name}")
        elif np["spec"] != spec:
            probs.append(f"{name}: spec {json.dumps(np['spec'])}")
    c.check("NetworkPolicy: the API pods reach instance pods on TCP 8080 (metrics, for sleeping), "
            "and only they (flowgate-instances-from-api, flowgate-api-to-instances)", probs)


def main():
    overlay, rendered, role_file, root = sys.argv[1:5]
    objs = items(rendered)
    c = Checks(overlay)
    text = json.dumps(objs)

    c.check(f"renders {len(objs)} objects, no placeholder left",
            ["PLACEHOLDER found in the output"] if "PLACEHOLDER" in text else [])

    # labels and namespaces
    probs = []
    for o in objs:
        labels = o["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of"):
            if not labels.get(key):
                probs.append(f"{ident(o)} lacks label {key}")
    c.check("every object has app.kubernetes.io/name, component, part-of labels", probs)
    probs = []
    for o in objs:
        if o["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"):
            continue
        ns = o["metadata"].get("namespace")
        allowed = {NS, BUILD_NS} if overlay == "openshift" else {NS}
        if ns not in allowed:
            probs.append(f"{ident(o)} in namespace {ns!r}")
        if overlay == "openshift" and o["kind"] in ("BuildConfig", "ImageStream") and ns != BUILD_NS:
            probs.append(f"{ident(o)} must be in {BUILD_NS} (builds run privileged)")
    c.check("every namespaced object has its namespace", probs)

    nsobj = one(objs, "Namespace", NS)
    probs = [] if nsobj else [f"no Namespace {NS}"]
    if nsobj:
        labels = nsobj["metadata"].get("labels", {})
        for mode in ("enforce", "audit", "warn"):
            if labels.get(f"pod-security.kubernetes.io/{mode}") != "restricted":
                probs.append(f"pod-security.kubernetes.io/{mode} is not restricted")
    c.check(f"Namespace {NS} enforces, audits and warns Pod Security `restricted`", probs)

    # every container: resources and a restricted securityContext, no fixed UID
    probs = []
    templates = list(pod_templates(objs))
    for o, tpl, path in templates:
        spec = tpl["spec"]
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            probs.append(f"{ident(o)}: pod securityContext.runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            probs.append(f"{ident(o)}: pod seccompProfile is not RuntimeDefault")
        if "runAsUser" in psc:
            probs.append(f"{ident(o)}: pod runAsUser set (breaks OpenShift's arbitrary UIDs)")
        for ctr in spec.get("initContainers", []) + spec.get("containers", []):
            where = f"{ident(o)} container {ctr['name']}"
            res = ctr.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if not res.get(part, {}).get(r):
                        probs.append(f"{where}: no resources.{part}.{r}")
            sc = ctr.get("securityContext", {})
            for k, v in RESTRICTED.items():
                if sc.get(k) is not v:
                    probs.append(f"{where}: securityContext.{k} is not {v}")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                probs.append(f"{where}: capabilities.drop is not [ALL]")
            if sc.get("capabilities", {}).get("add"):
                probs.append(f"{where}: adds capabilities")
            if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
                probs.append(f"{where}: seccompProfile is not RuntimeDefault")
            if "runAsUser" in sc:
                probs.append(f"{where}: runAsUser set (breaks OpenShift's arbitrary UIDs)")
            if sc.get("privileged"):
                probs.append(f"{where}: privileged")
    if len(templates) != 3:
        probs.append(f"expected 3 pod templates (API, gc, upgrade), found {len(templates)}")
    c.check(f"{len(templates)} pod templates: resources and restricted securityContext everywhere, no runAsUser", probs)

    # settings
    cms = [o for o in by(objs, "ConfigMap") if o["metadata"]["name"].startswith("flowgate-config")]
    cm = cms[0] if len(cms) == 1 else None
    data = cm.get("data", {}) if cm else {}
    want_kind = {"kubernetes": "ingress", "openshift": "route"}[overlay]
    probs = [] if cm else ["no single flowgate-config ConfigMap"]
    for key in ("FLOWGATE_HOST", "FLOWGATE_MLFLOW_IMAGE", "FLOWGATE_ADAPTER_IMAGE", "FLOWGATE_ROUTE_KIND"):
        if not data.get(key):
            probs.append(f"flowgate-config lacks {key}")
    if data.get("FLOWGATE_ROUTE_KIND") != want_kind:
        probs.append(f"FLOWGATE_ROUTE_KIND is {data.get('FLOWGATE_ROUTE_KIND')!r}, not {want_kind}")
    if cm and not re.search(r"-[a-z0-9]{10}$", cm["metadata"]["name"]):
        probs.append("flowgate-config has no content hash (a change would not roll the API)")
    c.check(f"flowgate-config: host, images, FLOWGATE_ROUTE_KIND={want_kind}", probs)

    probs = []
    for o, tpl, _ in templates:
        for ctr in tpl["spec"]["containers"]:
            env = {e["name"]: e for e in ctr.get("env", [])}
            ref = env.get("FLOWGATE_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if ref != "metadata.namespace":
                probs.append(f"{ident(o)}: FLOWGATE_NAMESPACE is not the fieldRef metadata.namespace")
            names = [e.get("configMapRef", {}).get("name") for e in ctr.get("envFrom", [])]
            if not cm or cm["metadata"]["name"] not in names:
                probs.append(f"{ident(o)}: envFrom does not reference {cm and cm['metadata']['name']}")
        if tpl["spec"].get("serviceAccountName") != "flowgate-provisioner":
            probs.append(f"{ident(o)}: serviceAccountName is not flowgate-provisioner")
        if tpl["spec"].get("automountServiceAccountToken") is not True:
            probs.append(f"{ident(o)}: needs its API token (automountServiceAccountToken: true)")
    c.check("API, gc and upgrade pods: FLOWGATE_NAMESPACE from the fieldRef, settings from flowgate-config, "
            "ServiceAccount flowgate-provisioner", probs)

    # the API
    d = one(objs, "Deployment", "flowgate-api")
    probs = [] if d else ["no Deployment flowgate-api"]
    if d:
        spec = d["spec"]["template"]["spec"]
        ctr = spec["containers"][0]
        if ctr.get("args") != ["serve", "--listen", "0.0.0.0:7000", "--tokens", "/etc/flowgate/tokens",
                               "--access-keys", "/etc/flowgate-access/keys", "--activator-listen", "0.0.0.0:8081"]:
            probs.append(f"args {ctr.get('args')}")
        ports = {p.get("name"): (p.get("containerPort"), p.get("protocol", "TCP")) for p in ctr.get("ports", [])}
        if ports.get("http") != (7000, "TCP"):
            probs.append("no port http: 7000")
        # sleeping instances' Services target this port by name
        if ports.get("activator") != (8081, "TCP"):
            probs.append(f"no port activator: 8081/TCP ({ports.get('activator')})")
        for probe in ("readinessProbe", "livenessProbe"):
            if ctr.get(probe, {}).get("httpGet", {}).get("path") != "/healthz":
                probs.append(f"{probe} is not GET /healthz")
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in ctr.get("volumeMounts", [])}
        tok = vols.get(mounts.get("/etc/flowgate"), {}).get("secret", {})
        if tok.get("secretName") != "flowgate-api-tokens":
            probs.append("/etc/flowgate is not the Secret flowgate-api-tokens")
        keys = vols.get(mounts.get("/etc/flowgate-access"), {}).get("secret", {})
        if keys.get("secretName") != "flowgate-access-keys":
            probs.append("/etc/flowgate-access is not the Secret flowgate-access-keys")
        sel = d["spec"]["selector"]["matchLabels"]
        tl = d["spec"]["template"]["metadata"]["labels"]
        if any(tl.get(k) != v for k, v in sel.items()):
            probs.append("selector does not match the template's labels")
        svc = one(objs, "Service", "flowgate-api")
        if not svc:
            probs.append("no Service flowgate-api")
        else:
            p = svc["spec"]["ports"][0]
            if (p.get("port"), p.get("targetPort")) != (80, "http"):
                probs.append(f"Service port {p.get('port')} -> {p.get('targetPort')}, not 80 -> http")
            if any(tl.get(k) != v for k, v in svc["spec"]["selector"].items()):
                probs.append("Service selector does not match the API pods")
    c.check("API Deployment: flowgate serve on 0.0.0.0:7000 with tokens and access keys from Secrets, activator on "
            "0.0.0.0:8081 (port `activator`), /healthz probes, Service 80 -> 7000", probs)

    # gc
    gc = one(objs, "CronJob", "flowgate-gc")
    probs = [] if gc else ["no CronJob flowgate-gc"]
    if gc:
        s = gc["spec"]
        fields = s["schedule"].split()
        if len(fields) != 5 or not fields[0].isdigit() or fields[1:] != ["*", "*", "*", "*"]:
            probs.append(f"schedule {s['schedule']!r} is not hourly")
        if s.get("concurrencyPolicy") != "Forbid":
            probs.append("concurrencyPolicy is not Forbid")
        for k in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
            if not isinstance(s.get(k), int):
                probs.append(f"no {k}")
        if s.get("suspend"):
            probs.append("suspended")
        ctr = s["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        if ctr.get("args") != ["gc"]:
            probs.append(f"args {ctr.get('args')}")
    c.check("gc CronJob: hourly `flowgate gc`, Forbid, history limits", probs)
    up = one(objs, "CronJob", "flowgate-upgrade")
    probs = [] if up else ["no CronJob flowgate-upgrade"]
    if up:
        if up["spec"].get("suspend") is not True:
            probs.append("flowgate-upgrade must be suspended (a Job template, run on demand)")
        args = up["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0].get("args", [])
        if args[:1] != ["upgrade"] or "--mlflow-image" not in args or "--adapter-image" not in args:
            probs.append(f"args {args}")
    c.check("upgrade CronJob: suspended `flowgate upgrade --mlflow-image --adapter-image` template", probs)

    # RBAC
    role = one(objs, "Role", "flowgate-provisioner")
    with open(role_file) as f:
        committed = json.load(f)
    probs = [] if role else ["no Role flowgate-provisioner"]
    if role and role.get("rules") != committed.get("rules"):
        probs.append("the Role's rules differ from k8s/base/provisioner-role.yaml as committed")
    rb = one(objs, "RoleBinding", "flowgate-provisioner")
    if not rb:
        probs.append("no RoleBinding flowgate-provisioner")
    else:
        if rb["roleRef"] != {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "flowgate-provisioner"}:
            probs.append(f"roleRef {rb['roleRef']}")
        if rb["subjects"] != [{"kind": "ServiceAccount", "name": "flowgate-provisioner", "namespace": NS}]:
            probs.append(f"subjects {rb['subjects']}")
    if not one(objs, "ServiceAccount", "flowgate-provisioner"):
        probs.append("no ServiceAccount flowgate-provisioner")
    if by(objs, "ClusterRole") or [b for b in by(objs, "ClusterRoleBinding")]:
        probs.append("cluster-wide RBAC objects: the provisioner needs its namespace only")
    c.check("RBAC: the committed least-privilege Role, bound to the provisioner's ServiceAccount only", probs)

    # NetworkPolicy
    nps = [np for np in by(objs, "NetworkPolicy") if np["metadata"]["name"] == "flowgate-instances"]
    probs = [] if len(nps) == 1 else [f"{len(nps)} NetworkPolicies flowgate-instances, expected 1"]
    for np in nps:
        s = np["spec"]
        if s.get("podSelector") != {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}:
            probs.append(f"podSelector {s.get('podSelector')} is not exactly app.kubernetes.io/name=mlflow "
                         "(instance pods of the provisioner and of the operator)")
        if s.get("policyTypes") != ["Ingress"]:
            probs.append(f"policyTypes {s.get('policyTypes')}")
        rules = s.get("ingress", [])
        if not rules:
            probs.append("no ingress rule")
        for r in rules:
            if not r.get("from"):
                probs.append("a rule without `from` admits every source")
            if [(p.get("protocol", "TCP"), p.get("port")) for p in r.get("ports", [])] != [("TCP", 8080)]:
                probs.append(f"ports {r.get('ports')} are not exactly TCP 8080")
            for peer in r.get("from", []):
                if "ipBlock" in peer or (peer.get("namespaceSelector") == {}):
                    probs.append(f"peer {peer} is too wide")
    c.check("NetworkPolicy: instance pods (name=mlflow) reachable on TCP 8080 from the ingress namespace only", probs)
    check_network_policies(c, objs)

    if overlay == "kubernetes":
        ing = one(objs, "Ingress", "flowgate-api")
        probs = [] if ing else ["no Ingress flowgate-api"]
        if ing:
            s = ing["spec"]
            if s.get("ingressClassName") != data.get("FLOWGATE_INGRESS_CLASS"):
                probs.append("ingressClassName is not FLOWGATE_INGRESS_CLASS")
            rule = s["rules"][0]
            if rule.get("host") != data.get("FLOWGATE_HOST"):
                probs.append("host is not FLOWGATE_HOST")
            path = rule["http"]["paths"][0]
            if (path.get("path"), path.get("pathType")) != ("/api", "Prefix"):
                probs.append(f"path {path.get('path')} {path.get('pathType')}")
            if path["backend"]["service"] != {"name": "flowgate-api", "port": {"name": "http"}}:
                probs.append(f"backend {path['backend']}")
            tls = s.get("tls", [{}])[0]
            if tls.get("hosts") != [data.get("FLOWGATE_HOST")] or tls.get("secretName") != data.get("FLOWGATE_TLS_SECRET"):
                probs.append("tls does not use FLOWGATE_HOST / FLOWGATE_TLS_SECRET")
        c.check("Ingress for the API: /api on FLOWGATE_HOST with FLOWGATE_INGRESS_CLASS, to flowgate-api:http", probs)
        c.check("no OpenShift objects", [ident(o) for o in objs if o["apiVersion"].split("/")[0].endswith("openshift.io")])
    else:
        route = one(objs, "Route", "flowgate-api")
        probs = [] if route else ["no Route flowgate-api"]
        if route:
            s = route["spec"]
            if s.get("host") != data.get("FLOWGATE_HOST"):
                probs.append("host is not FLOWGATE_HOST")
            if s.get("path") != "/api" or s.get("to", {}).get("name") != "flowgate-api":
                probs.append(f"path {s.get('path')} to {s.get('to')}")
            if s.get("tls", {}).get("termination") != "edge":
                probs.append("TLS not terminated at the edge")
        c.check("Route for the API: /api on FLOWGATE_HOST to flowgate-api", probs)

        streams = {o["metadata"]["name"] for o in by(objs, "ImageStream")}
        probs = []
        want = {"flowgate-provisioner": "Dockerfile.provisioner", "flowgate-adapter": "Dockerfile.adapter",
                "flowgate-mlflow": "Dockerfile.mlflow"}
        if streams != set(want):
            probs.append(f"ImageStreams {sorted(streams)}")
        bcs = by(objs, "BuildConfig")
        seen = set()
        for bc in bcs:
            s = bc["spec"]
            name = bc["metadata"]["name"]
            git = s.get("source", {}).get("git", {})
            if s.get("source", {}).get("type") != "Git" or not git.get("uri") or not git.get("ref"):
                probs.append(f"{name}: no Git source uri/ref")
            st = s.get("strategy", {})
            path = st.get("dockerStrategy", {}).get("dockerfilePath")
            if st.get("type") != "Docker" or path != want.get(name):
                probs.append(f"{name}: strategy {st.get('type')} dockerfilePath {path}")
            elif not os.path.isfile(os.path.join(root, path)):
                probs.append(f"{name}: {path} is not in the repository")
            to = s.get("output", {}).get("to", {})
            if to.get("kind") != "ImageStreamTag" or to.get("name") != f"{name}:latest":
                probs.append(f"{name}: output {to}")
            types = [t.get("type") for t in s.get("triggers", [])]
            gl = [t for t in s.get("triggers", []) if t.get("type") == "GitLab"]
            if not gl or not gl[0].get("gitlab", {}).get("secretReference", {}).get("name"):
                probs.append(f"{name}: no GitLab webhook trigger with a secretReference")
            if "ConfigChange" not in types:
                probs.append(f"{name}: no ConfigChange trigger")
            seen.add(name)
        if seen != set(want):
            probs.append(f"BuildConfigs {sorted(seen)}")
        c.check("3 ImageStreams and 3 Docker-strategy BuildConfigs (Git source, Dockerfile per image, "
                "GitLab webhook + ConfigChange triggers)", probs)

        probs = []
        for o, tpl, path in templates:
            raw = o["metadata"].get("annotations", {}).get("image.openshift.io/triggers")
            if not raw:
                probs.append(f"{ident(o)}: no image.openshift.io/triggers annotation")
                continue
            try:
                triggers = json.loads(raw)
            except ValueError as e:
                probs.append(f"{ident(o)}: triggers annotation is not JSON: {e}")
                continue
            names = {ct["name"] for ct in tpl["spec"]["containers"]}
            for t in triggers:
                src = t.get("from", {})
                stream = src.get("name", "").split(":")[0]
                if src.get("kind") != "ImageStreamTag" or stream not in streams or src.get("namespace") != BUILD_NS:
                    probs.append(f"{ident(o)}: trigger from {src}")
                m = re.fullmatch(re.escape(path) + r'\.spec\.containers\[\?\(@\.name=="([^"]+)"\)\]\.image', t.get("fieldPath", ""))
                if not m or m.group(1) not in names:
                    probs.append(f"{ident(o)}: fieldPath {t.get('fieldPath')} names no container of the template")
        c.check("image.openshift.io/triggers on the API Deployment and the CronJobs: ImageStreamTag "
                "flowgate-provisioner:latest into their container", probs)
        pullers = [o for o in by(objs, "RoleBinding") if o["metadata"].get("namespace") == BUILD_NS]
        ok = any(p["roleRef"].get("name") == "system:image-puller"
                 and {"kind": "Group", "name": f"system:serviceaccounts:{NS}", "apiGroup": "rbac.authorization.k8s.io"}
                 in p.get("subjects", []) for p in pullers)
        c.check(f"pods in {NS} may pull the images built in {BUILD_NS}", [] if ok else ["no image-puller RoleBinding"])
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
