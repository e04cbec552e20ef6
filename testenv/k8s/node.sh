# shellcheck shell=bash
# The real node of `k8s-up --node DIR`, sourced by k8s-up (node_up) and
# k8s-down (node_down). One real node per machine: its bridge and address
# ranges are fixed.
#
#   containerd (Debian's) + runc, cgroupfs driver, its state in DIR/containerd;
#     sandbox image flowgate.test/pause:1 made here from bin/pause (no registry)
#   CNI (Debian's plugins): bridge fgbr0, pods in 198.18.0.0/16 (gateway
#     198.18.0.1 = the host), routes only to 198.18.0.0/15: nothing leaves;
#     services in 198.19.0.0/16 (the API server's --service-cluster-ip-range)
#   kubelet + kube-proxy (iptables mode) from the control plane's module,
#     node name flowgate-node, node IP 198.18.0.1
#   traefik on the host, 127.0.0.1:PORT: kubernetesIngress (IngressClass
#     `traefik`) and kubernetesGateway (Gateway API CRDs from the module traefik
#     requires; GatewayClass `traefik`, Gateway default/flowgate)
#   a file server for tests: DIR/artifacts at http://198.18.0.1:PORT/
#
# Everything it changes outside DIR is recorded in DIR/node/ and undone by
# node_down: the bridge and its route, iptables rules (tagged with a comment
# naming DIR; kube-proxy's chains), network namespaces, mounts, cgroups, and
# the sysctls the kubelet and CNI set (ip_forward, kernel panic flags).

NODE_NAME=flowgate-node
NODE_BRIDGE=fgbr0
NODE_IP=198.18.0.1
POD_CIDR=198.18.0.0/16
NODE_SERVICE_CIDR=198.19.0.0/16
TEST_RANGE=198.18.0.0/15
NODE_CGROUP=flowgate-node
PAUSE_IMAGE=flowgate.test/pause:1
HELLO_IMAGE=flowgate.test/hello:1
# Sysctls changed by the bridge plugin (ip_forward) and the kubelet
# (setupKernelTunables, with protectKernelDefaults off): restored by node_down.
NODE_SYSCTLS="net/ipv4/ip_forward kernel/panic kernel/panic_on_oops vm/overcommit_memory vm/panic_on_oom kernel/keys/root_maxkeys kernel/keys/root_maxbytes"

