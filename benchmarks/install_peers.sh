#!/usr/bin/env bash
# Install the peer libraries of metabench's speed benchmarks into a virtual environment.
#
#   bash benchmarks/install_peers.sh VENV
#
# VENV must already hold torch and torchvision (and metabench, e.g. `pip install -e .`).
# Installs higher 0.2.1, TorchOpt 0.7.3 and psutil from the registry, and learn2learn 0.2.0
# from its sdist with the Cython sources regenerated first: its shipped .c files predate
# Python 3.11 (`longintrepr.h: No such file or directory`). learn2learn's dependencies pull
# qpth, which pins numpy<2; torch and torchvision are held at the versions found (a pip
# constraints file), and checked again at the end. Use a separate environment: numpy is
# downgraded there.
set -euo pipefail

if [ $# -ne 1 ] || [ ! -x "$1/bin/python" ]; then
    echo "usage: $0 VENV   (VENV/bin/python must exist)" >&2
    exit 2
fi
PY="$(cd "$1" && pwd)/bin/python"
L2L_VERSION=0.2.0

versions() {
    "$PY" - <<'PYEOF'
import torch, torchvision
print(f"torch=={torch.__version__.split('+')[0]} torchvision=={torchvision.__version__.split('+')[0]}")
PYEOF
}

before="$(versions)"
echo "before: $before"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tr ' ' '\n' <<<"$before" >"$work/constraints.txt"

"$PY" -m pip install -c "$work/constraints.txt" "higher==0.2.1" "torchopt==0.7.3" "psutil" "cython>=3" "setuptools" "wheel"

# learn2learn: regenerate the Cython sources, then build against the installed torch.
"$PY" -m pip download --no-deps --no-binary :all: "learn2learn==$L2L_VERSION" -d "$work"
tar -xzf "$work/learn2learn-$L2L_VERSION.tar.gz" -C "$work"
(
    cd "$work/learn2learn-$L2L_VERSION"
    "$PY" -m cython -3 learn2learn/data/*.pyx
    "$PY" -m pip install -c "$work/constraints.txt" --no-build-isolation .
)

after="$(versions)"
echo "after:  $after"
if [ "$before" != "$after" ]; then
    echo "ERROR: installing the peers changed torch/torchvision ($before -> $after)" >&2
    exit 1
fi
"$PY" - <<'PYEOF'
import importlib.metadata as md
import higher, learn2learn, torchopt  # noqa: F401  (import check)
for name in ("higher", "torchopt", "learn2learn", "numpy", "torch", "torchvision"):
    print(f"{name} {md.version(name)}")
PYEOF
