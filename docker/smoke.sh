#!/usr/bin/env bash
# Smoke test of the lossd image: build it offline, run it, ask it from the host.
#
#   docker/smoke.sh            (from anywhere; root, or a user who may use Docker)
#
# 1. A Docker engine: the running one, else dockerd started here with the host's network
#    left alone (no bridge, no iptables), after `apt-get install docker.io` when missing.
# 2. A base image: $LOSSD_BASE_IMAGE, else python:3.11-slim when it is already present,
#    else a local Debian bookworm built with debootstrap and `docker import`ed (no registry
#    is needed; kept as lossd-smoke-base:bookworm for the next run).
# 3. A wheelhouse (docker/wheelhouse) prepared on the host for the base's Python and
#    platform, so that `docker build` installs everything with no network.
# 4. The image, run with --network host on free ports; from the host: the gRPC health
#    service, one Compute through lossd.client compared with the in-process loss, the
#    Prometheus metrics, the image's own HEALTHCHECK as Docker reports it, and a restart
#    that must bring the session back from the state volume.
# Everything started here is stopped and removed on exit (the container and its volume,
# the image and its build steps, the wheels, dockerd), except the debootstrapped base
# image (LOSSD_SMOKE_KEEP_BASE=0 drops it too). Prints the time of each step.
#
# Environment: LOSSD_BASE_IMAGE, PYTHON (a Python with lossd installed; default .venv's),
# LOSSD_SMOKE_TORCH (default torch==2.13.0), LOSSD_SMOKE_KEEP_IMAGE=1 keeps the image,
# LOSSD_SMOKE_KEEP_BASE, LOSSD_SMOKE_TORCH_INDEX (where torch comes from when pip finds no
# local wheel; default the CPU index), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

TORCH_SPEC="${LOSSD_SMOKE_TORCH:-torch==2.13.0}"
LOCAL_BASE="lossd-smoke-base:bookworm"
IMAGE="lossd:smoke-$$"
CONTAINER="lossd-smoke-$$"
WHEELHOUSE="$ROOT/docker/wheelhouse"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

T0=$SECONDS
LAST=$SECONDS
declare -a TIMINGS=()
say() { echo "smoke: $*" >&2; }
lap() {  # record how long the step since the previous lap took
    TIMINGS+=("$(printf '%-28s %4ds' "$1" $((SECONDS - LAST)))")
    LAST=$SECONDS
}

# -- cleanup: only what this run started ------------------------------------------------------
STARTED_DOCKERD=""
BUILT_IMAGE=""
WORK="$(mktemp -d /tmp/lossd-smoke.XXXXXX)"
cleanup() {
    local status=$?
    set +e
    if docker container inspect "$CONTAINER" >/dev/null 2>&1; then
        if [[ $status -ne 0 ]]; then
            say "container log:"
            docker logs --tail 50 "$CONTAINER" >&2
        fi
        docker rm -f --volumes "$CONTAINER" >/dev/null  # and its anonymous state volume
    fi
    if [[ -n "$BUILT_IMAGE" && "${LOSSD_SMOKE_KEEP_IMAGE:-0}" != 1 ]]; then
        docker rmi "$IMAGE" >/dev/null 2>&1
        # The classic builder leaves each step's image behind (the build stage's too):
        # remove those of this build, newest first, that nothing tags or builds upon.
        grep -oE -- '---> [0-9a-f]{12}$' "$WORK/build.log" 2>/dev/null | cut -c6- | tac |
            while read -r id; do
                tags="$(docker image inspect --format '{{len .RepoTags}}' "$id" 2>/dev/null)"
                [[ "$tags" != 0 ]] || docker rmi "$id" >/dev/null 2>&1
            done
    fi
    if [[ "${LOSSD_SMOKE_KEEP_BASE:-1}" == 0 ]]; then
        docker rmi "$LOCAL_BASE" >/dev/null 2>&1
    fi
    find "$WHEELHOUSE" -maxdepth 1 \( -name '*.whl' -o -name '*.tar.gz' \) -delete
    if [[ -n "$STARTED_DOCKERD" ]]; then
        say "stopping the dockerd started here (pid $STARTED_DOCKERD)"
        kill "$STARTED_DOCKERD"
        for _ in $(seq 50); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -rf "$WORK"
    if [[ $status -eq 0 ]]; then say "PASSED in $((SECONDS - T0)) s"; else say "FAILED ($status)"; fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # through cleanup

need_root_for() {
    if [[ $EUID -ne 0 ]]; then say "$1 needs root (or run with what it needs in place)"; exit 1; fi
}

# -- 1. the Docker engine ---------------------------------------------------------------------
if ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null; then
    need_root_for "installing docker.io"
    say "installing docker.io from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    need_root_for "starting dockerd"
    say "starting dockerd (no bridge, no iptables: the host's network stays as it is)"
    # setsid: not in this terminal's process group, so that a Ctrl-C stops the script,
    # whose cleanup then removes the container before it stops the engine.
    setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
        >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 150); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
    docker info >/dev/null 2>&1 || { cat "$WORK/dockerd.log" >&2; exit 1; }
