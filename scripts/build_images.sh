#!/usr/bin/env bash
# Build the pipeline's two images (docker/Dockerfile: CPU stages; docker/Dockerfile.cuda:
# GPU stages), tagged as the pipeline names them. `make images` runs this.
#
#   scripts/build_images.sh CPU_TAG GPU_TAG
#   scripts/build_images.sh --base-only     (podman: just the local base; prints its tag)
#
# Engine: $CONTAINER_ENGINE (docker or podman); by default Docker when its daemon answers,
# else podman. With podman:
#   - docker/containers.conf is used (CONTAINERS_CONF; the machine's files are untouched):
#     runc and modest ulimits, which sandboxed hosts need;
#   - images are built in the Docker format (`SHELL [... pipefail]` is dropped otherwise);
#   - both images start from a local Debian base, localhost/psearch-base:bookworm, made
#     once with debootstrap (no registry needed) and kept; $PSEARCH_BASE_IMAGE overrides it
#     (e.g. python:3.11-slim where a registry is reachable).
# pip inside the build uses the host pip's configured index, extra indexes and find-links
# (`pip config list`, PIP_* variables); local ones (file://, paths) are mounted read-only
# under podman, and skipped under Docker, which cannot mount into a build.
#
# torch in the CPU image: $PSEARCH_TORCH_SOURCE = cpu-index (PyTorch's CPU wheels; the
# build fails when that index is unreachable) or pypi (the lock's PyPI wheels, which carry
# CUDA libraries: several GB a CPU stage never loads; the image is labelled so). Unset:
# cpu-index when download.pytorch.org answers, else pypi, said loudly here.
set -euo pipefail

cd "$(dirname "$0")/.."
usage="usage: scripts/build_images.sh CPU_TAG GPU_TAG | --base-only"
base_only=false
if [[ ${1:-} == --base-only ]]; then
    base_only=true
    export CONTAINER_ENGINE=podman
else
    cpu_tag=${1:?$usage}
    gpu_tag=${2:?$usage}
fi
pip=${PIP:-.venv/bin/pip}
base_tag=localhost/psearch-base:bookworm

log() { echo "build_images: $*" >&2; }
die() { echo "error: $*" >&2; exit 2; }

