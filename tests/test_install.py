"""Tests for the Raspberry Pi installer: appliance/install_steps.py and scripts/install.sh.

The decisions are tested as pure functions. The script runs for real against a
scratch root, with stub commands first on PATH standing in for apt-get, apt-cache,
dpkg, useradd, usermod, userdel, chown and systemctl, and a stub Python whose
"virtual environment" records pip calls instead of building llama.cpp. The stubs
edit the scratch root's /etc/passwd and /etc/group as the real tools would, so the
installer's second run finds the first run's user and groups.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import install_steps as steps
from appliance.install_steps import InstallError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install.sh"
UNIT = REPO / "systemd" / "crankllm.service"
EXAMPLE = REPO / "appliance" / "data" / "crankllm.toml"
MODEL_NAME = "SmolLM2-135M-Instruct.Q2_K.gguf"


# --- apt ---------------------------------------------------------------------------

BOOKWORM_POLICY = """\
python3-venv:
  Installed: 3.11.2-1+b1
  Candidate: 3.11.2-1+b1
  Version table:
 *** 3.11.2-1+b1 500
        500 http://deb.example/debian bookworm/main arm64 Packages
        100 /var/lib/dpkg/status
cmake:
  Installed: (none)
  Candidate: 3.25.1-1
  Version table:
     3.25.1-1 500
        500 http://deb.example/debian bookworm/main arm64 Packages
python3-lgpio:
  Installed: (none)
  Candidate: 0.2.2-1~rpt1
python3-systemd:
  Installed: (none)
  Candidate: 235-1+b2
