#!/usr/bin/env bash
# Set up everything the test suite needs, from nothing, and run it.
# Usage: ./scripts/test.sh [pytest arguments]
set -euo pipefail
export CRANKLLM_EXTRAS=dev
# shellcheck source=scripts/setup-env.sh
source "$(dirname "$0")/setup-env.sh"

check_prerequisites
install_project

# systemd-python (in the pi extra) builds against libsystemd. With it installed, the
# journal tests run instead of being skipped.
if ! "$venv/bin/python" -c 'import systemd.journal' 2>/dev/null; then
    if ! pkg-config --exists libsystemd 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing libsystemd-dev and pkg-config for systemd-python"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends libsystemd-dev pkg-config >/dev/null \
            || printf 'note: could not install libsystemd-dev; the journal tests will be skipped\n'
    fi
    if pkg-config --exists libsystemd 2>/dev/null; then
        step "installing systemd-python"
        "$venv/bin/python" -m pip install --disable-pip-version-check -q 'systemd-python>=235' \
            || printf 'note: systemd-python did not build; the journal tests will be skipped\n'
    else
        printf 'note: libsystemd not found; the journal tests will be skipped (Debian: sudo apt install libsystemd-dev pkg-config)\n'
    fi
fi

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

# The system test (tests/test_system.py) boots the unit under a real systemd in a
# systemd-nspawn container built with debootstrap. CI runs as root, so install both
# there. --no-install-recommends: systemd-container recommends libnss-mymachines,
# which adds itself to the host's /etc/nsswitch.conf.
if ! command -v debootstrap >/dev/null 2>&1 || ! command -v systemd-nspawn >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        step "installing debootstrap and systemd-container for the system test"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            debootstrap debian-archive-keyring systemd-container >/dev/null \
            || printf 'note: could not install debootstrap and systemd-container; the system test will be skipped\n'
    else
        printf 'note: debootstrap or systemd-nspawn not found; the system test will be skipped (Debian: sudo apt install --no-install-recommends debootstrap systemd-container)\n'
    fi
fi

step "preparing the default model"
"$venv/bin/crankllm" model prepare

step "running the test suite"
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