node_preflight() { # fail unless the node's tools are here and no other node runs
  local t missing=()
  for t in containerd containerd-shim-runc-v2 ctr runc iptables iptables-save ip conntrack python3; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  for t in bridge host-local loopback portmap; do
    [ -x "/usr/lib/cni/$t" ] || missing+=("/usr/lib/cni/$t")
  done
  [ ${#missing[@]} = 0 ] || fail "--node needs ${missing[*]} (testenv/deps --node installs Debian's containerd, runc, containernetworking-plugins, conntrack)"
  if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    fail "bridge $NODE_BRIDGE exists: another k8s-up --node runs (k8s-down its DIR) or one was not cleaned up"
  fi
  [ -d "/sys/fs/cgroup/memory" ] || fail "--node needs cgroup v1 (hybrid) with the memory controller, or v2 (not handled yet)"
}

node_iptables_tag() { echo "flowgate-node:$DIR"; }

node_network_up() {
  local n="$DIR/node" s
  mkdir -p "$n"
  : > "$n/sysctl.before"
  for s in $NODE_SYSCTLS; do echo "$s $(cat "/proc/sys/$s")" >> "$n/sysctl.before"; done
  ip netns list 2>/dev/null | awk '{ print $1 }' | sort > "$n/netns.before"
  iptables-save 2>/dev/null | sed -n 's/^:\([^ ]*\) .*/\1/p' | sort -u > "$n/chains.before"
  echo "$NODE_BRIDGE" > "$n/bridge"
  ip link add "$NODE_BRIDGE" type bridge || fail "ip link add $NODE_BRIDGE type bridge"
  ip addr add "$NODE_IP/16" dev "$NODE_BRIDGE" || fail "ip addr add $NODE_IP/16"
  ip link set "$NODE_BRIDGE" up || fail "ip link set $NODE_BRIDGE up"
  # Service addresses are never routed out of eth0, even without a rule.
  ip route add "$NODE_SERVICE_CIDR" dev "$NODE_BRIDGE" || fail "ip route add $NODE_SERVICE_CIDR"
  # Pod to Service to pod goes through the host: forwarding on, but only
  # between the pods (the pods have no default route; this drops the rest).
  echo 1 > /proc/sys/net/ipv4/ip_forward || fail "cannot enable net.ipv4.ip_forward"
  local tag; tag="$(node_iptables_tag)"
  iptables -I FORWARD 1 -s "$TEST_RANGE" ! -d "$TEST_RANGE" -m comment --comment "$tag" -j DROP \
    && iptables -I FORWARD 1 -i "$NODE_BRIDGE" -o "$NODE_BRIDGE" -m comment --comment "$tag" -j ACCEPT \
    || fail "iptables FORWARD rules"
  mkdir -p "$DIR/cni/net.d" "$DIR/cni/ipam"
  cat > "$DIR/cni/net.d/10-flowgate.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "flowgate",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "isDefaultGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "198.18.1.1", "rangeEnd": "198.18.255.254", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$TEST_RANGE"}],
        "dataDir": "$DIR/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

node_containerd_up() {
  local c="$DIR/containerd"
  mkdir -p "$c/root" "$c/state" "$c/opt"
  CONTAINERD_SOCK="$c/containerd.sock"
  cat > "$c/config.toml" <<EOF
version = 2
root = "$c/root"
state = "$c/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$c/containerd.sock.ttrpc"
[debug]
  address = "$c/debug.sock"
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$c/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  # No CAP_SYS_RESOURCE: never ask runc for an oom_score_adj below ours.
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  tolerate_missing_hugetlb_controller = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
    max_conf_num = 1
EOF
  start containerd containerd --config "$c/config.toml"
  wait_for "containerd" ctr --address "$CONTAINERD_SOCK" version
  CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)
  mkdir -p "$DIR/node/images"
  "$HERE/oci-image" "$DIR/node/images/pause.tar" "$PAUSE_IMAGE" /pause "$BIN/pause:/pause" \
    && "$HERE/oci-image" "$DIR/node/images/hello.tar" "$HELLO_IMAGE" /hello "$BIN/hello:/hello" \
    || fail "making the pause and hello images"
  "${CTR[@]}" images import --no-unpack=false "$DIR/node/images/pause.tar" > "$DIR/logs/images.log" 2>&1 \
    && "${CTR[@]}" images import "$DIR/node/images/hello.tar" >> "$DIR/logs/images.log" 2>&1 \
    || fail "importing the pause and hello images (see $DIR/logs/images.log)"
}

node_kubelet_up() { # kubelet_port kubelet_healthz_port proxy_healthz_port proxy_metrics_port
  local k="$DIR/kubelet"
  mkdir -p "$k/root" "$k/pki" "$k/plugins"
  local cg
  for cg in /sys/fs/cgroup/*/; do
    case "$cg" in */unified/) continue ;; esac
    [ -f "$cg/cgroup.procs" ] && mkdir -p "$cg$NODE_CGROUP"
  done
  cat > "$k/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
memorySwap: {}
protectKernelDefaults: false
oomScoreAdj: 0
address: $NODE_IP
port: $1
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $2
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
podCIDR: $POD_CIDR
clusterDomain: cluster.local
resolvConf: ""
volumePluginDir: $k/plugins
registerNode: true
serializeImagePulls: false
# The disk is shared with everything else on the machine: evict or collect
# images only when it is really full.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 200Mi
  imagefs.available: 200Mi
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 110
shutdownGracePeriod: 0s
EOF
  start kubelet "$BIN/kubelet" \
    --config="$k/config.yaml" \
    --kubeconfig="$KUBECONFIG_FILE" \
    --root-dir="$k/root" \
    --cert-dir="$k/pki" \
    --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP" \
    --v=1
  cat > "$DIR/node/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $KUBECONFIG_FILE
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:$3
metricsBindAddress: 127.0.0.1:$4
oomScoreAdj: 0
nodePortAddresses: ["$NODE_IP/32"]
# No conntrack sysctls (nf_conntrack_max, timeouts): the sandbox may not set them.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  syncPeriod: 30s
  minSyncPeriod: 0s
EOF
  start kube-proxy "$BIN/kube-proxy" --config="$DIR/node/kube-proxy.yaml" --v=1
}

node_traefik_up() { # web_port ping_port
  local gw_dir
  gw_dir="$(cd "$HERE/traefik" && GOFLAGS=-mod=readonly "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api 2>/dev/null || true)"
  if [ -z "$gw_dir" ] || [ ! -d "$gw_dir/config/crd/standard" ]; then
    gw_dir="$(cd "$HERE/traefik" && "$GO" mod download -json sigs.k8s.io/gateway-api 2>/dev/null | sed -n 's/^\s*"Dir": "\(.*\)",*$/\1/p')"
  fi
  [ -d "$gw_dir/config/crd/standard" ] || fail "no Gateway API CRDs (module sigs.k8s.io/gateway-api of $HERE/traefik/go.mod)"
  "${KUBECTL[@]}" apply --server-side -f "$gw_dir/config/crd/standard/" > "$DIR/logs/gateway-crds.log" 2>&1 \
    || fail "applying the Gateway API CRDs (see $DIR/logs/gateway-crds.log)"
  wait_for "Gateway API CRDs Established" "${KUBECTL[@]}" wait --for=condition=Established --timeout=2s \
    crd/gatewayclasses.gateway.networking.k8s.io crd/gateways.gateway.networking.k8s.io crd/httproutes.gateway.networking.k8s.io
  # Traefik maps a Gateway listener to the entry point with the same port.
  "${KUBECTL[@]}" apply -f - > /dev/null <<EOF || fail "creating the IngressClass, GatewayClass and Gateway"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: traefik
spec:
  controller: traefik.io/ingress-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: traefik
spec:
  controllerName: traefik.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: flowgate
  namespace: default
spec:
  gatewayClassName: traefik
  listeners:
  - name: web
    protocol: HTTP
    port: $1
    allowedRoutes:
      namespaces:
        from: All
EOF
  local p
  p=(endpoint="$APISERVER_URL" token="$ADMIN_TOKEN" certAuthFilePath="$PKI/ca.crt")
  start traefik "$BIN/traefik" \
    --global.checkNewVersion=false \
    --global.sendAnonymousUsage=false \
    --log.level=INFO \
    --log.noColor=true \
    --accesslog=true \
    --accesslog.filepath="$DIR/logs/traefik-access.log" \
    --entryPoints.web.address="127.0.0.1:$1" \
    --entryPoints.traefik.address="127.0.0.1:$2" \
    --ping=true \
    --ping.entryPoint=traefik \
    "${p[@]/#/--providers.kubernetesIngress.}" \
    --providers.kubernetesIngress.ingressEndpoint.ip=127.0.0.1 \
    "${p[@]/#/--providers.kubernetesGateway.}" \
    --providers.kubernetesGateway.statusAddress.ip=127.0.0.1
  wait_for "traefik /ping" curl -sf --max-time 2 "http://127.0.0.1:$2/ping"
}

