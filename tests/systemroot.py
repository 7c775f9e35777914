"""Build a Debian root with crankllm installed, and boot it under systemd-nspawn.

The system test runs the unit under a real systemd (Debian 12, systemd 252) as the
init of a container. Three roots are cached under ~/.cache/crankllm-test, each in a
folder named by a hash of what goes into it, and each a copy of the one before
(build times measured on a 2-CPU x86-64 VM):

- ``base-*``: ``debootstrap --variant=minbase`` with systemd and Python, 300 MB. It
  is rebuilt when the package list changes (about a minute).
- ``venv-*``: a venv at /opt/crankllm/venv with crankllm's dependencies, installed
  from wheels built on the host, and the crankllm user and device groups. It is
  rebuilt when setup.cfg or pyproject.toml changes (about 10 s).
- ``service-*``: the current crankllm, its config, the model and the unit. It is
  rebuilt when any of them changes (about 5 s).

The container boots with ``--volatile=overlay``, so whatever the test changes lives
in a tmpfs and the cached root stays as built.

On a machine that was not booted by systemd, nspawn needs a few extra steps:

- It registers the machine over the system bus unless given ``--register=no`` and
  ``--keep-unit``; without a bus it exits at once.
- When it exits, it removes what it mounted under /run/systemd/nspawn, and it rejects
  that on a disk file system ("Attempted to remove disk file system"). So it runs in
  a private mount namespace with a tmpfs over /run/systemd.
- It leaves ``payload`` and ``supervisor`` cgroups under its caller's cgroup, so it
  runs in a throwaway cgroup that is removed afterwards.
- ``machinectl`` needs a host systemd, so commands enter the container with
  ``nsenter -t PID -a``, where PID is the container's init.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
# libgomp1: llama.cpp's CPU backend links the OpenMP runtime. python3.11-venv provides
# ensurepip, without which `python3 -m venv` fails on Debian.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "python3-minimal",
    "python3-venv",
    "python3.11-venv",
    "libgomp1",
)
# Change these when the build steps change in a way the hashed inputs do not show.
BASE_RECIPE = 2
VENV_RECIPE = 1
SERVICE_RECIPE = 2

VENV = "/opt/crankllm/venv"
SERVICE_USER = "crankllm"
STATE_DIR = "/var/lib/crankllm"
MODELS_DIR = STATE_DIR + "/models"
CONFIG_DIR = "/etc/crankllm"
UNIT_DIR = "/etc/systemd/system"
# Raspberry Pi OS has these groups, but Debian has only dialout.
DEVICE_GROUPS = ("gpio", "i2c", "spi", "dialout")
# What goes into the crankllm wheel: the package and its build metadata. The build
# files alone decide which dependencies pip installs.
BUILD_FILES = ("setup.cfg", "pyproject.toml")
PROJECT_FILES = (*BUILD_FILES, "README.md", "MANIFEST.in", "LICENSE")
PROJECT_PACKAGE = "appliance"
# Wheels are copied into the root here for pip inside the chroot, and removed after.
WHEELHOUSE = "/var/tmp/crankllm-wheels"
# Lock file in each cached folder, held shared while a container runs from it.
USE_LOCK = "use.lock"

APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEBOOTSTRAP_TIMEOUT_S = 900
PIP_TIMEOUT_S = 600
BOOT_TIMEOUT_S = 60
HALT_TIMEOUT_S = 30
COMMAND_TIMEOUT_S = 60


class SystemRootError(RuntimeError):
    """An error from building or booting the container. The message names the step and its log."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crankllm-test"