engine=${CONTAINER_ENGINE:-}
if [[ -z $engine ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1 \
        && ! docker --version 2>/dev/null | grep -qi podman; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        die "neither a running Docker nor podman found (Debian: apt-get install podman runc debootstrap)"
    fi
fi
[[ $engine == docker || $engine == podman ]] || die "CONTAINER_ENGINE=$engine: expected docker or podman"

build_args=(--build-arg "PSEARCH_GIT_REV=$(git rev-parse HEAD 2>/dev/null || echo unknown)")
engine_args=()
if [[ $engine == podman ]]; then
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
    engine_args+=(--format docker)
fi

# --- the local Debian base (podman only, unless PSEARCH_BASE_IMAGE names another) -------
debian_mirror() {
    # The first Debian mirror apt is configured with (deb822 or one-line sources).
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
            /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -E '/debian/?( |$)' | head -1 \
        | sed -E 's/^URIs:[[:space:]]*//; s/^deb (\[[^]]*\] )?//; s/[[:space:]].*//')
    echo "${uri:-http://deb.debian.org/debian}"
}

make_base() {
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    local tmp mirror
    tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/psearch-base.XXXXXX")
    trap 'rm -rf "$tmp"' RETURN
    mirror=$(debian_mirror)
    log "making $base_tag with debootstrap from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$tmp/rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 \
        || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
    # The host's CA bundle, so TLS inside trusts what the host trusts (proxies included).
    if [[ -r /etc/ssl/certs/ca-certificates.crt ]]; then
        cp /etc/ssl/certs/ca-certificates.crt "$tmp/rootfs/etc/ssl/certs/ca-certificates.crt"
    fi
    rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
    tar -C "$tmp/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base_tag" >/dev/null
}

base=${PSEARCH_BASE_IMAGE:-}
if [[ -z $base && $engine == podman ]]; then
    base=$base_tag
    if podman image exists "$base"; then
        log "using $base (podman rmi it to rebuild)"
    else
        make_base
    fi
fi
if $base_only; then
    echo "$base"
    exit 0
fi
cpu_base=() gpu_base=()
if [[ -n $base ]]; then
    cpu_base=(--build-arg "BASE_IMAGE=$base")
    gpu_base=(--build-arg "BASE_IMAGE=${PSEARCH_CUDA_BASE_IMAGE:-$base}")
fi

# --- the host pip's index configuration ------------------------------------------------
# `pip config list` prints variant.key='value'; the environment (:env:) wins, then site,
# user, global, as in pip itself.
pip_setting() {
    local key=$1 variant line
    for variant in ':env:' site user global; do
        line=$("$pip" config list 2>/dev/null | grep -F "$variant.$key=" | tail -1 || true)
        if [[ -n $line ]]; then
            line=${line#*=}
            line=${line#\'}
            echo "${line%\'}"
            return
        fi
    done
}

local_path() {
    # The directory behind a file:// URL or a plain path; empty for a remote URL.
    case $1 in
        file://*) echo "${1#file://}" ;;
        /*) echo "$1" ;;
        *) ;;
    esac
}

mounts=()
keep_locations() {
    # Sets $kept to the locations a build can use: remote ones, and under podman, local
    # ones, which are mounted read-only at the same path (added to $mounts).
    local location dir list=()
    for location in $1; do
        dir=$(local_path "$location")
        if [[ -z $dir ]]; then
            list+=("$location")
        elif [[ $engine == podman && -d $dir ]]; then
            # A PEP 503 tree (DIR/simple/NAME/index.html) links its wheels as ../../files/.
            [[ $(basename "$dir") != simple ]] || dir=$(dirname "$dir")
            mounts+=(--volume "$dir:$dir:ro")
            list+=("$location")
        else
            log "skipping pip location $location (a $engine build cannot see it)"
        fi
    done
    kept="${list[*]}"
}

for setting in index-url extra-index-url find-links; do
    keep_locations "$(pip_setting "$setting")"
    if [[ -n $kept ]]; then
        variable=PIP_$(tr 'a-z-' 'A-Z_' <<<"$setting")
        build_args+=(--build-arg "$variable=$kept")
    fi
done
cert=$(pip_setting cert)
if [[ -n $cert && -r $cert && $engine == podman ]]; then
    mounts+=(--volume "$cert:/run/psearch-build-ca.crt:ro")
    build_args+=(--build-arg "PIP_CERT=/run/psearch-build-ca.crt")
fi

# --- where the CPU image's torch comes from ---------------------------------------------
torch_source=${PSEARCH_TORCH_SOURCE:-}
if [[ -z $torch_source ]]; then
    if python3 -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=10)' \
        >/dev/null 2>&1; then
        torch_source=cpu-index
    else
        torch_source=pypi
        log "WARNING: https://download.pytorch.org/whl/cpu/ is unreachable: the CPU image gets"
        log "WARNING: PyPI's torch, which bundles CUDA libraries (several GB, never loaded by"
        log "WARNING: a CPU stage; label org.psearch.torch-source=pypi). Set"
        log "WARNING: PSEARCH_TORCH_SOURCE=cpu-index to fail instead."
    fi
fi

build() {
    local dockerfile=$1 tag=$2 start
    shift 2
    start=$(date +%s)
    log "$engine build -f $dockerfile -t $tag"
    "$engine" build "${engine_args[@]}" "${mounts[@]}" "${build_args[@]}" "$@" \
        -f "$dockerfile" -t "$tag" .
    log "built $tag in $(($(date +%s) - start)) s"
}

build docker/Dockerfile "$cpu_tag" "${cpu_base[@]}" --build-arg "TORCH_SOURCE=$torch_source"
build docker/Dockerfile.cuda "$gpu_tag" "${gpu_base[@]}"
"$engine" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e "$cpu_tag" -e "$gpu_tag" >&2 || true
