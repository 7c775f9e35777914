#!/usr/bin/env bash
# Set up everything the test suite needs, from nothing, and run it.
# Usage: ./scripts/test.sh [pytest arguments]
set -euo pipefail
export CRANKLLM_EXTRAS=dev
# shellcheck source=scripts/setup-env.sh
source "$(dirname "$0")/setup-env.sh"

check_prerequisites
install_project

# The unit-file tests need systemd-analyze. Debian's systemd package provides it even on a
# machine that does not boot with systemd; CI runs as root, so install it there.
if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing systemd-analyze (Debian package systemd) for the unit-file tests"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null \
            || printf 'note: could not install systemd; the unit-file tests will be skipped\n'
    else
        printf 'note: systemd-analyze not found; the unit-file tests will be skipped (Debian: sudo apt install systemd)\n'
    fi
fi

step "preparing the default model"
"$venv/bin/crankllm" model prepare

step "running the test suite"
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