"""


def policy(installed=(), available=(), unavailable=()) -> str:
    """Return apt-cache policy text: ``installed`` and ``available`` have candidates."""
    blocks = []
    for name in list(installed) + list(available):
        version = "1.0" if name in installed else "(none)"
        blocks.append(f"{name}:\n  Installed: {version}\n  Candidate: 1.0\n")
    for name in unavailable:
        blocks.append(f"{name}:\n  Installed: (none)\n  Candidate: (none)\n")
    return "".join(blocks)


def test_apt_policy_parses_installed_and_candidate():
    states = steps.parse_apt_policy(BOOKWORM_POLICY)
    assert states["python3-venv"] == steps.PackageState("3.11.2-1+b1", "3.11.2-1+b1")
    assert states["cmake"] == steps.PackageState(None, "3.25.1-1")
    assert states["python3-lgpio"].candidate == "0.2.2-1~rpt1"


def test_apt_policy_ignores_version_table_lines():
    states = steps.parse_apt_policy(BOOKWORM_POLICY)
    assert set(states) == {"python3-venv", "cmake", "python3-lgpio", "python3-systemd"}


def test_packages_raspberry_pi_os_uses_python3_lgpio():
    text = policy(available=steps.BASE_PACKAGES + ("python3-lgpio", "liblgpio-dev", "python3-systemd"))
    plan = steps.plan_packages(steps.parse_apt_policy(text))
    assert plan.lgpio == "apt"
    assert "python3-lgpio" in plan.packages
    assert "liblgpio-dev" not in plan.packages
    assert "python3-systemd" in plan.packages


def test_packages_liblgpio_only_builds_shared():
    text = policy(available=steps.BASE_PACKAGES + ("liblgpio-dev", "swig", "python3-systemd"),
                  unavailable=("python3-lgpio",))
    plan = steps.plan_packages(steps.parse_apt_policy(text))
    assert plan.lgpio == "shared"
    assert {"liblgpio-dev", "swig"} <= set(plan.packages)


def test_packages_plain_debian_builds_static():
    # apt-cache prints no block at all for a package it does not know.
    text = policy(available=steps.BASE_PACKAGES + ("swig", "python3-systemd"))
    plan = steps.plan_packages(steps.parse_apt_policy(text))
    assert plan.lgpio == "static"
    assert "swig" in plan.packages
    assert "liblgpio-dev" not in plan.packages
    assert any("plain Debian" in note for note in plan.notes)


def test_packages_without_python3_systemd_build_it():
    text = policy(available=steps.BASE_PACKAGES + ("swig", "libsystemd-dev"))
    plan = steps.plan_packages(steps.parse_apt_policy(text))
    assert "libsystemd-dev" in plan.packages
    assert "pkg-config" in plan.packages


def test_packages_missing_lists_only_uninstalled():
    text = policy(installed=("build-essential", "python3-venv", "python3-systemd"),
                  available=("cmake", "pkg-config", "python3-dev", "i2c-tools", "swig"))
    plan = steps.plan_packages(steps.parse_apt_policy(text))
    assert plan.missing == ("cmake", "pkg-config", "python3-dev", "i2c-tools", "swig")


def test_packages_empty_lists_raise():
    with pytest.raises(InstallError, match="apt-get update"):
        steps.plan_packages(steps.parse_apt_policy(policy(unavailable=("python3-venv",))))


# --- users and groups --------------------------------------------------------------

GROUPS = "root:x:0:\ndialout:x:20:pi\ngpio:x:993:pi,crankllm\ni2c:x:994:pi\n"


def test_groups_split_present_missing_and_to_join():
    plan = steps.plan_groups(GROUPS, "crankllm", ["gpio", "i2c", "spi", "dialout"])
    assert plan.present == ("gpio", "i2c", "dialout")
    assert plan.missing == ("spi",)
    assert plan.to_join == ("i2c", "dialout")


def test_groups_member_of_all_has_nothing_to_join():
    text = "gpio:x:1:crankllm\ni2c:x:2:crankllm\n"
    assert steps.plan_groups(text, "crankllm", ["gpio", "i2c"]).to_join == ()


def test_group_file_invalid_line_raises():
    with pytest.raises(InstallError, match="invalid /etc/group line"):
        steps.parse_group_file("gpio:x\n")


def test_user_ids_found_and_absent():
    passwd = "root:x:0:0:root:/root:/bin/bash\ncrankllm:x:990:990:crankllm:/var/lib/crankllm:/usr/sbin/nologin\n"
    assert steps.user_ids(passwd, "crankllm") == (990, 990)
    assert steps.user_ids(passwd, "pi") is None


def test_unit_groups_match_the_shipped_unit():
    assert steps.unit_supplementary_groups(UNIT.read_text()) == ["gpio", "i2c", "spi", "dialout"]


def test_unit_groups_empty_assignment_resets():
    text = "SupplementaryGroups=gpio i2c\nSupplementaryGroups=\nSupplementaryGroups=dialout\n"
    assert steps.unit_supplementary_groups(text) == ["dialout"]


def test_dropin_absent_when_all_groups_exist():
    assert steps.groups_dropin(("gpio", "i2c"), ()) is None


def test_dropin_lists_only_existing_groups():
    text = steps.groups_dropin(("i2c", "dialout"), ("gpio", "spi"))
    assert "[Service]\nSupplementaryGroups=\nSupplementaryGroups=i2c dialout\n" in text
    assert steps.unit_supplementary_groups(text) == ["i2c", "dialout"]


def test_dropin_with_no_existing_group_only_resets():
    text = steps.groups_dropin((), ("gpio",))
    assert text.endswith("[Service]\nSupplementaryGroups=\n")


def test_missing_required_group_is_warning():
    (line,) = steps.describe_missing_groups(("gpio",))
    assert line.startswith("warning: group gpio does not exist")
    assert "encoder" in line
    assert "udev rule" in line


def test_missing_optional_group_is_note():
    (line,) = steps.describe_missing_groups(("spi",))
    assert line.startswith("note: group spi does not exist")
    assert "SPI display" in line


# --- config file -------------------------------------------------------------------

OLD = b"[model]\nn_ctx = 256\n"
NEW = b"[model]\nn_ctx = 512\n"
EDITED = b"[model]\nn_ctx = 1024\n"


@pytest.mark.parametrize(
    ("installed", "recorded", "pending", "expected"),
    [
        (None, None, None, "install"),
        (NEW, None, None, "unchanged"),
        (NEW, hashlib.sha256(OLD).hexdigest(), None, "unchanged"),
        (OLD, hashlib.sha256(OLD).hexdigest(), None, "upgrade"),
        (EDITED, hashlib.sha256(OLD).hexdigest(), None, "new"),
        (EDITED, None, None, "new"),
        (EDITED, None, OLD, "new"),
        (EDITED, None, NEW, "new-present"),
        (OLD, None, None, "new"),
    ],
    ids=["missing", "same", "same-with-record", "unedited-old", "edited", "edited-no-record",
         "stale-new", "new-current", "origin-unknown"],
)
def test_config_action(installed, recorded, pending, expected):
    assert steps.config_action(installed, NEW, recorded, pending) == expected


def test_config_action_record_with_newline():
    assert steps.config_action(OLD, NEW, hashlib.sha256(OLD).hexdigest() + "\n", None) == "upgrade"


# --- I2C ---------------------------------------------------------------------------


def test_config_txt_bookworm_path(tmp_path):
    (tmp_path / "boot" / "firmware").mkdir(parents=True)
    assert steps.config_txt_path(tmp_path) == tmp_path / "boot" / "firmware" / "config.txt"


def test_config_txt_older_path(tmp_path):
    (tmp_path / "boot").mkdir()
    assert steps.config_txt_path(tmp_path) == tmp_path / "boot" / "config.txt"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (False, None)),
        ("dtparam=i2c_arm=on\n", (True, None)),
        ("#dtparam=i2c_arm=on\n", (False, None)),
        ("dtparam=i2c_arm=on,i2c_arm_baudrate=400000\n", (True, 400000)),
        ("dtparam=i2c=on\ndtparam=i2c_baudrate=100000\n", (True, 100000)),
        ("dtparam=i2c_arm=on\ndtparam=i2c_arm=off\n", (False, None)),
        ("[none]\ndtparam=i2c_arm=on\n[all]\n", (False, None)),
        ("[pi4]\ndtparam=i2c_arm=on  # display\n", (True, None)),
        ("dtparam=audio=on\n", (False, None)),
    ],
    ids=["empty", "on", "commented", "baudrate", "alias", "later-wins", "none-section",
         "pi4-section", "other-param"],
)
def test_i2c_settings(text, expected):
    assert steps.i2c_settings(text) == expected


def test_i2c_settings_invalid_baudrate_raises():
    with pytest.raises(InstallError, match="i2c_arm_baudrate"):
        steps.i2c_settings("dtparam=i2c_arm_baudrate=fast\n")


def test_display_bus_defaults_and_dropins():
    assert steps.display_bus([]) == ("ssd1306", "i2c", 1)
    assert steps.display_bus([EXAMPLE.read_text()]) == ("ssd1306", "i2c", 1)
    dropin = '[display]\ndriver = "sh1106"\ni2c_port = 3\n'
    assert steps.display_bus([EXAMPLE.read_text(), dropin]) == ("sh1106", "i2c", 3)


def test_display_bus_invalid_toml_raises():
    with pytest.raises(InstallError, match="invalid TOML"):
        steps.display_bus(["[display\n"])


FIRMWARE = Path("/boot/firmware/config.txt")


def test_i2c_missing_device_advises_raspi_config():
    (warning,) = steps.i2c_warnings("ssd1306", "i2c", 1, False, FIRMWARE, None)
    assert "/dev/i2c-1 not found" in warning
    assert "sudo raspi-config nonint do_i2c 0" in warning
    assert "dtparam=i2c_arm=on" in warning
    assert "/boot/firmware/config.txt" in warning


def test_i2c_slow_bus_advises_baudrate():
    warnings = steps.i2c_warnings("ssd1306", "i2c", 1, True, FIRMWARE, "dtparam=i2c_arm=on\n")
    assert len(warnings) == 1
    assert "i2c_arm_baudrate=400000" in warnings[0]
    assert "100 kHz" in warnings[0]


def test_i2c_fast_enabled_bus_is_quiet():
    text = "dtparam=i2c_arm=on,i2c_arm_baudrate=400000\n"
    assert steps.i2c_warnings("ssd1306", "i2c", 1, True, FIRMWARE, text) == []


def test_i2c_device_without_config_line_warns():
    warnings = steps.i2c_warnings("sh1106", "i2c", 1, True, FIRMWARE, "dtparam=i2c_arm_baudrate=400000\n")
    assert warnings == [
        "/dev/i2c-1 exists but /boot/firmware/config.txt has no dtparam=i2c_arm=on; "
        "it may not survive a reboot"
    ]


def test_i2c_other_bus_names_the_port():
    (warning,) = steps.i2c_warnings("ssd1306", "i2c", 3, False, FIRMWARE, None)
    assert "i2c_port = 3" in warning


@pytest.mark.parametrize(("driver", "interface"), [("terminal", "i2c"), ("ssd1306", "spi"), ("dummy", "fake")])
def test_i2c_not_needed_is_quiet(driver, interface):
    assert steps.i2c_warnings(driver, interface, 1, False, FIRMWARE, None) == []


# --- the llama.cpp build -----------------------------------------------------------

ZERO_2_W_MEMINFO = "MemTotal:         436728 kB\nMemFree:          200000 kB\nSwapTotal:        102396 kB\n"


def test_meminfo_parses_mib():
    assert steps.parse_meminfo(ZERO_2_W_MEMINFO) == (426, 99)


def test_meminfo_without_memtotal_raises():
    with pytest.raises(InstallError, match="MemTotal"):
        steps.parse_meminfo("SwapTotal: 0 kB\n")


def test_build_plan_zero_2_w_warns_about_swap():
    plan = steps.plan_build(426, 99, 4, dphys_swapfile=True)
    assert plan.jobs == 1
    (warning,) = plan.warnings
    assert "CONF_SWAPSIZE=1024" in warning
    assert "/etc/dphys-swapfile" in warning


def test_build_plan_without_dphys_suggests_swap_file():
    (warning,) = steps.plan_build(426, 0, 4, dphys_swapfile=False).warnings
    assert "mkswap" in warning


def test_build_plan_enough_swap_is_quiet():
    assert steps.plan_build(426, 1024, 4, dphys_swapfile=True).warnings == ()


@pytest.mark.parametrize(
    ("mem_mib", "cpus", "jobs"),
    [(906, 4, 1), (1850, 4, 2), (3796, 4, 4), (7810, 4, 4), (7810, 2, 2)],
    ids=["pi4-1g", "pi4-2g", "pi4-4g", "pi5-8g", "two-cpus"],
)
def test_build_plan_jobs_fit_ram(mem_mib, cpus, jobs):
    assert steps.plan_build(mem_mib, 100, cpus, dphys_swapfile=True).jobs == jobs


def test_build_plan_invalid_cpu_count_raises():
    with pytest.raises(InstallError, match="CPU count"):
        steps.plan_build(1000, 0, 0, dphys_swapfile=False)


def test_build_time_hint_by_board():
    assert "Zero 2 W" in steps.build_time_hint("Raspberry Pi Zero 2 W Rev 1.0\x00")
    assert "Pi 4 or 5" in steps.build_time_hint("Raspberry Pi 4 Model B Rev 1.4\x00")
    assert "PC" in steps.build_time_hint("")


PI4_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd08

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd08
"""