def missing_prerequisites() -> str | None:
    """Return why the container cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the system test needs root (debootstrap, systemd-nspawn, cgroups)"
    tools = {
        "dpkg": "dpkg",
        "debootstrap": "debootstrap",
        "systemd-nspawn": "systemd-container",
        "unshare": "util-linux",
        "nsenter": "util-linux",
        "chroot": "coreutils",
    }
    missing = [f"{tool} (Debian package {package})" for tool, package in tools.items() if shutil.which(tool) is None]
    if missing:
        return "missing " + ", ".join(missing)
    if not _cgroup_parents():
        return "no writable cgroup hierarchy found in /proc/self/mountinfo"
    try:
        apt_mirror()
    except SystemRootError as exc:
        return str(exc)
    return None


# -- the Debian mirror --------------------------------------------------------------


def apt_mirror(suite: str = SUITE, sources: Iterable[Path] = APT_SOURCES) -> str:
    """Return the URI of this machine's APT source for ``suite`` main, for debootstrap.

    Reads one-line ``.list`` files and deb822 ``.sources`` files. Raises
    SystemRootError if none of them lists the suite.
    """
    for path in _source_files(sources):
        text = path.read_text(encoding="utf-8", errors="replace")
        parse = _deb822_uris if path.suffix == ".sources" else _one_line_uris
        for uri in parse(text, suite):
            return uri.rstrip("/")
    names = ", ".join(str(path) for path in sources)
    raise SystemRootError(f"no APT source for {suite} main in {names}; debootstrap needs a Debian mirror")


def _source_files(sources: Iterable[Path]) -> list[Path]:
    files = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.is_file():
            files.append(source)
    return files


def _one_line_uris(text: str, suite: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        # deb [option=value ...] uri suite component...
        line = re.sub(r"\[[^]]*\]", " ", line)
        words = line.split()
        if len(words) >= 4 and words[0] == "deb" and words[2] == suite and "main" in words[3:]:
            yield words[1]


def _deb822_uris(text: str, suite: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if suite in fields.get("suites", "").split() and "main" in fields.get("components", "").split():
            yield from fields.get("uris", "").split()


# -- cached roots -------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """What the service root contains besides the base system and the venv."""

    repo: Path
    model: Path
    config: str
    dropin_name: str
    dropin: str

    @property
    def unit(self) -> Path:
        return self.repo / "systemd" / "crankllm.service"


def _hash(items: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(len(item).to_bytes(8, "big"))
        digest.update(item)
    return digest.hexdigest()[:16]


def _project_files(repo: Path) -> list[Path]:
    """Return the files the crankllm wheel is built from, relative to ``repo``, sorted."""
    files = [Path(name) for name in PROJECT_FILES if (repo / name).is_file()]
    for path in sorted((repo / PROJECT_PACKAGE).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path.relative_to(repo))
    return files


def _file_items(repo: Path, names: Iterable[Path | str]) -> list[bytes]:
    items = []
    for name in names:
        path = repo / name
        items += [str(name).encode(), path.read_bytes() if path.is_file() else b""]
    return items


def _dpkg_architecture() -> str:
    result = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise SystemRootError(f"dpkg --print-architecture failed: {result.stderr.strip()}")
    return result.stdout.strip()


def base_key(arch: str) -> str:
    recipe = {"recipe": BASE_RECIPE, "suite": SUITE, "arch": arch, "packages": sorted(PACKAGES)}
    return _hash([json.dumps(recipe, sort_keys=True).encode()])


def venv_key(base: Path, repo: Path) -> str:
    """Hash the base root's name and the files that decide crankllm's dependencies."""
    return _hash([f"recipe {VENV_RECIPE} base {base.parent.name}".encode(), *_file_items(repo, BUILD_FILES)])


def service_key(venv: Path, spec: ServiceSpec) -> str:
    model = spec.model.stat()
    items = [
        f"recipe {SERVICE_RECIPE} venv {venv.parent.name}".encode(),
        # The model is large and changes only when it is prepared again.
        f"model {spec.model.name} {model.st_size} {model.st_mtime_ns}".encode(),
        spec.config.encode(),
        spec.dropin_name.encode(),
        spec.dropin.encode(),
        spec.unit.read_bytes(),
        *_file_items(spec.repo, _project_files(spec.repo)),
    ]
    return _hash(items)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``cache`` so that two test runs do not build at once."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached_root(cache: Path, kind: str, key: str, build: Callable[[Path, Path], None]) -> Path:
    """Return ``cache/KIND-KEY/root``, calling ``build(root, log_path)`` if it is missing.

    The build writes into a temporary folder that is renamed when complete, so an
    interrupted build is never reused.
    """
    final = cache / f"{kind}-{key}"
    if not (final / "root").is_dir():
        work = cache / f"{kind}-{key}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            build(work / "root", work / "build.log")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        work.rename(final)
    return final / "root"


@contextlib.contextmanager
def _in_use(folder: Path) -> Iterator[None]:
    """Hold a shared lock on ``folder`` so that _prune leaves it alone while a container runs from it."""
    with open(folder / USE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prune(cache: Path, current: Path) -> None:
    """Remove the other cached folders of ``current``'s kind, except those in use."""
    kind = current.name.split("-", 1)[0]
    for old in cache.glob(f"{kind}-*"):
        if old == current or not old.is_dir():
            continue
        with open(old / USE_LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("keeping the outdated cached root %s: a test run is using it", old)
                continue
            log.info("removing the outdated cached root %s", old)
            shutil.rmtree(old, ignore_errors=True)


def _run_logged(command: list[str], log_path: Path, *, timeout: float, step: str) -> None:
    """Run ``command`` with its output appended to ``log_path``. Raises SystemRootError on failure."""
    started = time.monotonic()
    with open(log_path, "ab") as output:
        output.write(f"\n$ {' '.join(command)}\n".encode())
        output.flush()
        try:
            result = subprocess.run(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise SystemRootError(f"{step} timed out after {timeout:.0f} s; see {log_path}") from None
        output.write(f"[{step}: exit status {result.returncode} after {time.monotonic() - started:.1f} s]\n".encode())
    if result.returncode != 0:
        raise SystemRootError(f"{step} failed with exit status {result.returncode}:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _copy_root(source: Path, root: Path, log_path: Path, *, hard_links: bool = False) -> None:
    command = ["cp", "-a", "--link" if hard_links else "--reflink=auto", str(source), str(root)]
    _run_logged(command, log_path, timeout=300, step="copying the root")


def _in_chroot(root: Path, command: list[str], log_path: Path, *, timeout: float = COMMAND_TIMEOUT_S) -> None:
    """Run ``command`` chrooted into ``root`` with /proc mounted and no network.

    The private mount and network namespaces end with the command, which takes the
    /proc mount with them.
    """
    script = 'root=$1; shift; mount -t proc proc "$root/proc" && exec chroot "$root" "$@"'
    environment = [
        "env", "-i", f"PATH={CONTAINER_PATH}", "HOME=/root", "LANG=C.UTF-8",
        "PIP_NO_CACHE_DIR=1", "PIP_DISABLE_PIP_VERSION_CHECK=1",
    ]
    wrapper = ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script, "sh", str(root)]
    _run_logged(wrapper + environment + command, log_path, timeout=timeout, step=command[0])


def _build_wheels(repo: Path, wheelhouse: Path, log_path: Path, *, with_dependencies: bool) -> None:
    """Build a crankllm wheel, and wheels of its dependencies if asked, with the host's pip.

    The wheel is built from a copy of the project files, so the build leaves no
    build/ folder in the repository. pip reuses the llama-cpp-python wheel it built
    before, which saves a 4-minute compile.
    """
    with tempfile.TemporaryDirectory(prefix="crankllm-source-") as scratch:
        source = Path(scratch)
        for name in _project_files(repo):
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, target)
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check"]
        if not with_dependencies:
            command.append("--no-deps")
        _run_logged(command + [str(source), "-w", str(wheelhouse)], log_path, timeout=PIP_TIMEOUT_S, step="pip wheel")


def build_base_root(cache: Path, mirror: str) -> Path:
    """Return a cached minbase root with systemd and Python, running debootstrap if needed."""
    arch = _dpkg_architecture()

    def build(root: Path, log_path: Path) -> None:
        # --force-check-gpg: fail instead of installing unverified packages when
        # the archive keyring (Debian package debian-archive-keyring) is missing.
        command = [
            "debootstrap", "--variant=minbase", "--force-check-gpg", f"--arch={arch}",
            "--include=" + ",".join(PACKAGES), SUITE, str(root), mirror,
        ]
        _run_logged(command, log_path, timeout=DEBOOTSTRAP_TIMEOUT_S, step="debootstrap")

    return _cached_root(cache, "base", base_key(arch), build)


def build_venv_root(cache: Path, base: Path, repo: Path) -> Path:
    """Return a cached copy of ``base`` with the venv, the service user and its groups.

    The venv contains crankllm and its dependencies as they were when it was built.
    build_service_root replaces crankllm with the current source.
    """

    def build(root: Path, log_path: Path) -> None:
        _copy_root(base, root, log_path)
        wheelhouse = root / WHEELHOUSE.lstrip("/")
        wheelhouse.mkdir(parents=True)
        _build_wheels(repo, wheelhouse, log_path, with_dependencies=True)
        _in_chroot(root, ["python3", "-m", "venv", VENV], log_path)
        pip = [f"{VENV}/bin/pip", "install", "--no-index", "--find-links", WHEELHOUSE, "crankllm"]
        _in_chroot(root, pip, log_path, timeout=PIP_TIMEOUT_S)
        shutil.rmtree(wheelhouse)

        present = _group_names(root)
        for group in DEVICE_GROUPS:
            if group not in present:
                _in_chroot(root, ["groupadd", "--system", group], log_path)
        useradd = [
            "useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
            "--shell", "/usr/sbin/nologin", SERVICE_USER,
        ]
        _in_chroot(root, useradd, log_path)

    return _cached_root(cache, "venv", venv_key(base, repo), build)


def _group_names(root: Path) -> set[str]:
    text = (root / "etc" / "group").read_text(encoding="utf-8")
    return {line.split(":", 1)[0] for line in text.splitlines() if line}


def build_service_root(cache: Path, venv: Path, spec: ServiceSpec) -> Path:
    """Return a cached copy of ``venv`` with the current crankllm, its config, the model and the unit."""

    def build(root: Path, log_path: Path) -> None:
        # Hard links instead of a copy save about 550 MB. That is safe only because every
        # step below creates or replaces files and none writes into an existing one:
        # pip moves the old crankllm away before writing the new one.
        _copy_root(venv, root, log_path, hard_links=True)
        wheelhouse = root / WHEELHOUSE.lstrip("/")
        wheelhouse.mkdir(parents=True)
        _build_wheels(spec.repo, wheelhouse, log_path, with_dependencies=False)
        wheels = sorted(wheelhouse.glob("crankllm-*.whl"))
        if len(wheels) != 1:
            raise SystemRootError(f"expected one crankllm wheel in {wheelhouse}, found {[w.name for w in wheels]}")
        pip = [
            f"{VENV}/bin/pip", "install", "--no-index", "--no-deps", "--force-reinstall",
            f"{WHEELHOUSE}/{wheels[0].name}",
        ]
        _in_chroot(root, pip, log_path, timeout=PIP_TIMEOUT_S)
        shutil.rmtree(wheelhouse)

        config_dir = root / CONFIG_DIR.lstrip("/")
        (config_dir / "conf.d").mkdir(parents=True)
        (config_dir / "crankllm.toml").write_text(spec.config, encoding="utf-8")
        for path in (config_dir, config_dir / "conf.d"):
            path.chmod(0o755)
        (config_dir / "crankllm.toml").chmod(0o644)

        models = root / MODELS_DIR.lstrip("/")
        models.mkdir(parents=True)
        shutil.copyfile(spec.model, models / spec.model.name)
        # Owned by the service user already, so StateDirectory= has nothing to chown
        # at start, which would copy the model up into the overlay's tmpfs.
        _in_chroot(root, ["chown", "-R", f"{SERVICE_USER}:{SERVICE_USER}", STATE_DIR], log_path)
        (root / STATE_DIR.lstrip("/")).chmod(0o750)

        unit_dir = root / UNIT_DIR.lstrip("/")
        shutil.copyfile(spec.unit, unit_dir / "crankllm.service")
        dropin_dir = unit_dir / "crankllm.service.d"
        dropin_dir.mkdir()
        (dropin_dir / spec.dropin_name).write_text(spec.dropin, encoding="utf-8")
        # Enabled as an installed appliance would be. It also keeps the unit loaded
        # after a stop: systemd unloads an inactive unit that nothing refers to, and
        # `systemctl show` then returns defaults (Result=success, ExecMainStatus=0)
        # instead of the last run's values.
        _in_chroot(root, ["systemctl", "enable", "crankllm.service"], log_path)

    return _cached_root(cache, "service", service_key(venv, spec), build)


@contextlib.contextmanager
def service_root(spec: ServiceSpec, cache: Path | None = None) -> Iterator[Path]:
    """Yield the service root for ``spec``, building each cached layer that is out of date.

    Outdated roots are removed, except one that another test run is booted from.
    """
    cache = cache or default_cache_dir()
    with contextlib.ExitStack() as stack:
        with _cache_lock(cache):
            base = build_base_root(cache, apt_mirror())
            venv = build_venv_root(cache, base, spec.repo)
            root = build_service_root(cache, venv, spec)
            stack.enter_context(_in_use(root.parent))
            for layer in (base, venv, root):
                _prune(cache, layer.parent)
        yield root


# -- throwaway cgroups --------------------------------------------------------------


def _cgroup_parents() -> list[Path]:
    """Return this process's cgroup folder in the unified and name=systemd hierarchies."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="utf-8") as file:
        for line in file:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers] = path
    parents = []
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
            before, _, after = line.partition(" - ")
            mount_point = before.split()[4]
            fstype, _, super_options = after.split()[:3]
            if fstype == "cgroup2":
                own_path = own.get("")
            elif fstype == "cgroup" and "name=systemd" in super_options.split(","):
                own_path = own.get("name=systemd")
            else:
                continue
            if own_path is None:
                continue
            folder = Path(mount_point) / own_path.lstrip("/")
            if os.access(folder, os.W_OK):
                parents.append(folder)
    return parents


CGROUP_PREFIX = "crankllm-test-"
_CGROUP_NAME = re.compile(re.escape(CGROUP_PREFIX) + r"(\d+)-[0-9a-f]+")
# From <linux/prctl.h>.
PR_SET_PDEATHSIG = 1


class ThrowawayCgroup:
    """A cgroup of the same name in each hierarchy nspawn uses, removed with everything below it.

    The name contains the creating process's PID, so that empty cgroups left by a test
    run that was killed are removed the next time.
    """

    def __init__(self):
        name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        parents = _cgroup_parents()
        for parent in parents:
            _remove_stale_cgroups(parent)
        self.folders = [parent / name for parent in parents]
        for folder in self.folders:
            folder.mkdir()

    @property
    def name(self) -> str:
        return self.folders[0].name

    def join(self) -> None:
        """Move the calling process into the cgroup (runs in the child before exec)."""
        pid = str(os.getpid()).encode()
        for folder in self.folders:
            fd = os.open(folder / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    def remove(self, timeout: float = 10.0) -> None:
        """Remove the cgroups, killing what is left in them (only the container's processes)."""
        deadline = time.monotonic() + timeout
        for folder in self.folders:
            while folder.exists():
                try:
                    _remove_cgroup_tree(folder)
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    _kill_cgroup_tree(folder)
                    time.sleep(0.1)


def _remove_stale_cgroups(parent: Path) -> None:
    for folder in parent.glob(CGROUP_PREFIX + "*"):
        match = _CGROUP_NAME.fullmatch(folder.name)
        if match is None or Path("/proc", match.group(1)).exists():
            continue
        try:
            _remove_cgroup_tree(folder)
        except OSError as exc:
            # EBUSY means processes are still in it, so it is left to the run that started them.
            log.warning("could not remove the stale cgroup %s: %s", folder, exc)


def _remove_cgroup_tree(folder: Path) -> None:
    # cgroupfs folders contain only control files, which rmdir takes along.
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        os.rmdir(dirpath)


def _kill_cgroup_tree(folder: Path) -> None:
    for dirpath, _, _ in os.walk(folder):
        try:
            pids = Path(dirpath, "cgroup.procs").read_text().split()
        except OSError:
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


# -- the booted container -----------------------------------------------------------


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces; the parent PID follows it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _command_name(pid: int) -> str:
    try:
        return Path("/proc", str(pid), "comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """A booted container: run commands in it and read its files from the host."""

    def __init__(self, nspawn: subprocess.Popen, init_pid: int, console: Path):
        self.nspawn = nspawn
        self.init_pid = init_pid
        self.console = console

    def path(self, container_path: str) -> Path:
        """Return the host path of ``container_path``, seen through the init's root."""
        return Path(f"/proc/{self.init_pid}/root") / container_path.lstrip("/")

    def run(self, *command: str, timeout: float = COMMAND_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` inside the container's namespaces with a clean environment."""
        argv = [
            "nsenter", "-t", str(self.init_pid), "-a",
            "env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0",
            *command,
        ]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise SystemRootError(
                f"`{' '.join(command)}` in the container failed with exit status {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def console_tail(self, lines: int = 40) -> str:
        return _tail(self.console, lines)

    def wait_until_running(self, timeout: float) -> str:
        """Poll ``systemctl is-system-running`` until boot is done, and return "running" or "degraded"."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise SystemRootError(
                    f"systemd-nspawn exited with status {self.nspawn.returncode} during boot:\n{self.console_tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                state = self.run("systemctl", "is-system-running", check=False, timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        raise SystemRootError(f"the container did not finish booting in {timeout:.0f} s (state {state!r}):\n{self.console_tail()}")


def _find_init(nspawn: subprocess.Popen, console: Path, timeout: float) -> int:
    """Return the PID of the container's systemd, the child of nspawn that runs it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise SystemRootError(f"systemd-nspawn exited with status {nspawn.returncode}:\n{_tail(console)}")
        for child in _children(nspawn.pid):
            if _command_name(child) == "systemd":
                return child
        time.sleep(0.05)
    raise SystemRootError(f"no systemd process under systemd-nspawn after {timeout:.0f} s:\n{_tail(console)}")


def _halt(nspawn: subprocess.Popen) -> None:
    """Halt the container with SIGTERM to nspawn, and kill nspawn if the halt takes longer than HALT_TIMEOUT_S."""
    if nspawn.poll() is not None:
        return
    nspawn.send_signal(signal.SIGTERM)
    try:
        nspawn.wait(timeout=HALT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("systemd-nspawn %d did not halt in %d s; killing it", nspawn.pid, HALT_TIMEOUT_S)
        nspawn.kill()
        nspawn.wait(timeout=HALT_TIMEOUT_S)


@contextlib.contextmanager
def booted(root: Path, workdir: Path, *, timeout: float = BOOT_TIMEOUT_S) -> Iterator[Container]:
    """Boot ``root`` with systemd as init and yield the Container once boot is done.

    The container has a private network and a volatile overlay over ``root``. It is
    halted, and its cgroups removed, when the block ends, also after an error.
    """
    console = workdir / "console.log"
    cgroup = ThrowawayCgroup()
    name = cgroup.name

    def prepare_child() -> None:
        cgroup.join()
        # nspawn halts the container on SIGTERM, and gets one if the test process dies.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")

    nspawn = None
    try:
        # nspawn cleans up /run/systemd/nspawn when it exits, which needs a tmpfs there.
        # NOTE: the /run fallback, for a host without /run/systemd, has not been run.
        scratch = "/run/systemd" if os.path.isdir("/run/systemd") else "/run"
        script = 'mount -t tmpfs -o mode=0755 tmpfs "$1" && shift && exec "$@"'
        command = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", scratch,
            "systemd-nspawn", "--directory", str(root), "--boot", f"--machine={name}",
            "--register=no", "--keep-unit", "--console=pipe",
            "--private-network", "--volatile=overlay",
        ]
        with open(console, "wb") as output:
            nspawn = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=prepare_child,
            )
        container = Container(nspawn, _find_init(nspawn, console, timeout), console)
        container.wait_until_running(timeout)
        yield container
    finally:
        try:
            if nspawn is not None:
                _halt(nspawn)
        finally:
            cgroup.remove()