fi
lap "docker engine"

# -- 2. the base image ------------------------------------------------------------------------
BASE="${LOSSD_BASE_IMAGE:-}"
if [[ -z "$BASE" ]]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1; then
        BASE=python:3.11-slim
    else
        BASE="$LOCAL_BASE"
        if ! docker image inspect "$BASE" >/dev/null 2>&1; then
            need_root_for "debootstrap"
            command -v debootstrap >/dev/null || {
                say "installing debootstrap from Debian"
                apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
            }
            say "building $BASE with debootstrap (no registry needed)"
            rootfs="$WORK/rootfs"
            debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
                "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
                || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
            tar -C "$rootfs" -c . | docker import \
                --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
                --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
            rm -rf "$rootfs"
        fi
    fi
fi
say "base image: $BASE"
lap "base image"

# -- 3. the wheelhouse, for the base's Python and platform ------------------------------------
read -r PY_VERSION PY_ABI GLIBC_MINOR ARCH <<<"$(docker run --rm --network none "$BASE" python3 -c '
import os, platform, sys
glibc = os.confstr("CS_GNU_LIBC_VERSION").split()[-1].split(".")[1]
v = sys.version_info
print(f"{v[0]}.{v[1]} cp{v[0]}{v[1]} {glibc} {platform.machine()}")')"
[[ -n "$ARCH" ]] || { say "cannot read Python and glibc versions of $BASE"; exit 1; }
wheel_tags=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$PY_ABI")
for minor in $(seq 17 "$GLIBC_MINOR"); do wheel_tags+=(--platform "manylinux_2_${minor}_${ARCH}"); done
wheel_tags+=(--platform "manylinux2014_${ARCH}" --platform "linux_${ARCH}")
pip_download() { "$PYTHON" -m pip download -qq --disable-pip-version-check --dest "$WHEELHOUSE" \
    "${wheel_tags[@]}" "$@"; }
say "downloading wheels for Python $PY_VERSION ($ARCH, glibc 2.$GLIBC_MINOR) into docker/wheelhouse"
# torch on its own first: a CPU build from pip's configured find-links when one is there,
# else from the CPU index (PyPI's default torch is the multi-GB CUDA build).
pip_download --no-deps --no-index "$TORCH_SPEC" 2>/dev/null \
    || pip_download --no-deps --index-url "${LOSSD_SMOKE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "$TORCH_SPEC"
"$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    >"$WORK/requirements.txt"
pip_download --find-links "$WHEELHOUSE" "$TORCH_SPEC" "setuptools>=77" -r "$WORK/requirements.txt"
say "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
lap "wheelhouse"

# -- 4. build, run, ask -----------------------------------------------------------------------
say "building $IMAGE (offline, from the wheelhouse)"
BUILT_IMAGE=1
docker build -f docker/Dockerfile -t "$IMAGE" --network none --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_VERSION="${TORCH_SPEC#torch==}" . >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; exit 1; }
say "image size: $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MiB", $1/1048576}')"
lap "docker build"

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PORT="$(free_port)"
METRICS_PORT="$(free_port)"
# The image's default command, on free ports (the host's network is shared); a flag
# that this lossd does not know yet is left out.
serve_help="$(docker run --rm --network none --entrypoint lossd "$IMAGE" serve --help)"
serve_args=(--host 127.0.0.1 --port "$PORT")
[[ "$serve_help" != *--state-dir* ]] || serve_args+=(--state-dir /var/lib/lossd)
[[ "$serve_help" != *--metrics-port* ]] || serve_args+=(--metrics-port "$METRICS_PORT")
say "running $CONTAINER on 127.0.0.1:$PORT: lossd serve ${serve_args[*]}"
docker run --detach --name "$CONTAINER" --network host -e LOSSD_PORT="$PORT" \
    --health-interval 2s --health-start-period 60s "$IMAGE" "${serve_args[@]}" >/dev/null