def test_cpu_signature_stable_and_cpu_specific():
    pi4 = steps.cpu_signature(PI4_CPUINFO, "Raspberry Pi 4 Model B Rev 1.4\x00")
    assert pi4 == steps.cpu_signature(PI4_CPUINFO, "Raspberry Pi 4 Model B Rev 1.4")
    pi5_cpuinfo = PI4_CPUINFO.replace("0xd08", "0xd0b").replace("cpuid", "cpuid asimddp")
    assert steps.cpu_signature(pi5_cpuinfo, "Raspberry Pi 5 Model B Rev 1.0") != pi4


def test_cpu_signature_ignores_bogomips():
    assert steps.cpu_signature(PI4_CPUINFO) == steps.cpu_signature(PI4_CPUINFO.replace("108.00", "50.00"))


def test_pinned_version_reads_setup_cfg():
    version = steps.pinned_version((REPO / "setup.cfg").read_text(), "llama-cpp-python")
    assert version.count(".") == 2
    assert steps.pinned_version("install_requires =\n    foo == 1.2 ; python_version>'3'\n", "foo") == "1.2"


def test_pinned_version_unpinned_raises():
    with pytest.raises(InstallError, match="does not pin gpiozero"):
        steps.pinned_version((REPO / "setup.cfg").read_text(), "gpiozero")


