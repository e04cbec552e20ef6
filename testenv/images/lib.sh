# testenv/images/lib.sh: sourced by testenv/images/build and testenv/images/test.
# How containers run on this kind of machine (measured; see README.md):
#   - the process lacks CAP_SYS_RESOURCE: an OCI runtime that RAISES RLIMIT_NOFILE or
#     RLIMIT_NPROC fails ("setrlimit ... operation not permitted"), and podman/buildah
#     raise both by default. So every run and every RUN step gets explicit limits
#     no higher than this process's own (lowering is allowed);
#   - cgroups v1 (hybrid): crun refuses, runc with the cgroupfs driver works.

# shellcheck shell=bash
images_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# FLOWGATE_IMAGES_CACHE: a folder outside the checkout keeps image builds (and the
# release cargo target they use) across clones of the same machine.
images_cache=${FLOWGATE_IMAGES_CACHE:-${FLOWGATE_CACHE:-$images_root/.cache}/images}

# min(WANT, this process's hard limit) for `ulimit -H FLAG`
_flowgate_limit() {
  local want=$1 hard
  hard=$(ulimit -H "$2")
  if [[ $hard != unlimited ]] && ((hard < want)); then echo "$hard"; else echo "$want"; fi
}
nofile=$(_flowgate_limit 1024 -n)
nproc=$(_flowgate_limit 32768 -u)
ulimit_flags=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
# podman run ...
podman_run=(podman --runtime runc --cgroup-manager cgroupfs run --pull=never "${ulimit_flags[@]}")
# buildah bud ... (RUN steps in runc, OCI isolation, like `docker build`; no layer
# cache: intermediate images would cost GBs of disk, the content tag and the cargo
# and pip caches do the caching)
buildah_bud=(buildah bud --isolation oci --runtime runc --pull=never --layers=false "${ulimit_flags[@]}")

# Debian packages this needs; installed when missing (the machine has apt access).
images_debs=(buildah podman runc containernetworking-plugins debootstrap skopeo uidmap fuse-overlayfs curl ca-certificates)

images_install_debs() {
  local missing=() p
  for p in "${images_debs[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  echo "images: apt-get install ${missing[*]}" >&2
  local sudo_cmd=()
  [[ $(id -u) == 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
