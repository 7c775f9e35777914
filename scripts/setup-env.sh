# shellcheck shell=bash
# Shared set-up for demo.sh and test.sh: check the system prerequisites, create the
# virtual environment and install crankllm into it. Sourced, not run.
# Reads: CRANKLLM_VENV (default .venv in the repository), PYTHON (default python3),
#        CRANKLLM_EXTRAS (pip extras to install, e.g. "dev").

die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

step() {
    printf '==> %s\n' "$*"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CRANKLLM_VENV:-$repo/.venv}
python=${PYTHON:-python3}

check_prerequisites() {
    command -v "$python" >/dev/null 2>&1 \
        || die "$python not found; install Python 3.11 or newer (Debian: sudo apt install python3)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "crankllm needs Python 3.11 or newer; $python is $("$python" -V 2>&1)"
    "$python" -c 'import venv, ensurepip' 2>/dev/null \
        || die "Python's venv module is missing (Debian: sudo apt install python3-venv)"
    "$python" - <<'PY' || die "Python headers are missing (Debian: sudo apt install python3-dev)"
import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PY
    if ! command -v cc >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
        die "a C and C++ compiler is needed to build llama.cpp (Debian: sudo apt install build-essential)"
    fi
    if ! command -v cmake >/dev/null 2>&1; then
        printf 'note: cmake not found; pip will fetch it from PyPI for the llama.cpp build (Debian: sudo apt install cmake)\n'
    fi
}

# Install crankllm into the venv unless the venv already has this exact setup.cfg.
install_project() {
    local extras=${CRANKLLM_EXTRAS:-}
    local spec="$repo"
    [ -n "$extras" ] && spec="${repo}[${extras}]"
    if [ ! -x "$venv/bin/python" ]; then
        step "creating virtual environment $venv"
        "$python" -m venv "$venv" || die "could not create the virtual environment $venv"
    fi
    local stamp="$venv/.crankllm-installed"
    local want
    want="$(cat "$repo/setup.cfg" "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        step "virtual environment is up to date"
        return
    fi
    if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
        step "installing llama-cpp-python: pip builds it from source unless it has a build cached (about 4 minutes on a 2-core PC, 20 to 60 on a Raspberry Pi)"
    fi
    local started=$SECONDS
    # The multimodal library is not used, and skipping it shortens the build.
    CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" \
        "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar on \
        -e "$spec" \
        || die "pip install failed; the lines above name the package that failed"
    step "installed crankllm and its dependencies in $((SECONDS - started)) s"
    printf '%s' "$want" >"$stamp"
}