NINJA_COMPILE = (
    "  [7/140] /usr/bin/g++ -DGGML_BUILD -O3 -MD -MT x.o -MF x.o.d -o x.o "
    "-c /tmp/pip-req-build-x/vendor/llama.cpp/ggml/src/ggml-threading.cpp\n"
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (NINJA_COMPILE, "[7/140] compiling ggml-threading.cpp"),
        ("  [10/140] : && /usr/bin/g++ -fPIC -O3 -shared -o bin/libggml-base.so x.o && :\n",
         "[10/140] linking"),
        ("  [11/140] /usr/bin/cmake -E cmake_symlink_library bin/libggml-base.so.0.25.3 bin/libggml-base.so\n",
         "[11/140] linking"),
        ("[ 12%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o\n",
         "[ 12%] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o"),
        ("  -- Found OpenMP: TRUE (found version \"4.5\")\n", None),
        ("  Collecting numpy>=1.20.0\n", None),
        ("g++: fatal error: Killed signal terminated program cc1plus\n",
         "g++: fatal error: Killed signal terminated program cc1plus"),
        ("ERROR: Failed building wheel for llama-cpp-python\n",
         "ERROR: Failed building wheel for llama-cpp-python"),
    ],
    ids=["compile", "link", "symlink", "make", "cmake-status", "pip", "oom", "pip-error"],
)
def test_progress_line(line, expected):
    assert steps.progress_line(line) == expected


# --- project source ----------------------------------------------------------------


def test_source_files_cover_the_package_only():
    files = steps.source_files(REPO)
    assert Path("setup.cfg") in files
    assert Path("appliance/install_steps.py") in files
    assert Path("appliance/data/crankllm.toml") in files
    assert not [f for f in files if "__pycache__" in f.parts or f.parts[0] in ("tests", ".venv")]


def test_source_files_outside_checkout_raise(tmp_path):
    with pytest.raises(InstallError, match="not a crankllm checkout"):
        steps.source_files(tmp_path)


