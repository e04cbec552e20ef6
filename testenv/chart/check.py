#!/usr/bin/env python3
"""Checks of the Helm chart's renderings (stdlib only); testenv/chart/validate runs them.

    check.py compare NAME KUSTOMIZE.json CHART.json
        The chart renders the same objects as kustomize: each object of either
        side, matched by (group, kind, namespace, name), equal after normalising
        what only says who rendered it (managed-by, helm.sh/chart and instance
        labels, checksum/* and helm.sh/* annotations, the hash suffix kustomize
        gives generated ConfigMaps). Data-driven: whatever k8s/ holds is compared.
    check.py static NAME RENDERED.json CHART_VALUES.yaml [VALUES.yaml]
        What the values (the chart's defaults merged with VALUES.yaml as helm
        merges them) ask for is in the rendering, and every pod template is
        `restricted`-clean with resources. Needs PyYAML (the MLflow venv's python).

RENDERED/KUSTOMIZE/CHART.json: a List from `kubectl create --dry-run=client -o json`.
Prints `ok   ...` / `FAIL ...` lines (reasons indented) for the caller to count.
"""

import json
import re
import sys

DROP_LABELS = {"app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "helm.sh/chart"}
DROP_ANNOTATIONS = re.compile(r"^(checksum/|helm\.sh/|meta\.helm\.sh/)")
# kustomize's configMapGenerator/secretGenerator suffix: -<10 characters of [bcdfghkmt2-9]>
HASHED = re.compile(r"^(.+)-([a-z0-9]{10})$")


def items(path):
    with open(path) as f:
        data = json.load(f)
    return data["items"] if data.get("kind") == "List" else [data]


def key(o):
    group = o["apiVersion"].split("/")[0] if "/" in o["apiVersion"] else ""
    return (group, o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])


def show(k):
    group, kind, ns, name = k
    return f"{kind}{'.' + group if group else ''} {ns + '/' if ns else ''}{name}"


def strip_meta(node):
    """Drops the renderer's own labels and annotations, everywhere (objects and templates)."""
    if isinstance(node, dict):
        meta = node.get("metadata")
        if isinstance(meta, dict):
            labels = meta.get("labels")
            if isinstance(labels, dict):
                for k in DROP_LABELS:
                    labels.pop(k, None)
                if not labels:
                    meta.pop("labels")
            ann = meta.get("annotations")
            if isinstance(ann, dict):
                for k in [k for k in ann if DROP_ANNOTATIONS.match(k)]:
                    ann.pop(k)
                if not ann:
                    meta.pop("annotations")
            meta.pop("creationTimestamp", None)
        for v in node.values():
            strip_meta(v)
    elif isinstance(node, list):
        for v in node:
            strip_meta(v)
    return node


def unhash(objs):
    """Renames kustomize's generated ConfigMaps/Secrets (name-<hash>) and every reference to them."""
    renames = {}
    for o in objs:
        if o["kind"] in ("ConfigMap", "Secret"):
            m = HASHED.match(o["metadata"]["name"])
            if m:
                renames[o["metadata"]["name"]] = m.group(1)

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and node in renames:
            return renames[node]
        return node

    return [walk(o) for o in objs]


def diff(a, b, path=""):
    """Where two JSON values differ, as `path: a != b` lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}"
            if k not in a:
                out.append(f"{p}: only in the chart: {json.dumps(b[k])[:160]}")
            elif k not in b:
                out.append(f"{p}: only in kustomize: {json.dumps(a[k])[:160]}")
            else:
                out += diff(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    if a != b:
        return [f"{path}: kustomize {json.dumps(a)[:160]} != chart {json.dumps(b)[:160]}"]
    return []


def compare(name, kustomize_file, chart_file):
    k = {key(o): strip_meta(o) for o in unhash(items(kustomize_file))}
    c = {key(o): strip_meta(o) for o in items(chart_file)}
    problems = []
    for missing in sorted(set(k) - set(c)):
        hint = " (add its spec under networkPolicies in charts/flowgate/values.yaml)" if missing[1] == "NetworkPolicy" else ""
        problems.append(f"{show(missing)}: in kustomize, not rendered by the chart{hint}")
    for extra in sorted(set(c) - set(k)):
        problems.append(f"{show(extra)}: rendered by the chart, not in kustomize")
    for both in sorted(set(k) & set(c)):
        for d in diff(k[both], c[both]):
            problems.append(f"{show(both)}{d}")
    line = f"[{name}] chart renders the same {len(k)} objects as kustomize ({', '.join(sorted({x[1] for x in k}))})"
    report(line, problems)
    return not problems


def report(line, problems):
    if problems:
        print(f"FAIL {line}")
        for p in problems[:40]:
            print(f"       - {p}")
        if len(problems) > 40:
            print(f"       ... and {len(problems) - 40} more")
    else:
        print(f"ok   {line}")


def pod_templates(objs):
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o, o["spec"]["template"]
        elif o["kind"] == "CronJob":
            yield o, o["spec"]["jobTemplate"]["spec"]["template"]


def one(objs, kind, name):
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return found[0] if len(found) == 1 else None


def merge(base, over):
    """Helm's coalescing of values: maps merge, null removes, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out[k] = None
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = merge(base[k], v)
        else:
            out[k] = v
    return out


