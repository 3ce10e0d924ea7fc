#!/usr/bin/env bash
# One-shot installer: .venv -> the package -> llama-cpp-python built for this CPU -> the embedded models.
# Idempotent: re-running it reuses what is already there and verified.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

LLAMA_CPP_VERSION="${LOCAL_LLAMA_CPP_VERSION:-0.3.36}"
VENV="${LOCAL_VENV:-$ROOT/.venv}"
MODELS_DIR="${LOCAL_MODELS_DIR:-$ROOT/models}"
TIER="${LOCAL_TIER:-embedded}"
CACHE_DIR="${LOCAL_AI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/local-ai-server}"
EXTRAS="${LOCAL_INSTALL_EXTRAS:-}"
ASSUME_YES="${LOCAL_ASSUME_YES:-0}"
DRY_RUN="${LOCAL_DRY_RUN:-0}"
SKIP_MODELS="${LOCAL_SKIP_MODELS:-0}"
CPU_ONLY="${LOCAL_CPU_ONLY:-0}"

usage() {
  cat <<'EOF'
Usage: ./install.sh [options]

Creates .venv, installs local-ai-server with a llama-cpp-python build chosen for this CPU,
and fetches the embedded models (faster-whisper tiny.en, SmolLM2-135M-Instruct, Piper joe-medium).

Options (each also has an environment variable):
  --yes               do not ask questions                      (LOCAL_ASSUME_YES=1)
  --models-dir DIR    where models go (default ./models)         (LOCAL_MODELS_DIR)
  --tier T            model tier from registry.json (embedded)   (LOCAL_TIER)
  --extras E          extra pip extras, e.g. test                (LOCAL_INSTALL_EXTRAS)
  --cpu-only          never build the CUDA/Metal backend         (LOCAL_CPU_ONLY=1)
  --no-models         skip the model download                    (LOCAL_SKIP_MODELS=1)
  --dry-run           print what would be done, change nothing   (LOCAL_DRY_RUN=1)
  -h, --help          this help

Then start the server:  .venv/bin/local-ai-server   (ws://127.0.0.1:8765)
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --yes|-y) ASSUME_YES=1 ;;
    --models-dir) MODELS_DIR="$2"; shift ;;
    --tier) TIER="$2"; shift ;;
    --extras) EXTRAS="$2"; shift ;;
    --cpu-only) CPU_ONLY=1 ;;
    --no-models) SKIP_MODELS=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
run() { if [[ "$DRY_RUN" == 1 ]]; then printf '[dry-run] %s\n' "$*"; else "$@"; fi; }

# ---------------------------------------------------------------- python
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "python3 not found; install Python 3.10 or newer"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "Python 3.10 or newer is required (found $("$PYTHON" -V 2>&1))"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "the Python venv module is missing (Debian: apt-get install python3-venv)"

# ---------------------------------------------------------------- llama.cpp build flags for this CPU
cpu_flags() {
  if [[ -r /proc/cpuinfo ]]; then
    grep -m1 -E '^(flags|Features)' /proc/cpuinfo | cut -d: -f2
  elif command -v sysctl >/dev/null; then
    sysctl -n machdep.cpu.features machdep.cpu.leaf7_features 2>/dev/null | tr 'A-Z' 'a-z' | tr '.' '_'
  fi
}

llama_cmake_args() {
  local flags os arch args
  flags=" $(cpu_flags) "
  os="$(uname -s)"; arch="$(uname -m)"
  if [[ "$os" == Darwin && "$arch" == arm64 ]]; then
    [[ "$CPU_ONLY" == 1 ]] && echo "-DGGML_METAL=OFF" || echo "-DGGML_METAL=ON"
    return
  fi
  # Never -march=native: on CPUs with AMX it enables a kernel that crashes on the first decode
  # (llama.cpp issue 20824). Instead switch on exactly the ISA extensions this CPU reports.
  args="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
  if [[ "$arch" == x86_64 || "$arch" == amd64 ]]; then
    local f
    for f in "avx:AVX" "avx2:AVX2" "fma:FMA" "f16c:F16C" "avx512f:AVX512" "avx512vbmi:AVX512_VBMI" \
             "avx512_vnni:AVX512_VNNI" "avx512_bf16:AVX512_BF16" "avx_vnni:AVX_VNNI"; do
      if [[ "$flags" == *" ${f%%:*} "* ]]; then args+=" -DGGML_${f##*:}=ON"; else args+=" -DGGML_${f##*:}=OFF"; fi
    done
  fi
  if [[ "$CPU_ONLY" != 1 ]] && command -v nvidia-smi >/dev/null && command -v nvcc >/dev/null \
     && nvidia-smi -L >/dev/null 2>&1; then
    args+=" -DGGML_CUDA=ON"
  fi
  echo "$args"
}

