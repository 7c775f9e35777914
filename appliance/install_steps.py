"""Decisions for scripts/install.sh: packages, groups, config, memory, I2C, summary.

The shell script does the work (apt-get, useradd, pip, systemctl) and calls this
module for each decision. Each decision is a pure function of text the script reads from
the system, so it can be unit-tested without a Raspberry Pi. Run as

    python3 -P appliance/install_steps.py COMMAND [ARGS]

by the system Python, before the virtual environment exists. That is why this file
imports only the standard library and raises its own InstallError instead of the
appliance's exception tree.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_USER = "crankllm"

# Debian packages the build and the service need on every system. python3-venv
# doubles as the probe for usable apt lists: every Debian release has it, so no
# candidate for it means `apt-get update` has not run yet.
BASE_PACKAGES = (
    "build-essential",
    "cmake",
    "pkg-config",
    "python3-dev",
    "python3-venv",
    "i2c-tools",
)
LIST_PROBE = "python3-venv"

# How the lgpio module gets into the venv, which includes the system site packages:
#   "apt"    python3-lgpio from apt (Raspberry Pi OS builds it);
#   "shared" pip builds PyPI's lgpio sdist with SWIG against liblgpio-dev;
#   "static" no liblgpio either (plain Debian), so the sdist is built with PYPI=1,
#            which compiles the lg library it bundles into the module.
# PyPI has lgpio 0.2.2.0 wheels for x86-64 but none for aarch64, so on a Pi any lgpio
# that pip installs is built from the sdist, and SWIG is installed in every mode: in
# "apt" mode too, pip builds it if the apt package is older than setup.cfg allows.

# These files and folders make up the installable project; the rest of a checkout
# (tests, docs, the developer's .venv) is not copied.
SOURCE_ENTRIES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "appliance")
SKIPPED_PARTS = {"__pycache__"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# Peak memory of one compiler process while llama-cpp-python 0.3.36 builds
# llama.cpp: 663 MiB (GNU time's maximum RSS) on x86-64 Debian 12 with GCC 12 and
# one job, rounded up.
# NOTE: measured on x86-64 only; GCC compiles other SIMD code on aarch64, so check
# this on a Pi 4 with `/usr/bin/time -v` around the pip build.
COMPILE_JOB_MIB = 700
# Room left for the kernel, pip and cmake while the compiler runs (an estimate).
SYSTEM_RESERVE_MIB = 200
# Swap suggested when RAM and swap together cannot hold one compile job.
SUGGESTED_SWAP_MIB = 1024

DTPARAM_I2C = "dtparam=i2c_arm=on"
I2C_FAST_BAUDRATE = 400000


class InstallError(ValueError):
    """Input this module cannot decide on: missing apt lists, a file it cannot parse."""


# --- apt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PackageState:
    """One package as `apt-cache policy` reports it; None where apt-cache prints "(none)"."""

    installed: str | None
    candidate: str | None


@dataclass(frozen=True)
class PackagePlan:
    """The Debian packages to install and how lgpio and systemd-python are provided."""

    packages: tuple[str, ...]
    missing: tuple[str, ...]
    lgpio: str
    notes: tuple[str, ...] = ()


def parse_apt_policy(text: str) -> dict[str, PackageState]:
    """Parse `apt-cache policy NAME...` output into {name: PackageState}.

    apt-cache prints nothing on stdout for a name it has never heard of, so such a
    package is absent from the result, which callers treat like "no candidate".
    """
    states: dict[str, PackageState] = {}
    name = None
    fields: dict[str, str | None] = {}

    def close() -> None:
        if name is not None:
            states[name] = PackageState(fields.get("Installed"), fields.get("Candidate"))

    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            close()
            name = line[:-1].strip()
            fields = {}
            continue
        key, colon, value = line.strip().partition(":")
        if name is None or not colon or key not in ("Installed", "Candidate"):
            continue
        value = value.strip()
        fields[key] = None if value in ("", "(none)") else value
    close()
    return states


def has_candidate(states: dict[str, PackageState], name: str) -> bool:
    state = states.get(name)
    return state is not None and state.candidate is not None


def plan_packages(states: dict[str, PackageState]) -> PackagePlan:
    """Choose the Debian packages to install from `apt-cache policy` states.

    Raises InstallError when the apt lists look empty, so the caller can run
    `apt-get update` and ask again.
    """
    if not has_candidate(states, LIST_PROBE):
        raise InstallError(
            f"apt has no candidate for {LIST_PROBE}; the package lists are missing or stale "
            f"(run apt-get update)"
        )
    packages = list(BASE_PACKAGES)
    notes = []

    packages.append("swig")
    if has_candidate(states, "python3-lgpio"):
        lgpio = "apt"
        packages.append("python3-lgpio")
    elif has_candidate(states, "liblgpio-dev"):
        lgpio = "shared"
        packages.append("liblgpio-dev")
        notes.append("python3-lgpio is not packaged here; pip builds lgpio against liblgpio-dev")
    else:
        lgpio = "static"
        notes.append(
            "neither python3-lgpio nor liblgpio-dev is packaged here (plain Debian); "
            "pip builds lgpio with its bundled lg library"
        )

    # python3-systemd carries the systemd-python 235 metadata, so pip in a venv with
    # system site packages takes it as installed and compiles nothing.
    if has_candidate(states, "python3-systemd"):
        packages.append("python3-systemd")
    else:
        packages.append("libsystemd-dev")
        notes.append("python3-systemd is not packaged here; pip builds systemd-python")

    missing = tuple(
        name for name in packages if states.get(name) is None or states[name].installed is None
    )
    return PackagePlan(tuple(packages), missing, lgpio, tuple(notes))


# --- users and groups --------------------------------------------------------------


def parse_group_file(text: str) -> dict[str, list[str]]:
    """Map each group in /etc/group text to its member list."""
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < 4:
            raise InstallError(f"invalid /etc/group line {line!r}; expected name:x:gid:members")
        groups[parts[0]] = [member for member in parts[3].split(",") if member]
    return groups


@dataclass(frozen=True)
class GroupPlan:
    """The requested groups that exist, those that do not, and those the user has yet to join."""

    present: tuple[str, ...]
    missing: tuple[str, ...]
    to_join: tuple[str, ...]


def plan_groups(group_text: str, user: str, requested: list[str] | tuple[str, ...]) -> GroupPlan:
    groups = parse_group_file(group_text)
    present = tuple(name for name in requested if name in groups)
    missing = tuple(name for name in requested if name not in groups)
    to_join = tuple(name for name in present if user not in groups[name])
    return GroupPlan(present, missing, to_join)


def user_ids(passwd_text: str, user: str) -> tuple[int, int] | None:
    """Return (uid, gid) of ``user`` from /etc/passwd text, or None if it has no entry."""
    for line in passwd_text.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[0] == user:
            try:
                return int(parts[2]), int(parts[3])
            except ValueError:
                raise InstallError(f"invalid uid or gid in /etc/passwd for {user}: {line!r}") from None
    return None


def unit_supplementary_groups(unit_text: str) -> list[str]:
    """Return the groups named by SupplementaryGroups= in a unit, in order.

    An empty assignment resets the list, as systemd does.
    """
    groups: list[str] = []
    for line in unit_text.splitlines():
        key, equals, value = line.strip().partition("=")
        if not equals or key.strip() != "SupplementaryGroups":
            continue
        if not value.strip():
            groups = []
            continue
        groups += [name for name in value.split() if name not in groups]
    return groups


def groups_dropin(present: tuple[str, ...], missing: tuple[str, ...]) -> str | None:
    """Return a unit drop-in that limits SupplementaryGroups= to existing groups.

    systemd refuses to start a unit whose SupplementaryGroups= names a group that does
    not exist (the process fails with status 216/GROUP), and plain Debian has no gpio
    or spi group. Returns None when every group exists and no drop-in is needed.
    """
    if not missing:
        return None
    lines = [
        "# Written by crankllm's scripts/install.sh, which rewrites or removes it on",
        f"# every run. These groups do not exist here: {' '.join(missing)}.",
        "# systemd will not start a unit that names a missing group, so the list is",
        "# reset to the groups that exist.",
        "[Service]",
        "SupplementaryGroups=",
    ]
    if present:
        lines.append("SupplementaryGroups=" + " ".join(present))
    return "\n".join(lines) + "\n"


# Device group of the unit -> (the access it gives the service, whether the default
# configuration needs it). The default configuration reads the encoder on GPIO and
# drives the OLED on I2C.
GROUP_USES = {
    "gpio": ("/dev/gpiochip*: without it the service cannot read the encoder", True),
    "i2c": ("/dev/i2c-*: without it the service cannot drive the OLED", True),
    "spi": ("/dev/spidev*: needed only for an SPI display", False),
    "dialout": ("serial ports: needed only for [serial] mode", False),
}


def describe_missing_groups(missing: tuple[str, ...]) -> list[str]:
    """Return one line per missing device group, starting "warning: " or "note: ".

    A warning is for a group the default configuration needs; a note is for one that
    only some configurations use.
    """
    lines = []
    for name in missing:
        use, required = GROUP_USES.get(name, ("named in the unit's SupplementaryGroups=", True))
        text = f"group {name} does not exist, so {SERVICE_USER} is not in it ({use})"
        if required:
            text += (
                "; Raspberry Pi OS creates it, on plain Debian give the devices to a group "
                "with a udev rule (see hardware/README.md)"
            )
        lines.append(("warning: " if required else "note: ") + text)
    return lines


# --- config file -------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_action(
    installed: bytes | None,
    example: bytes,
    recorded_sha256: str | None,
    pending_new: bytes | None,
) -> str:
    """Decide what to do with /etc/crankllm/crankllm.toml, dpkg conffile style.

    ``recorded_sha256`` is the digest of the example the installer wrote last time,
    if it kept one; ``pending_new`` is an existing crankllm.toml.new. Returns:

    - "install": no config yet, so write the example;
    - "unchanged": the config already equals the example;
    - "upgrade": the config is the old example, never edited, so replace it;
    - "new": the config was edited (or its origin is unknown), so keep it and write
      the example beside it as crankllm.toml.new;
    - "new-present": as "new", but that .new file is already up to date.
    """
    if installed is None:
        return "install"
    if installed == example:
        return "unchanged"
    if recorded_sha256 is not None and sha256_hex(installed) == recorded_sha256.strip():
        return "upgrade"
    if pending_new == example:
        return "new-present"
    return "new"


# --- I2C ---------------------------------------------------------------------------


def config_txt_path(root: str | os.PathLike = "/") -> Path:
    """Return the firmware config.txt the boot loader reads.

    Raspberry Pi OS Bookworm moved it to /boot/firmware/config.txt; earlier releases
    keep it at /boot/config.txt, which on Bookworm is only a stub saying it moved.
    """
    root = Path(root)
    bookworm = root / "boot" / "firmware" / "config.txt"
    if bookworm.exists() or (root / "boot" / "firmware").is_dir():
        return bookworm
    return root / "boot" / "config.txt"


def i2c_settings(config_txt: str) -> tuple[bool, int | None]:
    """Return (I2C enabled, i2c_arm_baudrate or None) from config.txt text.

    Conditional sections such as [pi4] or [cm5] are not evaluated: every line counts
    except those under [none]. A later line overrides an earlier one, as in the
    firmware, and `i2c` is the firmware's alias for `i2c_arm`.
    """
    enabled = False
    baudrate = None
    ignored = False
    for raw in config_txt.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            ignored = line[1:-1].strip().lower() == "none"
            continue
        if ignored or not line.startswith("dtparam="):
            continue
        for item in line[len("dtparam="):].split(","):
            key, _, value = item.strip().partition("=")
            key = key.strip()
            value = value.strip().lower()
            if key in ("i2c_arm", "i2c"):
                enabled = value in ("on", "true", "yes", "okay", "")
            elif key in ("i2c_arm_baudrate", "i2c_baudrate"):
                try:
                    baudrate = int(value, 0)
                except ValueError:
                    raise InstallError(f"invalid {key} value {value!r} in config.txt") from None
    return enabled, baudrate


def display_bus(config_texts: list[str]) -> tuple[str, str, int]:
    """Return (driver, interface, i2c_port) from the main config and its drop-ins, in order.

    Later files override earlier ones, as crankllm's own loader does; missing keys
    keep the built-in defaults (ssd1306 on I2C bus 1).
    """
    driver, interface, port = "ssd1306", "i2c", 1
    for text in config_texts:
        try:
            display = tomllib.loads(text).get("display", {})
        except tomllib.TOMLDecodeError as err:
            raise InstallError(f"invalid TOML in the crankllm config: {err}") from None
        driver = display.get("driver", driver)
        interface = display.get("interface", interface)
        port = display.get("i2c_port", port)
    return driver, interface, port


PANEL_DRIVERS = ("ssd1306", "ssd1309", "ssd1315", "sh1106", "sh1107")


def i2c_warnings(
    driver: str,
    interface: str,
    port: int,
    device_exists: bool,
    config_txt: Path,
    config_txt_text: str | None,
) -> list[str]:
    """Return warnings about the I2C bus the display needs; empty when all is well."""
    if driver not in PANEL_DRIVERS or interface != "i2c":
        return []
    enabled, baudrate = i2c_settings(config_txt_text) if config_txt_text is not None else (False, None)
    fast_line = f"dtparam=i2c_arm=on,i2c_arm_baudrate={I2C_FAST_BAUDRATE}"
    if not device_exists:
        if port != 1:
            return [
                f"/dev/i2c-{port} not found: [display] i2c_port = {port} needs an I2C overlay "
                f"for that bus in {config_txt}"
            ]
        return [
            f"/dev/i2c-{port} not found: enable I2C with `sudo raspi-config nonint do_i2c 0`, "
            f"or add the line {DTPARAM_I2C} to {config_txt}, then reboot; the line "
            f"{fast_line} also runs the bus at 400 kHz for faster display updates"
        ]
    if config_txt_text is None or port != 1:
        return []
    warnings = []
    if not enabled:
        warnings.append(
            f"/dev/i2c-{port} exists but {config_txt} has no {DTPARAM_I2C}; "
            f"it may not survive a reboot"
        )
    if baudrate is None or baudrate < I2C_FAST_BAUDRATE:
        current = f"{baudrate} Hz" if baudrate else "the default 100 kHz"
        warnings.append(
            f"I2C runs at {current}: for faster display updates set {fast_line} "
            f"in {config_txt} and reboot"
        )
    return warnings


# --- the llama.cpp build -----------------------------------------------------------


def parse_meminfo(text: str) -> tuple[int, int]:
    """Return (MemTotal, SwapTotal) in MiB from /proc/meminfo text."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemTotal", "SwapTotal") and parts:
            values[key] = int(parts[0]) // 1024  # /proc/meminfo counts kB (KiB)
    if "MemTotal" not in values:
        raise InstallError("no MemTotal line in /proc/meminfo")
    return values["MemTotal"], values.get("SwapTotal", 0)