node_fileserver_up() { # port
  mkdir -p "$DIR/artifacts"
  start fileserver python3 -m http.server --bind "$NODE_IP" --directory "$DIR/artifacts/" "$1"
  wait_for "file server" curl -sf --max-time 2 -o /dev/null "http://$NODE_IP:$1/"
}

# --- k8s-down ---------------------------------------------------------------
# Called by k8s-down with DIR and BIN set, before it stops DIR's processes
# (node_down_pods: the kubelet tears the pods down while it still can) and
# after (node_down: whatever is left, by force).
node_down_pods() {
  local pid name
  local kubectl=("$BIN/kubectl" --kubeconfig="$DIR/kubeconfig" --request-timeout=5s)
  [ -s "$DIR/kubeconfig" ] || return 0
  # Only with the API server and the kubelet of DIR still running.
  local up=0
  while read -r pid name; do
    case "$name" in kube-apiserver|kubelet) ours "$pid" && up=$((up + 1)) ;; esac
  done < "$DIR/pids"
  [ "$up" = 2 ] || return 0
  # No new pods: stop the controllers and the scheduler first.
  while read -r pid name; do
    case "$name" in kube-controller-manager|kube-scheduler|traefik) ;; *) continue ;; esac
    ours "$pid" && kill -TERM "$pid" 2>/dev/null
  done < "$DIR/pids"
  # The kubelet stops each pod's containers and sandbox (CNI DEL, netns
  # removed, volumes unmounted) before the API object goes.
  timeout 60 "${kubectl[@]}" delete pods --all --all-namespaces --grace-period=2 --wait=true --timeout=50s \
    >> "$DIR/logs/k8s-down.log" 2>&1 \
    || echo "k8s-down: pods not all deleted through the kubelet; cleaning up by force" >&2
}