def static(name, rendered_file, chart_values, values_file=None):
    import yaml

    objs = items(rendered_file)
    values = yaml.safe_load(open(chart_values))
    if values_file:
        values = merge(values, yaml.safe_load(open(values_file)) or {})
    ok = True

    def check(line, problems):
        nonlocal ok
        problems = [p for p in problems if p]
        ok = ok and not problems
        report(f"[{name}] {line}", problems)

    # namespaces
    ns_want = (values.get("namespace") or {}).get("name") or "default"
    check(f"every namespaced object in {ns_want}",
          [f"{o['kind']}/{o['metadata']['name']} in {o['metadata'].get('namespace')}" for o in objs
           if o["kind"] not in ("Namespace", "CustomResourceDefinition", "ValidatingAdmissionPolicy",
                                "ValidatingAdmissionPolicyBinding") and o["metadata"].get("namespace") != ns_want])

    # pods: restricted and bounded
    probs = []
    for o, tpl in pod_templates(objs):
        spec = tpl["spec"]
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            probs.append(f"{o['metadata']['name']}: pod securityContext")
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            if (sc.get("allowPrivilegeEscalation") is not False or sc.get("readOnlyRootFilesystem") is not True
                    or sc.get("capabilities", {}).get("drop") != ["ALL"] or "runAsUser" in sc):
                probs.append(f"{o['metadata']['name']}/{c['name']}: container securityContext")
            r = c.get("resources", {})
            if not r.get("requests") or not r.get("limits"):
                probs.append(f"{o['metadata']['name']}/{c['name']}: requests and limits")
    n = sum(1 for _ in pod_templates(objs))
    check(f"{n} pod templates: restricted securityContexts, requests and limits", probs)

    # settings
    cm = one(objs, "ConfigMap", "flowgate-config")
    data = (cm or {}).get("data", {})
    img = values.get("images", {})

    def ref(i):
        return f"{i['repository']}@{i['digest']}" if i.get("digest") else f"{i['repository']}:{i['tag']}"

    want = {"FLOWGATE_HOST": values["host"], "FLOWGATE_ROUTE_KIND": values["instances"]["routeKind"],
            "FLOWGATE_MLFLOW_IMAGE": ref(img["mlflow"]), "FLOWGATE_ADAPTER_IMAGE": ref(img["adapter"]),
            "FLOWGATE_DEFAULT_TTL": values["ttl"]["default"]}
    if values["ttl"].get("max"):
        want["FLOWGATE_MAX_TTL"] = values["ttl"]["max"]
    for k, env in (("perOwner", "FLOWGATE_QUOTA_PER_OWNER"), ("total", "FLOWGATE_QUOTA_TOTAL")):
        if values["quotas"].get(k) is not None:
            want[env] = str(values["quotas"][k])
    for k, env in (("mlflowCpu", "FLOWGATE_MLFLOW_CPU"), ("mlflowMemory", "FLOWGATE_MLFLOW_MEMORY"),
                   ("adapterCpu", "FLOWGATE_ADAPTER_CPU"), ("adapterMemory", "FLOWGATE_ADAPTER_MEMORY"),
                   ("storeSize", "FLOWGATE_STORE_SIZE")):
        if values["instances"].get(k):
            want[env] = values["instances"][k]
    if values["ingress"].get("className"):
        want["FLOWGATE_INGRESS_CLASS"] = values["ingress"]["className"]
    if values["instances"].get("gateway"):
        want["FLOWGATE_GATEWAY"] = values["instances"]["gateway"]
    # an HTTPRoute's TLS is its Gateway's: flowgate refuses a Secret with routeKind gateway
    want["FLOWGATE_TLS_SECRET"] = (values["ingress"].get("tlsSecret") or None
                                   if values["instances"]["routeKind"] != "gateway" else None)
    creds = values.get("fetchCredentials") or {}
    if creds.get("allow"):
        want["FLOWGATE_ALLOW_CREDENTIALS"] = ",".join(creds["allow"])
    if creds.get("default"):
        want["FLOWGATE_DEFAULT_CREDENTIALS"] = creds["default"]
    for k, v in (values.get("extraConfig") or {}).items():
        want[k] = str(v)
    operator_cm = one(objs, "ConfigMap", "flowgate-operator-config")
    if operator_cm is not None:
        odata = operator_cm.get("data", {})
        check("flowgate-operator-config: the same route kind, Gateway, TLS Secret, credentials grants and default as the API",
              [f"{k}={odata.get(k)!r}, want {want.get(k)!r}" for k in
               ("FLOWGATE_ROUTE_KIND", "FLOWGATE_GATEWAY", "FLOWGATE_TLS_SECRET",
                "FLOWGATE_ALLOW_CREDENTIALS", "FLOWGATE_DEFAULT_CREDENTIALS") if odata.get(k) != want.get(k)])
    check("flowgate-config: host, route kind, images, TTLs, quotas, instance resources as in the values",
          [f"{k}={data.get(k)!r}, want {v!r}" for k, v in want.items() if data.get(k) != v] if cm else ["no flowgate-config"])

    # the provisioner's image and resources
    probs = []
    for o, tpl in pod_templates(objs):
        for c in tpl["spec"]["containers"]:
            if c["image"] != ref(img["provisioner"]):
                probs.append(f"{o['metadata']['name']}: image {c['image']}")
    api = one(objs, "Deployment", "flowgate-api")
    if api is None:
        probs.append("no flowgate-api Deployment")
    else:
        c = api["spec"]["template"]["spec"]["containers"][0]
        if json.dumps(c["resources"], sort_keys=True) != json.dumps(values["api"]["resources"], sort_keys=True):
            probs.append(f"API resources {c['resources']}")
        if api["spec"]["replicas"] != values["api"]["replicas"]:
            probs.append(f"API replicas {api['spec']['replicas']}")
        vol = [v for v in api["spec"]["template"]["spec"]["volumes"] if v["name"] == "tokens"][0]
        if vol["secret"]["secretName"] != values["tokens"]["secretName"]:
            probs.append(f"tokens from {vol['secret']['secretName']}")
        if values["api"].get("backend") and values["api"]["backend"] not in c["args"]:
            probs.append(f"API args {c['args']}")
        if "checksum/config" not in api["spec"]["template"]["metadata"].get("annotations", {}):
            probs.append("no checksum/config on the API pods (a settings change would not roll them)")
    check("provisioner image everywhere; API replicas, resources, tokens Secret, backend as in the values", probs)

    # the activator of sleeping instances: kubernetes backend only (flowgate refuses
    # --activator-listen with the operator backend)
    activator = bool((values["api"].get("activator") or {}).get("enabled")) and values["api"].get("backend") != "operator"
    probs = []
    if api is not None:
        c = api["spec"]["template"]["spec"]["containers"][0]
        args = c["args"]
        listen = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--activator-listen"]
        if listen != (["0.0.0.0:8081"] if activator else []):
            probs.append(f"--activator-listen {listen}, want {'0.0.0.0:8081' if activator else 'none'}")
        ports = [p for p in c.get("ports", []) if p.get("name") == "activator"]
        want_ports = [{"name": "activator", "containerPort": 8081, "protocol": "TCP"}] if activator else []
        if ports != want_ports:
            probs.append(f"container port activator {ports}, want {want_ports}")
    check("API activator " + ("on 0.0.0.0:8081, container port `activator` 8081" if activator
                              else "off (no --activator-listen, no `activator` port)"), probs)

    # tokens Secret
    sec = one(objs, "Secret", values["tokens"]["secretName"])
    if values["tokens"].get("create"):
        lines = sec and sec.get("stringData", {}).get(values["tokens"]["key"], "").split("\n")
        want_lines = [f"{e['token']} {e['owner']}" for e in values["tokens"]["entries"]]
        check("tokens Secret from the values, one `TOKEN OWNER` line each",
              [] if sec and [x for x in lines if x] == want_lines else [f"got {sec and sec.get('stringData')}"])
    else:
        check("no tokens Secret rendered (the admin makes it)", [f"Secret {values['tokens']['secretName']}"] if sec else [])

    # how the API is exposed
    expose = values["api"]["expose"]
    kinds = {"ingress": "Ingress", "route": "Route", "gateway": "HTTPRoute"}
    present = {o["kind"] for o in objs if o["metadata"]["name"] == "flowgate-api"} & set(kinds.values())
    probs = [] if present == ({kinds[expose]} if expose in kinds else set()) else [f"API exposed by {sorted(present)}"]
    host = values["host"]
    if expose == "ingress":
        ing = one(objs, "Ingress", "flowgate-api")
        rule = ing["spec"]["rules"][0]
        path = rule["http"]["paths"][0]
        if rule["host"] != host or path["path"] != "/api" or path["backend"]["service"]["name"] != "flowgate-api":
            probs.append(f"Ingress rule {rule}")
        if ing["spec"].get("ingressClassName") != (values["ingress"].get("className") or None):
            probs.append(f"ingressClassName {ing['spec'].get('ingressClassName')}")
        if values["ingress"].get("tlsSecret") and ing["spec"]["tls"] != [{"hosts": [host], "secretName": values["ingress"]["tlsSecret"]}]:
            probs.append(f"tls {ing['spec'].get('tls')}")
    elif expose == "route":
        rt = one(objs, "Route", "flowgate-api")
        if rt["spec"]["host"] != host or rt["spec"]["path"] != "/api" or rt["spec"]["to"]["name"] != "flowgate-api":
            probs.append(f"Route {rt['spec']}")
    elif expose == "gateway":
        hr = one(objs, "HTTPRoute", "flowgate-api")
        spec = hr["spec"]
        if spec["parentRefs"] != values["api"]["gateway"]["parentRefs"] or spec["hostnames"] != [host]:
            probs.append(f"HTTPRoute parents/hostnames {spec['parentRefs']} {spec['hostnames']}")
        r = spec["rules"][0]
        if r["matches"] != [{"path": {"type": "PathPrefix", "value": "/api"}}] or r["backendRefs"] != [{"name": "flowgate-api", "port": 80}]:
            probs.append(f"HTTPRoute rule {r}")
    check(f"API exposed as {expose!r} on {host}/api", probs)

    # NetworkPolicies: one per non-null entry, spec as given
    want_np = {k: v for k, v in (values.get("networkPolicies") or {}).items() if v}
    operator = values.get("operator") or {}
    if operator.get("enabled") and operator.get("networkPolicy"):
        want_np["flowgate-operator"] = {"spec": operator["networkPolicy"]}
        if (operator.get("activator") or {}).get("enabled"):
            # its two ends of the operator's reads of the instances' metrics
            op_pods = {"app.kubernetes.io/name": "flowgate", "app.kubernetes.io/component": "operator"}
            port = [{"protocol": "TCP", "port": 8080}]
            want_np["flowgate-instances-from-operator"] = {"spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": op_pods}}], "ports": port}]}}
            want_np["flowgate-operator-to-instances"] = {"spec": {
                "podSelector": {"matchLabels": op_pods},
                "policyTypes": ["Egress"],
                "egress": [{"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}], "ports": port}]}}
    got_np = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    probs = [f"NetworkPolicies {sorted(got_np)}, want {sorted(want_np)}"] if set(got_np) != set(want_np) else []
    for k, v in want_np.items():
        if k in got_np and got_np[k]["spec"] != v["spec"]:
            probs.append(f"{k}: spec {json.dumps(got_np[k]['spec'])[:200]}")
    check(f"{len(want_np)} NetworkPolicies as in the values", probs)

    # operator
    op = values.get("operator", {})
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    want_op = {("Deployment", "flowgate-operator"), ("ServiceAccount", "flowgate-operator"), ("Role", "flowgate-operator"),
               ("RoleBinding", "flowgate-operator"), ("Role", "flowgate-mlflowinstances"),
               ("RoleBinding", "flowgate-mlflowinstances"), ("ConfigMap", "flowgate-operator-config")}
    if op.get("enabled"):
        probs = [f"missing {k}/{n}" for k, n in sorted(want_op - names)]
        crd = ("CustomResourceDefinition", "mlflowinstances.flowgate.io") in names
        if crd != bool(op.get("installCRD", True)):
            probs.append(f"CRD rendered: {crd}")
        check("operator: Deployment, RBAC, settings" + (", CRD" if op.get("installCRD", True) else ""), probs)
        # the activator of sleeping instances, on every replica
        on = bool((op.get("activator") or {}).get("enabled"))
        d = one(objs, "Deployment", "flowgate-operator")
        c = d["spec"]["template"]["spec"]["containers"][0] if d else {"args": [], "ports": []}
        args = c["args"]
        listen = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--activator-listen"]
        ports = [p for p in c.get("ports", []) if p.get("name") == "activator"]
        probs = []
        if listen != (["0.0.0.0:8082"] if on else []):
            probs.append(f"--activator-listen {listen}")
        if ports != ([{"name": "activator", "containerPort": 8082, "protocol": "TCP"}] if on else []):
            probs.append(f"container port activator {ports}")
        if on and "--access-keys" not in args:
            probs.append("no --access-keys: visitors of `link` instances could not wake them")
        check("operator activator " + ("on 0.0.0.0:8082 with the access keys" if on else "off"), probs)
    else:
        check("no operator objects", [f"{k}/{n}" for k, n in sorted(want_op & names)])
    return ok


def main():
    cmd = sys.argv[1]
    if cmd == "compare":
        ok = compare(*sys.argv[2:5])
    elif cmd == "static":
        ok = static(*sys.argv[2:6])
    else:
        sys.exit(f"unknown command {cmd}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