for _ in $(seq 120); do
    "$PYTHON" docker/healthcheck.py "127.0.0.1:$PORT" >/dev/null 2>&1 && break
    [[ "$(docker inspect --format '{{.State.Running}}' "$CONTAINER")" == true ]] || break
    sleep 0.5
done
if ! health="$("$PYTHON" docker/healthcheck.py "127.0.0.1:$PORT")"; then
    say "lossd in $CONTAINER did not become SERVING"; exit 1
fi
say "health from the host: $health"
lap "start until SERVING"

# A stateful session (a MoCo-style memory bank): one step compared with the in-process
# loss; its state is kept on the host for the restart below.
"$PYTHON" - "127.0.0.1:$PORT" "$WORK/state.pt" <<'EOF'
import sys

import torch

from lossd.client import LossClient
from lossd.losses import NTXentLoss

config = {"temperature": 0.2, "memory_bank_size": (128, 64)}
with LossClient(sys.argv[1], timeout=60) as client:
    remote = client.loss("NTXentLoss", session_id="smoke", seed=0, **config)
    local = NTXentLoss(**config)
    local.load_state_dict(remote.state_dict())
    g = torch.Generator().manual_seed(0)
    out0 = torch.randn(32, 64, generator=g, requires_grad=True)
    out1 = torch.randn(32, 64, generator=g)
    loss = remote(out0, out1)
    loss.backward()
    local0 = out0.detach().clone().requires_grad_()
    expected = local(local0, out1)
    expected.backward()
    assert torch.equal(loss.detach(), expected.detach()), (loss, expected)
    assert torch.equal(out0.grad, local0.grad)
    torch.save(remote.state_dict(), sys.argv[2])
    print(f"smoke: Compute NTXentLoss through the container: {loss.item():.6f} "
          f"(= in-process), server device {client.get_session('smoke').device}",
          file=sys.stderr)
EOF
lap "one Compute"

if [[ "${serve_args[*]}" == *--metrics-port* ]]; then
    metric="$("$PYTHON" -c '
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(next(line for line in text.splitlines() if line.startswith("lossd_sessions ")))
' "$METRICS_PORT")"
    say "Prometheus metrics from the host: $metric"
fi

for _ in $(seq 60); do
    health="$(docker inspect --format '{{.State.Health.Status}}' "$CONTAINER")"
    [[ "$health" == starting ]] || break
    sleep 0.5
done
say "Docker HEALTHCHECK: $health; user in the container: $(docker exec "$CONTAINER" id -un)"
[[ "$health" == healthy ]]
lap "HEALTHCHECK healthy"

# With --state-dir: SIGTERM writes the state into the volume (as the non-root user), and
# the restarted container restores it.
if [[ "${serve_args[*]}" == *--state-dir* ]]; then
    docker restart --time 90 "$CONTAINER" >/dev/null
    for _ in $(seq 120); do
        "$PYTHON" docker/healthcheck.py "127.0.0.1:$PORT" >/dev/null 2>&1 && break
        sleep 0.5
    done
    "$PYTHON" - "127.0.0.1:$PORT" "$WORK/state.pt" <<'EOF'
import sys

import torch

from lossd.client import LossClient

with LossClient(sys.argv[1], timeout=60) as client:
    session = client.get_session("smoke")
    state = client.get_state("smoke")
    saved = torch.load(sys.argv[2], weights_only=True)
    assert session.steps == 1, session
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    print(f"smoke: after a restart the session is back: {session.steps} step, "
          f"{session.state_bytes} bytes of state", file=sys.stderr)
EOF
    lap "restart keeps the state"
fi

say "timings:"
printf '  %s\n' "${TIMINGS[@]}" >&2