node_down() {
  local n="$DIR/node" tag="flowgate-node:$DIR" cg f pid
  # Processes left in the node's cgroups (containers) and containerd's shims.
  for cg in /sys/fs/cgroup/*/"$NODE_CGROUP"; do
    [ -d "$cg" ] || continue
    find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | xargs -r kill -KILL 2>/dev/null
  done
  for f in /proc/[0-9]*/cmdline; do
    pid="${f#/proc/}"; pid="${pid%/cmdline}"
    tr '\0' ' ' 2>/dev/null < "$f" | grep -q "containerd-shim.*$DIR/containerd/" && kill -KILL "$pid" 2>/dev/null
  done
  sleep 0.3
  # Mounts under DIR (volumes, rootfs, shm), deepest first.
  local m
  for m in $(awk -v d="$DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "k8s-down: cannot unmount $m" >&2
  done
  # Network namespaces made since k8s-up (containerd names them cni-*).
  if [ -f "$n/netns.before" ]; then
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{ print $1 }' | grep '^cni-' | sort | comm -23 - "$n/netns.before"); do
      ip netns delete "$ns" 2>/dev/null || echo "k8s-down: cannot delete netns $ns" >&2
    done
  fi
  # iptables: kube-proxy's chains, then our own tagged rules, then any chain
  # of kube-proxy or CNI made since k8s-up.
  [ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup >> "$DIR/logs/k8s-down.log" 2>&1
  local table rule chain
  for table in filter nat mangle; do
    iptables-save -t "$table" 2>/dev/null | grep -F -- "--comment \"$tag\"" | sed 's/^-A /-D /' |
      while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null; done
    if [ -f "$n/chains.before" ]; then
      for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\|CNI-[^ ]*\) .*/\1/p' | sort -u | comm -23 - "$n/chains.before"); do
        iptables-save -t "$table" | grep -- "-j $chain\( \|$\)" | sed 's/^-A /-D /' |
          while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null; done
        iptables -t "$table" -F "$chain" 2>/dev/null
      done
      for chain in $(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\|CNI-[^ ]*\) .*/\1/p' | sort -u | comm -23 - "$n/chains.before"); do
        iptables -t "$table" -X "$chain" 2>/dev/null || echo "k8s-down: cannot delete iptables chain $table/$chain" >&2
      done
    fi
  done
  # The bridge (its address and route go with it).
  if [ -f "$n/bridge" ] && ip link show "$(cat "$n/bridge")" >/dev/null 2>&1; then
    ip link delete "$(cat "$n/bridge")" || echo "k8s-down: cannot delete bridge $(cat "$n/bridge")" >&2
  fi
  # Sysctls back to what they were.
  if [ -f "$n/sysctl.before" ]; then
    local key val
    while read -r key val; do
      [ "$(cat "/proc/sys/$key" 2>/dev/null)" = "$val" ] || echo "$val" > "/proc/sys/$key" 2>/dev/null \
        || echo "k8s-down: cannot restore $key=$val" >&2
    done < "$n/sysctl.before"
  fi
  # The node's cgroups, deepest first.
  for cg in /sys/fs/cgroup/*/"$NODE_CGROUP"; do
    [ -d "$cg" ] || continue
    find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -d "$cg" ] && echo "k8s-down: cannot remove cgroup $cg" >&2
  done
  return 0
}