def test_source_digest_follows_content(tmp_path):
    (tmp_path / "appliance").mkdir()
    (tmp_path / "setup.cfg").write_text("[metadata]\n")
    (tmp_path / "appliance" / "a.py").write_text("A = 1\n")
    before = steps.source_digest(tmp_path)
    (tmp_path / "appliance" / "__pycache__").mkdir()
    (tmp_path / "appliance" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert steps.source_digest(tmp_path) == before
    (tmp_path / "appliance" / "a.py").write_text("A = 2\n")
    assert steps.source_digest(tmp_path) != before


def test_copy_source_copies_installable_files(tmp_path):
    steps.copy_source(REPO, tmp_path / "copy")
    assert (tmp_path / "copy" / "setup.cfg").read_bytes() == (REPO / "setup.cfg").read_bytes()
    assert (tmp_path / "copy" / "appliance" / "data" / "crankllm.toml").is_file()
    assert not (tmp_path / "copy" / "tests").exists()


# --- platform and summary ----------------------------------------------------------

RPI_OS_BOOKWORM = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_CODENAME=bookworm\n'


def test_platform_bookworm_arm64_is_quiet():
    assert steps.check_platform(RPI_OS_BOOKWORM, "arm64") == []


def test_platform_trixie_is_quiet():
    trixie = RPI_OS_BOOKWORM.replace("bookworm", "trixie").replace("12", "13")
    assert steps.check_platform(trixie, "arm64") == []


def test_platform_32_bit_raises():
    with pytest.raises(InstallError, match="64-bit Raspberry Pi OS"):
        steps.check_platform(RPI_OS_BOOKWORM, "armhf")


def test_platform_not_debian_raises():
    with pytest.raises(InstallError, match="needs Debian"):
        steps.check_platform('PRETTY_NAME="Fedora Linux 40"\nID=fedora\n', "arm64")


def test_platform_older_release_warns():
    bullseye = RPI_OS_BOOKWORM.replace("bookworm", "bullseye").replace("12", "11")
    (warning,) = steps.check_platform(bullseye, "arm64")
    assert "untested" in warning


def test_platform_debian_derivative_accepted():
    ubuntu = 'PRETTY_NAME="Ubuntu 24.04"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n'
    assert len(steps.check_platform(ubuntu, "arm64")) == 1


def summary(**overrides) -> str:
    values = dict(
        root="/", venv="/opt/crankllm/venv", config="/etc/crankllm/crankllm.toml",
        config_state="install", unit="/etc/systemd/system/crankllm.service",
        model="/var/lib/crankllm/models/", transcripts="/var/lib/crankllm/transcripts",
        warnings=[],
    )
    values.update(overrides)
    return steps.summary_text(**values)


def test_summary_names_paths_and_commands():
    text = summary()
    assert text.startswith("crankllm is installed.")
    assert "/etc/crankllm/crankllm.toml (installed)" in text
    assert "sudo systemctl start crankllm" in text
    assert "journalctl -u crankllm -f" in text
    assert "sudo systemctl stop crankllm" in text
    assert "/opt/crankllm/venv/bin/crankllm config check" in text
    assert "Before you start it" not in text


def test_summary_lists_warnings_and_new_config():
    text = summary(config_state="new", warnings=["/dev/i2c-1 not found"])
    assert "the new example is /etc/crankllm/crankllm.toml.new" in text
    assert "Before you start it:\n  - /dev/i2c-1 not found\n" in text


def test_summary_with_root_prefixes_files_not_commands():
    text = summary(root="/tmp/scratch/", dry_run=True, model=None)
    assert text.startswith("crankllm dry run")
    assert "/tmp/scratch/etc/crankllm/crankllm.toml" in text
    assert "  check the config   /opt/crankllm/venv/bin/crankllm config check" in text
    assert "not prepared" in text


def test_summary_unknown_state_raises():
    with pytest.raises(InstallError, match="config state"):
        summary(config_state="merged")


def test_cli_packages_reads_stdin(monkeypatch, capsys):
    text = policy(installed=("python3-venv",), available=("cmake", "python3-systemd", "python3-lgpio"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert steps.main(["packages"]) == 0
    missing, mode = capsys.readouterr().out.splitlines()[:2]
    assert "cmake" in missing.split()
    assert "python3-venv" not in missing.split()
    assert mode == "apt"


def test_cli_error_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert steps.main(["packages"]) == 2
    assert "apt-get update" in capsys.readouterr().err


def test_cli_user_ids_absent_exits_1(tmp_path, capsys):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert steps.main(["user-ids", str(passwd), "crankllm"]) == 1
    assert capsys.readouterr().out == ""


# --- scripts/install.sh against a scratch root -------------------------------------

# One Python program plays every stubbed command; the wrappers on PATH pass it their
# name and their own path. Calls are logged as JSON lines to $STUB_LOG.
STUB_PROGRAM = r'''
import json, os, sys
from pathlib import Path

name, self_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
state = Path(os.environ["STUB_STATE"])
stub_bin = Path(os.environ["STUB_BIN"])
entry = {"cmd": name, "args": args}
if os.environ.get("PYPI"):
    entry["PYPI"] = os.environ["PYPI"]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\n")

def take_prefix(args):
    if args and args[0] == "--prefix":
        return Path(args[1]), args[2:]
    return Path("/nonexistent-real-root"), args

def edit_groups(root, change):
    path = root / "etc" / "group"
    lines = []
    for line in path.read_text().splitlines():
        parts = line.split(":")
        members = [m for m in parts[3].split(",") if m]
        result = change(parts[0], members)
        if result is not None:
            parts[3] = ",".join(result)
            lines.append(":".join(parts))
    path.write_text("".join(l + "\n" for l in lines))

if name == "dpkg":
    print("arm64")
elif name == "apt-cache":
    installed_file = state / "apt-installed"
    installed = set(installed_file.read_text().split()) if installed_file.exists() else set()
    unavailable = set(os.environ.get("STUB_APT_UNAVAILABLE", "").split())
    for package in args[1:]:
        if package in unavailable:
            continue
        version = "1.0" if package in installed else "(none)"
        print(f"{package}:\n  Installed: {version}\n  Candidate: 1.0")
elif name == "apt-get":
    if args[0] == "install":
        installed_file = state / "apt-installed"
        old = installed_file.read_text() if installed_file.exists() else ""
        new = [a for a in args[1:] if not a.startswith("-")]
        installed_file.write_text(old + "".join(p + "\n" for p in new))
elif name == "useradd":
    root, rest = take_prefix(args)
    user = rest[-1]
    with open(root / "etc" / "passwd", "a") as passwd:
        passwd.write(f"{user}:x:990:990:crankllm appliance:/var/lib/crankllm:/usr/sbin/nologin\n")
    with open(root / "etc" / "group", "a") as group:
        group.write(f"{user}:x:990:\n")
elif name == "usermod":
    root, rest = take_prefix(args)
    joined = rest[rest.index("--groups") + 1].split(",")
    user = rest[-1]
    edit_groups(root, lambda g, m: m + [user] if g in joined and user not in m else m)
elif name == "userdel":
    root, rest = take_prefix(args)
    user = rest[-1]
    passwd = root / "etc" / "passwd"
    passwd.write_text("".join(l + "\n" for l in passwd.read_text().splitlines()
                              if l.split(":")[0] != user))
    edit_groups(root, lambda g, m: None if g == user else [x for x in m if x != user])
elif name == "systemctl":
    root = Path("/nonexistent-real-root")
    rest = list(args)
    if rest and rest[0].startswith("--root="):
        root = Path(rest.pop(0)[len("--root="):])
    link = root / "etc/systemd/system/multi-user.target.wants/crankllm.service"
    verb = rest[0]
    if verb == "enable":
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/etc/systemd/system/crankllm.service")
    elif verb == "disable":
        link.unlink()
        if not any(link.parent.iterdir()):
            link.parent.rmdir()
    elif verb == "is-enabled":
        sys.exit(0 if link.is_symlink() else 1)
    elif verb == "is-active":
        sys.exit(3)
elif name == "python-for-venv":
    # python -m venv [--system-site-packages] DIR
    venv = Path(args[-1])
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
    wrapper = venv / "bin" / "python"
    wrapper.write_text((stub_bin / "venv-python").read_text())
    wrapper.chmod(0o755)
elif name == "venv-python":
    venv_bin = Path(self_path).parent
    if args[:3] == ["-m", "pip", "install"]:
        if any(a.startswith("llama-cpp-python==") for a in args):
            print("  [1/2] /usr/bin/gcc -O3 -o ggml.c.o -c /tmp/src/ggml/src/ggml.c")
            print("  [2/2] : && /usr/bin/g++ -shared -o bin/libggml.so ggml.c.o && :")
        project = [a for a in args if a.endswith("[pi]")]
        if project:
            if not Path(project[0][:-4], "setup.cfg").is_file():
                sys.exit("stub pip: the staged source has no setup.cfg")
            crankllm = venv_bin / "crankllm"
            crankllm.write_text((stub_bin / "crankllm").read_text())
            crankllm.chmod(0o755)
elif name == "crankllm":
    if args[:2] == ["model", "prepare"]:
        print("warning: blk.0.attn_k.weight - ncols 576 not divisible by 256 "
              "(required for type q2_K) -> falling back to q4_0", file=sys.stderr)
        print("bits per weight: 5.14", file=sys.stderr)
        models = Path(os.environ["STATE_DIRECTORY"]) / "models"
        models.mkdir(parents=True, exist_ok=True)
        model = models / "SmolLM2-135M-Instruct.Q2_K.gguf"
        if not model.exists():
            model.write_bytes(b"GGUF")
'''

STUB_NAMES = ("dpkg", "apt-cache", "apt-get", "useradd", "usermod", "userdel", "systemctl",
              "chown", "python-for-venv", "venv-python", "crankllm")


class Installer:
    """scripts/install.sh bound to one scratch root and one set of stubs."""

    def __init__(self, tmp_path: Path):
        # A copy of the checkout, so edits made to the repository while the tests run
        # cannot change the source digest between two runs.
        self.checkout = tmp_path / "checkout"
        steps.copy_source(REPO, self.checkout)
        for relative in ("scripts/install.sh", "systemd/crankllm.service"):
            (self.checkout / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, self.checkout / relative)
        self.root = tmp_path / "root"
        self.bin = tmp_path / "bin"
        self.state = tmp_path / "state"
        self.log = tmp_path / "calls.jsonl"
        self.tmp = tmp_path / "tmp"
        self.unavailable = "python3-lgpio liblgpio-dev"
        for folder in (self.root, self.bin, self.state, self.tmp):
            folder.mkdir()
        program = self.bin / "stub.py"
        program.write_text(STUB_PROGRAM)
        for name in STUB_NAMES:
            wrapper = self.bin / name
            wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{program}" {name} "$0" "$@"\n')
            wrapper.chmod(0o755)
        self._make_root()

    def _make_root(self):
        etc = self.root / "etc"
        etc.mkdir()
        (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
        # Raspberry Pi OS has all four device groups; spi is left out to exercise
        # the missing-group path.
        (etc / "group").write_text("root:x:0:\ndialout:x:20:\ngpio:x:993:\ni2c:x:994:\n")
        (etc / "os-release").write_text(RPI_OS_BOOKWORM)
        firmware = self.root / "boot" / "firmware"
        firmware.mkdir(parents=True)
        (firmware / "config.txt").write_text("dtparam=audio=on\n")

    def run(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        env = {
            key: value for key, value in os.environ.items()
            if key not in ("CRANKLLM_ROOT", "CMAKE_ARGS", "CMAKE_BUILD_PARALLEL_LEVEL", "PYPI")
        }
        env.update(
            PATH=f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}",
            CRANKLLM_PYTHON=str(self.bin / "python-for-venv"),
            STUB_BIN=str(self.bin),
            STUB_STATE=str(self.state),
            STUB_LOG=str(self.log),
            STUB_APT_UNAVAILABLE=self.unavailable,
            TMPDIR=str(self.tmp),
        )
        if self.log.exists():
            self.log.unlink()
        result = subprocess.run(
            ["bash", str(self.checkout / "scripts" / "install.sh"), "--root", str(self.root), *args],
            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == expect, result.stdout + result.stderr
        return result

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def commands(self, name: str) -> list[list[str]]:
        return [call["args"] for call in self.calls() if call["cmd"] == name]

    def snapshot(self) -> dict[str, tuple]:
        """Map every path under the root to its type, mode and content digest."""
        tree = {}
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(folder, name)
                info = path.lstat()
                relative = str(path.relative_to(self.root))
                if stat.S_ISLNK(info.st_mode):
                    tree[relative] = ("link", os.readlink(path))
                elif stat.S_ISDIR(info.st_mode):
                    tree[relative] = ("dir", stat.S_IMODE(info.st_mode))
                else:
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    tree[relative] = ("file", stat.S_IMODE(info.st_mode), digest)
        return tree

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture
def installer(tmp_path):
    return Installer(tmp_path)


CONFIG = "etc/crankllm/crankllm.toml"
UNIT_PATH = "etc/systemd/system/crankllm.service"
DROPIN = "etc/systemd/system/crankllm.service.d/10-install-groups.conf"
WANTS = "etc/systemd/system/multi-user.target.wants/crankllm.service"
VENV = "opt/crankllm/venv"


def test_script_passes_bash_syntax_check():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_install_writes_config_unit_and_model(installer):
    result = installer.run()
    assert installer.path(CONFIG).read_bytes() == EXAMPLE.read_bytes()
    assert installer.path(UNIT_PATH).read_bytes() == UNIT.read_bytes()
    assert os.readlink(installer.path(WANTS)) == "/etc/systemd/system/crankllm.service"
    assert installer.path(f"var/lib/crankllm/models/{MODEL_NAME}").is_file()
    assert installer.path(f"{VENV}/bin/crankllm").is_file()
    assert stat.S_IMODE(installer.path("var/lib/crankllm").stat().st_mode) == 0o750
    assert "crankllm is installed." in result.stdout
    assert "journalctl -u crankllm -f" in result.stdout


def test_install_leaves_no_temporary_files(installer):
    installer.run()
    installer.run("--dry-run")
    installer.run("--uninstall")
    assert list(installer.tmp.iterdir()) == []


def test_install_hides_per_tensor_fallback_lines(installer):
    result = installer.run()
    assert "bits per weight: 5.14" in result.stdout
    assert "falling back" not in result.stdout + result.stderr


def test_install_creates_system_user(installer):
    installer.run()
    (useradd,) = installer.commands("useradd")
    assert useradd[:2] == ["--prefix", str(installer.root)]
    assert "--system" in useradd
    assert useradd[useradd.index("--home-dir") + 1] == "/var/lib/crankllm"
    assert useradd[useradd.index("--shell") + 1] == "/usr/sbin/nologin"
    assert useradd[-1] == "crankllm"


def test_install_joins_existing_groups_only(installer):
    result = installer.run()
    (usermod,) = installer.commands("usermod")
    assert usermod[usermod.index("--groups") + 1] == "gpio,i2c,dialout"
    groups = steps.parse_group_file(installer.path("etc/group").read_text())
    assert "crankllm" in groups["gpio"]
    assert "group spi does not exist" in result.stdout
    assert "group spi" not in result.stderr


def test_install_limits_unit_groups_to_existing(installer):
    installer.run()
    text = installer.path(DROPIN).read_text()
    assert steps.unit_supplementary_groups(UNIT.read_text() + text) == ["gpio", "i2c", "dialout"]


def test_install_removes_dropin_once_groups_exist(installer):
    installer.run()
    with open(installer.path("etc/group"), "a") as group:
        group.write("spi:x:995:\n")
    installer.run()
    assert not installer.path(DROPIN).exists()
    assert not installer.path(DROPIN).parent.exists()
    assert installer.commands("usermod") == [["--prefix", str(installer.root), "--append", "--groups", "spi", "crankllm"]]


def test_install_builds_llama_with_native_flags(installer):
    result = installer.run()
    (build,) = [args for args in installer.commands("venv-python") if "llama-cpp-python==0.3.36" in args]
    assert "--no-cache-dir" in build
    assert "--force-reinstall" not in build
    assert "    [1/2] compiling ggml.c" in result.stdout
    assert "    [2/2] linking" in result.stdout
    assert not installer.path("var/tmp/crankllm-build").exists()


def test_install_plain_debian_builds_lgpio_static(installer):
    installer.run()
    (apt_install,) = installer.commands("apt-get")[1:]
    assert "swig" in apt_install
    assert "python3-lgpio" not in apt_install
    (project,) = [call for call in installer.calls()
                  if call["cmd"] == "venv-python" and any(a.endswith("[pi]") for a in call["args"])]
    assert project.get("PYPI") == "1"


def test_install_raspberry_pi_os_uses_apt_lgpio(installer):
    installer.unavailable = ""
    installer.run()
    apt_calls = installer.commands("apt-get")
    assert apt_calls[0] == ["update"]
    assert "python3-lgpio" in apt_calls[1]
    assert "liblgpio-dev" not in apt_calls[1]


def test_install_liblgpio_builds_shared(installer):
    installer.unavailable = "python3-lgpio"
    installer.run()
    (apt_install,) = installer.commands("apt-get")[1:]
    assert "liblgpio-dev" in apt_install
    (project,) = [call for call in installer.calls()
                  if call["cmd"] == "venv-python" and any(a.endswith("[pi]") for a in call["args"])]
    assert "PYPI" not in project


def test_install_warns_about_i2c(installer):
    result = installer.run()
    assert "/dev/i2c-1 not found" in result.stdout
    assert "sudo raspi-config nonint do_i2c 0" in result.stdout
    assert "/boot/firmware/config.txt" in result.stdout


def test_install_twice_changes_nothing(installer):
    installer.run()
    first = installer.snapshot()
    result = installer.run()
    assert installer.snapshot() == first
    ran = {call["cmd"] for call in installer.calls()}
    for command in ("apt-get", "useradd", "usermod", "python-for-venv"):
        assert command not in ran, result.stdout
    assert not [args for args in installer.commands("venv-python") if args[:3] == ["-m", "pip", "install"]]
    assert ["--root=" + str(installer.root), "enable", "crankllm"] not in installer.commands("systemctl")
    assert "it is built for this CPU" in result.stdout


def test_install_rebuilds_llama_for_another_cpu(installer):
    installer.run()
    installer.path(f"{VENV}/.crankllm-llama").write_text("llama-cpp-python==0.3.36 cpu=other")
    installer.run()
    (build,) = [args for args in installer.commands("venv-python") if "llama-cpp-python==0.3.36" in args]
    assert "--force-reinstall" in build


def test_install_reinstalls_project_after_source_change(installer):
    installer.run()
    installer.path(f"{VENV}/.crankllm-project").write_text("an older checkout")
    installer.run()
    assert [args for args in installer.commands("venv-python") if any(a.endswith("[pi]") for a in args)]


def test_install_keeps_edited_config(installer):
    installer.run()
    edited = EXAMPLE.read_text() + "\n# local change\n"
    installer.path(CONFIG).write_text(edited)
    result = installer.run()
    assert installer.path(CONFIG).read_text() == edited
    assert installer.path(CONFIG + ".new").read_bytes() == EXAMPLE.read_bytes()
    assert "was edited, so it is kept" in result.stderr
    assert "the new example is" in result.stdout
    snapshot = installer.snapshot()
    installer.run()
    assert installer.snapshot() == snapshot


def test_install_upgrades_unedited_old_config(installer):
    installer.run()
    old = b"# the example of an older release\n"
    installer.path(CONFIG).write_bytes(old)
    installer.path("opt/crankllm/crankllm.toml.sha256").write_text(hashlib.sha256(old).hexdigest() + "\n")
    installer.run()
    assert installer.path(CONFIG).read_bytes() == EXAMPLE.read_bytes()
    assert not installer.path(CONFIG + ".new").exists()


def test_install_skip_model(installer):
    result = installer.run("--skip-model")
    assert not list(installer.path("var/lib/crankllm/models").glob("*.gguf"))
    assert "not prepared (--skip-model)" in result.stdout


def test_dry_run_changes_nothing(installer):
    before = installer.snapshot()
    result = installer.run("--dry-run")
    assert installer.snapshot() == before
    assert "would run: useradd" in result.stdout
    assert f"would write {installer.root}/{CONFIG}" in result.stdout
    ran = {call["cmd"] for call in installer.calls()}
    assert ran <= {"dpkg", "apt-cache", "systemctl"}
    assert "crankllm dry run: nothing was changed." in result.stdout


def test_uninstall_keeps_config_and_transcripts(installer):
    installer.run()
    transcript = installer.path("var/lib/crankllm/transcripts/2026-01-01T000000.txt")
    transcript.parent.mkdir()
    transcript.write_text("Once upon a time\n")
    result = installer.run("--uninstall")
    assert installer.path(CONFIG).is_file()
    assert transcript.read_text() == "Once upon a time\n"
    for removed in (UNIT_PATH, DROPIN, WANTS, "opt/crankllm", "var/lib/crankllm/models"):
        assert not installer.path(removed).exists(), removed
    assert steps.user_ids(installer.path("etc/passwd").read_text(), "crankllm") is None
    assert "crankllm" not in steps.parse_group_file(installer.path("etc/group").read_text())
    assert ["--root=" + str(installer.root), "disable", "crankllm"] in installer.commands("systemctl")
    assert "--purge" in result.stdout


def test_uninstall_twice_is_quiet(installer):
    installer.run()
    installer.run("--uninstall")
    snapshot = installer.snapshot()
    installer.run("--uninstall")
    assert installer.snapshot() == snapshot
    assert installer.commands("userdel") == []


def test_purge_removes_config_and_transcripts(installer):
    installer.run()
    transcript = installer.path("var/lib/crankllm/transcripts/story.txt")
    transcript.parent.mkdir()
    transcript.write_text("text\n")
    installer.run("--purge")
    assert not installer.path("etc/crankllm").exists()
    assert not installer.path("var/lib/crankllm").exists()
    assert not installer.path("opt/crankllm").exists()


def test_reinstall_after_uninstall_keeps_config(installer):
    installer.run()
    edited = EXAMPLE.read_text() + "\n# local change\n"
    installer.path(CONFIG).write_text(edited)
    installer.run("--uninstall")
    installer.run()
    assert installer.path(CONFIG).read_text() == edited
    assert installer.path(CONFIG + ".new").is_file()


def test_unknown_option_exits_64(installer):
    result = installer.run("--frobnicate", expect=64)
    assert "unknown option --frobnicate" in result.stderr


def test_relative_root_rejected(installer):
    result = subprocess.run(
        ["bash", str(SCRIPT), "--root", "relative/dir", "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "absolute path" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="the root check passes when the tests run as root")
def test_non_root_real_install_rejected():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "run this as root" in result.stderr


def test_command_linked_onto_path(installer):
    installer.run()
    link = installer.path("usr/local/bin/crankllm")
    assert link.is_symlink()
    assert os.readlink(link) == "/opt/crankllm/venv/bin/crankllm"
    installer.run("--uninstall")
    assert not link.is_symlink()