@dataclass(frozen=True)
class BuildPlan:
    """Parallel compile jobs for the llama.cpp build, and what to tell the user first."""

    jobs: int
    warnings: tuple[str, ...] = field(default=())


def plan_build(mem_mib: int, swap_mib: int, cpus: int, *, dphys_swapfile: bool) -> BuildPlan:
    """Choose CMAKE_BUILD_PARALLEL_LEVEL so compile jobs fit in RAM, and warn about swap.

    Jobs are sized from RAM alone: a compiler that pages to swap on an SD card runs
    many times slower than one job in RAM.
    """
    if cpus < 1:
        raise InstallError(f"invalid CPU count {cpus}")
    jobs = max(1, min(cpus, (mem_mib - SYSTEM_RESERVE_MIB) // COMPILE_JOB_MIB))
    warnings = []
    if mem_mib + swap_mib < COMPILE_JOB_MIB + SYSTEM_RESERVE_MIB:
        if dphys_swapfile:
            swap_advice = (
                f"set CONF_SWAPSIZE={SUGGESTED_SWAP_MIB} in /etc/dphys-swapfile (and "
                f"CONF_MAXSWAP if it is lower), then run `sudo dphys-swapfile setup && "
                f"sudo dphys-swapfile swapon`"
            )
        else:
            swap_advice = (
                f"add a {SUGGESTED_SWAP_MIB} MiB swap file: `sudo fallocate -l {SUGGESTED_SWAP_MIB}M "
                f"/var/swap.crankllm && sudo chmod 600 /var/swap.crankllm && sudo mkswap "
                f"/var/swap.crankllm && sudo swapon /var/swap.crankllm`"
            )
        warnings.append(
            f"{mem_mib} MiB RAM and {swap_mib} MiB swap may not hold one compiler process "
            f"(about {COMPILE_JOB_MIB} MiB at its peak); the kernel may kill the build. "
            f"Before installing, {swap_advice}"
        )
    return BuildPlan(jobs, tuple(warnings))


def build_time_hint(board_model: str) -> str:
    """Return how long the llama.cpp build is likely to take on this board."""
    # The build took 7.5 minutes with one job on a 2-core x86-64 PC (5.5 min of CPU).
    # NOTE: the Raspberry Pi figures are estimates scaled from that, not timed on
    # the boards; replace them with measured times.
    model = board_model.lower()
    if "zero 2" in model:
        return "an hour or more on a Pi Zero 2 W (estimate)"
    if "raspberry pi" in model:
        return "tens of minutes on a Pi 4 or 5 (estimate)"
    return "several minutes on a PC, tens of minutes on a Raspberry Pi"


def cpu_signature(cpuinfo: str, board_model: str = "") -> str:
    """Return a short digest of the CPU type, to rebuild llama.cpp when the CPU changes.

    llama.cpp is built with GGML_NATIVE=ON, for this CPU's instruction set alone: a
    build from a Pi 5 (Cortex-A76, with dot-product instructions) can die with SIGILL
    on a Pi 4 (Cortex-A72) if the SD card moves between them.
    """
    keys = ("CPU implementer", "CPU architecture", "CPU part", "Features", "model name", "flags")
    seen = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            seen.add(f"{key.strip()}={' '.join(value.split())}")
    text = "\n".join(sorted(seen)) + "\n" + board_model.strip("\x00 \n")
    return sha256_hex(text.encode())[:16]


def pinned_version(setup_cfg_text: str, name: str) -> str:
    """Return the version pinned with == for ``name`` in setup.cfg's install_requires."""
    pattern = re.compile(rf"^\s*{re.escape(name)}\s*==\s*([^\s;#]+)", re.IGNORECASE | re.MULTILINE)
    match = pattern.search(setup_cfg_text)
    if not match:
        raise InstallError(f"setup.cfg does not pin {name} with ==")
    return match.group(1)


NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s")
MAKE_STEP = re.compile(r"^\s*\[\s*(\d+)%\]\s")
SOURCE_FILE = re.compile(r"\s-c\s+(\S+)\s*$")
BUILD_ERROR = re.compile(r"(^\s*ERROR\b| error: |^\s*Killed\b)")


def progress_line(line: str) -> str | None:
    """Shorten one line of the verbose build log to a progress line, or return None.

    scikit-build-core prints each Ninja step with its whole compiler command; the
    progress line keeps the step counter and the source file's name. Error lines,
    such as GCC's "fatal error: Killed signal" when the kernel kills it for lack of
    memory, are passed through whole.
    """
    if BUILD_ERROR.search(line):
        return line.strip()
    step = NINJA_STEP.match(line) or MAKE_STEP.match(line)
    if step is None:
        return None
    counter = line[: step.end()].strip()
    rest = line[step.end():].strip()
    source = SOURCE_FILE.search(rest)
    if source:
        return f"{counter} compiling {os.path.basename(source.group(1))}"
    if " -shared " in rest or "cmake_symlink_library" in rest:
        return f"{counter} linking"
    return f"{counter} {rest[:80]}"


# --- project source ----------------------------------------------------------------


def source_files(src: str | os.PathLike) -> list[Path]:
    """Return the project's installable files, relative to ``src``, in a stable order."""
    src = Path(src)
    files = []
    for entry in SOURCE_ENTRIES:
        path = src / entry
        if path.is_file():
            files.append(Path(entry))
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(src)
                if child.is_file() and not SKIPPED_PARTS & set(relative.parts) \
                        and not child.name.endswith(SKIPPED_SUFFIXES):
                    files.append(relative)
    if Path("setup.cfg") not in files:
        raise InstallError(f"{src} is not a crankllm checkout: setup.cfg not found")
    return files


def source_digest(src: str | os.PathLike) -> str:
    """Return a sha256 over the names and contents of the installable files."""
    digest = hashlib.sha256()
    for relative in source_files(src):
        digest.update(str(relative).encode() + b"\0")
        digest.update((Path(src) / relative).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def copy_source(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the installable files to ``dest``, so pip's build writes nothing into the checkout."""
    for relative in source_files(src):
        target = Path(dest) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(src) / relative, target)


# --- platform and summary ----------------------------------------------------------


def parse_os_release(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if equals:
            values[key.strip()] = value.strip().strip("\"'")
    return values


SUPPORTED_ARCHES = ("arm64", "amd64")
SUPPORTED_CODENAMES = ("bookworm", "trixie")


def check_platform(os_release: str, dpkg_arch: str) -> list[str]:
    """Return warnings about the OS; raise InstallError for one the installer cannot serve."""
    if dpkg_arch == "armhf" or dpkg_arch == "armel":
        raise InstallError(
            f"this is a 32-bit system ({dpkg_arch}); crankllm needs 64-bit Raspberry Pi OS "
            f"(arm64), which runs on the Pi Zero 2 W, 3, 4 and 5"
        )
    values = parse_os_release(os_release)
    if values.get("ID") != "debian" and "debian" not in values.get("ID_LIKE", "").split():
        raise InstallError(
            f"this installer needs Debian or Raspberry Pi OS, not {values.get('PRETTY_NAME', 'an unknown system')}"
        )
    warnings = []
    if dpkg_arch not in SUPPORTED_ARCHES:
        warnings.append(f"architecture {dpkg_arch} is untested; arm64 and amd64 are tested")
    codename = values.get("VERSION_CODENAME", "")
    if codename not in SUPPORTED_CODENAMES:
        warnings.append(
            f"{values.get('PRETTY_NAME', 'this release')} is untested; Bookworm and Trixie are tested"
        )
    return warnings


CONFIG_STATES = {
    "install": "installed",
    "unchanged": "unchanged",
    "upgrade": "updated to the new example",
    "new": "kept your edits; the new example is {path}.new",
    "new-present": "kept your edits; the new example is {path}.new",
}


def summary_text(
    *,
    root: str,
    venv: str,
    config: str,
    config_state: str,
    unit: str,
    model: str | None,
    transcripts: str,
    warnings: list[str],
    dry_run: bool = False,
) -> str:
    """Return the closing summary: what is where, and how to start, watch and stop."""
    if config_state not in CONFIG_STATES:
        raise InstallError(f"unknown config state {config_state!r}")
    prefix = "" if root in ("", "/") else root.rstrip("/")
    lines = [
        "crankllm dry run: nothing was changed." if dry_run else "crankllm is installed.",
        "",
        f"  program      {prefix}{venv}/bin/crankllm",
        f"  service      {prefix}{unit} (enabled, starts at boot)",
        f"  config       {prefix}{config} ({CONFIG_STATES[config_state].format(path=prefix + config)})",
        f"  drop-ins     {prefix}{os.path.dirname(config)}/conf.d/*.toml",
        f"  model        {prefix}{model}" if model else "  model        not prepared (--skip-model)",
        f"  transcripts  {prefix}{transcripts}",
        "",
        f"  check the config   {venv}/bin/crankllm config check",
        "  start              sudo systemctl start crankllm",
        "  watch the log      journalctl -u crankllm -f",
        "  stop               sudo systemctl stop crankllm",
        "  remove             sudo scripts/install.sh --uninstall (keeps config and transcripts)",
    ]
    if warnings:
        lines += ["", "Before you start it:"]
        lines += [f"  - {warning}" for warning in warnings]
    return "\n".join(lines) + "\n"


# --- command line ------------------------------------------------------------------


def _read(path: str | os.PathLike) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _read_bytes(path: str | os.PathLike) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def _print_lines(lines) -> None:
    for line in lines:
        print(line)


def _cmd_platform(args) -> int:
    os_release = _read(Path(args.root) / "etc" / "os-release") or ""
    _print_lines(check_platform(os_release, args.arch))
    return 0


def _cmd_packages(args) -> int:
    plan = plan_packages(parse_apt_policy(sys.stdin.read()))
    print(" ".join(plan.missing))
    print(plan.lgpio)
    _print_lines(plan.notes)
    return 0


def _cmd_groups(args) -> int:
    unit_text = _read(args.unit)
    if unit_text is None:
        raise InstallError(f"unit file {args.unit} not found")
    group_text = _read(args.group_file) or ""
    plan = plan_groups(group_text, args.user, unit_supplementary_groups(unit_text))
    print(" ".join(plan.present))
    print(" ".join(plan.missing))
    print(" ".join(plan.to_join))
    return 0


def _cmd_groups_dropin(args) -> int:
    text = groups_dropin(tuple(args.present.split()), tuple(args.missing.split()))
    if text is not None:
        sys.stdout.write(text)
    return 0


def _cmd_missing_groups(args) -> int:
    _print_lines(describe_missing_groups(tuple(args.missing.split())))
    return 0


def _cmd_user_ids(args) -> int:
    ids = user_ids(_read(args.passwd_file) or "", args.user)
    if ids is None:
        return 1
    print(f"{ids[0]}:{ids[1]}")
    return 0


def _cmd_config_action(args) -> int:
    example = _read_bytes(args.example)
    if example is None:
        raise InstallError(f"example config {args.example} not found")
    recorded = _read(args.record)
    print(config_action(_read_bytes(args.installed), example, recorded, _read_bytes(args.installed + ".new")))
    return 0


def _cmd_sha256(args) -> int:
    print(sha256_hex(Path(args.path).read_bytes()))
    return 0


def _cmd_i2c(args) -> int:
    root = Path(args.root)
    etc = root / "etc" / "crankllm"
    texts = [text for text in [_read(etc / "crankllm.toml")] if text is not None]
    texts += [_read(path) or "" for path in sorted((etc / "conf.d").glob("*.toml"))]
    driver, interface, port = display_bus(texts)
    config_txt = config_txt_path(root)
    warnings = i2c_warnings(
        driver, interface, port,
        device_exists=(root / "dev" / f"i2c-{port}").exists(),
        config_txt=Path("/") / config_txt.relative_to(root),
        config_txt_text=_read(config_txt),
    )
    _print_lines(warnings)
    return 0


def _cmd_build_plan(args) -> int:
    mem_mib, swap_mib = parse_meminfo(Path(args.meminfo).read_text())
    model = _read(args.model_file) or ""
    plan = plan_build(mem_mib, swap_mib, os.cpu_count() or 1, dphys_swapfile=Path(args.dphys).exists())
    print(plan.jobs)
    print(build_time_hint(model))
    _print_lines(plan.warnings)
    return 0


def _cmd_cpu_signature(args) -> int:
    print(cpu_signature(_read(args.cpuinfo) or "", _read(args.model_file) or ""))
    return 0


def _cmd_pinned_version(args) -> int:
    print(pinned_version(Path(args.setup_cfg).read_text(encoding="utf-8"), args.name))
    return 0


def _cmd_source_digest(args) -> int:
    print(source_digest(args.src))
    return 0


def _cmd_copy_source(args) -> int:
    copy_source(args.src, args.dest)
    return 0


def _cmd_progress(args) -> int:
    # Copies the whole build log to a file and prints only the progress lines.
    with open(args.log, "a", encoding="utf-8", errors="replace") as log:
        for line in sys.stdin:
            log.write(line)
            progress = progress_line(line)
            if progress is not None:
                print(f"    {progress}", flush=True)
    return 0


def _cmd_summary(args) -> int:
    sys.stdout.write(summary_text(
        root=args.root, venv=args.venv, config=args.config, config_state=args.config_state,
        unit=args.unit, model=args.model or None, transcripts=args.transcripts,
        warnings=args.warning, dry_run=args.dry_run,
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="install_steps.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser("platform", help="print warnings about the OS; exit 2 if unsupported")
    command.add_argument("root")
    command.add_argument("arch", help="output of dpkg --print-architecture")
    command.set_defaults(handler=_cmd_platform)

    command = commands.add_parser(
        "packages", help="read apt-cache policy on stdin; print missing packages, lgpio mode, notes"
    )
    command.set_defaults(handler=_cmd_packages)

    command = commands.add_parser("groups", help="print present, missing and to-join groups, one line each")
    command.add_argument("group_file")
    command.add_argument("unit")
    command.add_argument("user")
    command.set_defaults(handler=_cmd_groups)

    command = commands.add_parser("groups-dropin", help="print the unit drop-in for missing groups, if any")
    command.add_argument("present")
    command.add_argument("missing")
    command.set_defaults(handler=_cmd_groups_dropin)

    command = commands.add_parser("missing-groups", help="print a warning for each missing group")
    command.add_argument("missing")
    command.set_defaults(handler=_cmd_missing_groups)

    command = commands.add_parser("user-ids", help="print UID:GID of a user; exit 1 if it has no entry")
    command.add_argument("passwd_file")
    command.add_argument("user")
    command.set_defaults(handler=_cmd_user_ids)

    command = commands.add_parser("config-action", help="print install, unchanged, upgrade, new or new-present")
    command.add_argument("installed")
    command.add_argument("example")
    command.add_argument("record", help="file with the sha256 of the example installed last time")
    command.set_defaults(handler=_cmd_config_action)

    command = commands.add_parser("sha256", help="print a file's sha256")
    command.add_argument("path")
    command.set_defaults(handler=_cmd_sha256)

    command = commands.add_parser("i2c", help="print warnings about the display's I2C bus")
    command.add_argument("root")
    command.set_defaults(handler=_cmd_i2c)

    command = commands.add_parser("build-plan", help="print build jobs, a time hint, then memory warnings")
    command.add_argument("--meminfo", default="/proc/meminfo")
    command.add_argument("--model-file", default="/proc/device-tree/model")
    command.add_argument("--dphys", default="/etc/dphys-swapfile")
    command.set_defaults(handler=_cmd_build_plan)

    command = commands.add_parser("cpu-signature", help="print a digest of the CPU type")
    command.add_argument("--cpuinfo", default="/proc/cpuinfo")
    command.add_argument("--model-file", default="/proc/device-tree/model")
    command.set_defaults(handler=_cmd_cpu_signature)

    command = commands.add_parser("pinned-version", help="print the == version setup.cfg pins for a package")
    command.add_argument("setup_cfg")
    command.add_argument("name")
    command.set_defaults(handler=_cmd_pinned_version)

    command = commands.add_parser("source-digest", help="print a digest of the installable project files")
    command.add_argument("src")
    command.set_defaults(handler=_cmd_source_digest)

    command = commands.add_parser("copy-source", help="copy the installable project files")
    command.add_argument("src")
    command.add_argument("dest")
    command.set_defaults(handler=_cmd_copy_source)

    command = commands.add_parser("progress", help="copy stdin to LOG, print build progress lines")
    command.add_argument("log")
    command.set_defaults(handler=_cmd_progress)

    command = commands.add_parser("summary", help="print the closing summary")
    command.add_argument("--root", default="/")
    command.add_argument("--venv", required=True)
    command.add_argument("--config", required=True)
    command.add_argument("--config-state", required=True, choices=sorted(CONFIG_STATES))
    command.add_argument("--unit", required=True)
    command.add_argument("--model", default="")
    command.add_argument("--transcripts", required=True)
    command.add_argument("--warning", action="append", default=[])
    command.add_argument("--dry-run", action="store_true")
    command.set_defaults(handler=_cmd_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (InstallError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