CMAKE_ARGS_CHOSEN="${LOCAL_LLAMA_CMAKE_ARGS:-$(llama_cmake_args)}"
PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
# pip's own wheel cache ignores CMAKE_ARGS (it would hand back a wheel built with other flags),
# so built wheels live in our own cache, keyed by everything that changes the binary.
WHEEL_KEY="$(printf '%s|%s|%s|%s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS_CHOSEN" "$PYVER" "$(uname -sm)" \
  | sha256sum | cut -c1-16)"
WHEEL_DIR="$CACHE_DIR/wheels/llama-$WHEEL_KEY"

say "python:        $("$PYTHON" -V 2>&1)"
say "venv:          $VENV"
say "llama-cpp:     $LLAMA_CPP_VERSION with CMAKE_ARGS=\"$CMAKE_ARGS_CHOSEN\""
say "wheel cache:   $WHEEL_DIR"
say "models:        tier $TIER -> $MODELS_DIR"

# ---------------------------------------------------------------- venv + package
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
run "${PIP[@]}" install --quiet --upgrade pip wheel setuptools

SPEC="."
[[ -n "$EXTRAS" ]] && SPEC=".[$EXTRAS]"
say "installing local-ai-server ($SPEC)"
run "${PIP[@]}" install --quiet -e "$SPEC"

# ---------------------------------------------------------------- llama-cpp-python
installed_llama="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
stamp="$VENV/.llama-build-key"
if [[ "$installed_llama" == "$LLAMA_CPP_VERSION" && -f "$stamp" && "$(cat "$stamp")" == "$WHEEL_KEY" ]]; then
  say "llama-cpp-python $LLAMA_CPP_VERSION already installed with these flags"
else
  wheel="$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    say "building llama-cpp-python $LLAMA_CPP_VERSION for this CPU (a few minutes on 2 cores)"
    command -v cmake >/dev/null || command -v cc >/dev/null || die "a C/C++ compiler is needed (Debian: apt-get install build-essential cmake)"
    tmp="$(mktemp -d)"
    if [[ "$DRY_RUN" != 1 ]]; then
      CMAKE_ARGS="$CMAKE_ARGS_CHOSEN" FORCE_CMAKE=1 "${PIP[@]}" wheel --no-cache-dir --no-deps \
        "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$tmp" || die "building llama-cpp-python failed (see above)"
      mkdir -p "$WHEEL_DIR"
      mv "$tmp"/llama_cpp_python-*.whl "$WHEEL_DIR"/
      rm -rf "$tmp"
    else
      printf '[dry-run] CMAKE_ARGS="%s" pip wheel --no-cache-dir llama-cpp-python==%s\n' "$CMAKE_ARGS_CHOSEN" "$LLAMA_CPP_VERSION"
    fi
    wheel="$(ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
  else
    say "reusing cached llama-cpp-python wheel $(basename "$wheel")"
  fi
  if [[ "$DRY_RUN" != 1 ]]; then
    "${PIP[@]}" install --quiet --force-reinstall --no-deps "$wheel"
    "${PIP[@]}" install --quiet "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
    echo "$WHEEL_KEY" > "$stamp"
  fi
fi

# ---------------------------------------------------------------- models
if [[ "$SKIP_MODELS" != 1 ]]; then
  say "fetching models (tier $TIER)"
  run "$VENV/bin/python" "$ROOT/model_setup.py" download --tier "$TIER" --models-dir "$MODELS_DIR"
fi

# ---------------------------------------------------------------- smoke test: decode, not just load
if [[ "$DRY_RUN" != 1 && "$SKIP_MODELS" != 1 ]]; then
  say "smoke test: loading the LLM and decoding a few tokens"
  if ! LOCAL_MODELS_DIR="$MODELS_DIR" "$VENV/bin/python" -m local_ai_server.selfcheck; then
    die "the LLM crashed while decoding. Rebuild llama-cpp-python portably: rm -rf '$WHEEL_DIR' && LOCAL_LLAMA_CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh"
  fi
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo
  echo "Dry run: nothing was changed."
  exit 0
fi

cat <<EOF

Installed.
  start the server:   $VENV/bin/local-ai-server            (ws://127.0.0.1:8765, /health, /ready, /metrics)
  models:             $MODELS_DIR (tier $TIER)
  settings:           see README.md "Configuration" (LOCAL_WS_PORT, LOCAL_WS_AUTH_TOKEN, ...)
EOF
