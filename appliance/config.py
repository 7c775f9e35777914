"""Configuration: built-in defaults, TOML layering and validation.

The effective configuration is the built-in defaults, overlaid by the main file
(/etc/crankllm/crankllm.toml unless ``--config`` or CRANKLLM_CONFIG names another) and
then by the drop-ins ``*.toml`` in the ``conf.d`` folder beside the main file, in
lexical order. A later file replaces the values it sets, key by key; an array such as
``[prompts] list`` is replaced whole, never concatenated.

Loading is a pure function of the files and the environment it is given: it reads the
config files and ``[prompts] file``, checks that ``[model] path`` exists, and never
creates, moves, writes or deletes anything.
"""

from __future__ import annotations

import difflib
import math
import os
import pwd
import re
import tomllib
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any, Callable, Mapping

from appliance.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/crankllm/crankllm.toml"
CONFIG_ENV = "CRANKLLM_CONFIG"
DROPIN_DIR = "conf.d"
BUILTIN = "built-in default"
OVERRIDES = "command-line override"

# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


class _Invalid(Exception):
    """A failed value check: ``problem`` describes the fault and ``expected`` the values that fit."""

    def __init__(self, problem: str, expected: str):
        super().__init__(problem)
        self.problem = problem
        self.expected = expected


# --- TOML text ------------------------------------------------------------------------

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    parts = []
    for char in text:
        if char in _TOML_ESCAPES:
            parts.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            parts.append(f"\\u{ord(char):04X}")
        else:
            parts.append(char)
    return '"' + "".join(parts) + '"'


def _toml_value(value: Any) -> str:
    """Format a value as TOML, as used in error messages and ``render_config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return str(value)


# --- Checks for single values -------------------------------------------------------
#
# Each check takes the TOML value and the directory of the file it came from (for
# relative paths) and returns the normalised value or raises _Invalid.

Check = Callable[[Any, str], Any]


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return type(value).__name__


def _wrong_type(value: Any, expected: str) -> _Invalid:
    return _Invalid(f"{_type_name(value)} is the wrong type", expected)


def _is_integer(value: Any) -> bool:
    # TOML booleans load as Python bools, which are ints too.
    return isinstance(value, int) and not isinstance(value, bool)


def _range_text(low: float | None, high: float | None, *, above: bool = False) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f"greater than {low}" if above else f"{low} or more"
    return f"{high} or less"


def _integer(low: int | None = None, high: int | None = None) -> Check:
    expected = f"an integer {_range_text(low, high)}" if (low, high) != (None, None) else "an integer"

    def check(value: Any, _base: str) -> int:
        if not _is_integer(value):
            raise _wrong_type(value, expected)
        if (low is not None and value < low) or (high is not None and value > high):
            raise _Invalid("out of range", expected)
        return value

    return check


def _number(low: float | None = None, high: float | None = None, *, above: bool = False) -> Check:
    """Check a float; ``above`` makes ``low`` exclusive. Integers are accepted."""
    expected = f"a number {_range_text(low, high, above=above)}"

    def check(value: Any, _base: str) -> float:
        if not (_is_integer(value) or isinstance(value, float)):
            raise _wrong_type(value, expected)
        number = float(value)
        if not math.isfinite(number):
            raise _Invalid("not a finite number", expected)
        too_low = low is not None and (number <= low if above else number < low)
        too_high = high is not None and number > high
        if too_low or too_high:
            raise _Invalid("out of range", expected)
        return number

    return check


def _boolean() -> Check:
    def check(value: Any, _base: str) -> bool:
        if not isinstance(value, bool):
            raise _wrong_type(value, "true or false")
        return value

    return check


def _string(*, nonempty: bool = False) -> Check:
    expected = "a non-empty string" if nonempty else "a string"

    def check(value: Any, _base: str) -> str:
        if not isinstance(value, str):
            raise _wrong_type(value, expected)
        if nonempty and not value:
            raise _Invalid("empty", expected)
        return value

    return check


def _choice(*options: Any) -> Check:
    expected = "one of " + ", ".join(_toml_value(option) for option in options)

    def check(value: Any, _base: str) -> Any:
        for option in options:
            # Compare types too, so that true does not match 1 and 2.0 does not match 2.
            if type(value) is type(option) and value == option:
                return value
        if not any(type(value) is type(option) for option in options):
            raise _wrong_type(value, expected)
        raise _Invalid("not a valid choice", expected)

    return check


def _path(*, allow_empty: bool = True) -> Check:
    """Check a file system path; a relative path is taken from the config file's folder."""
    expected = "a file path" + (' or ""' if allow_empty else "")

    def check(value: Any, base: str) -> str:
        if not isinstance(value, str):
            raise _wrong_type(value, expected)
        if not value:
            if allow_empty:
                return value
            raise _Invalid("empty", expected)
        if "\0" in value:
            raise _Invalid("contains a NUL character", expected)
        return os.path.normpath(os.path.join(base, value))

    return check


def _seed() -> Check:
    # llama.cpp's samplers take a uint32 seed and treat 0xFFFFFFFF (LLAMA_DEFAULT_SEED)
    # as "pick a random seed", so the largest fixed seed is one less.
    high = 0xFFFFFFFF - 1
    expected = f'an integer from 0 to {high} or "random"'

    def check(value: Any, _base: str) -> int | str:
        if value == "random":
            return value
        if isinstance(value, str):
            raise _Invalid("not a valid choice", expected)
        if not _is_integer(value):
            raise _wrong_type(value, expected)
        if not 0 <= value <= high:
            raise _Invalid("out of range", expected)
        return value

    return check


def _buffer_types() -> Check:
    expected = '"auto", true or false'

    def check(value: Any, _base: str) -> bool | str:
        if isinstance(value, bool) or value == "auto":
            return value
        if isinstance(value, str):
            raise _Invalid("not a valid choice", expected)
        raise _wrong_type(value, expected)

    return check


def _prompt_list() -> Check:
    expected = "an array of non-empty strings"

    def check(value: Any, _base: str) -> list[str]:
        if not isinstance(value, list):
            raise _wrong_type(value, expected)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise _Invalid(f"item {index} is {_type_name(item)}", expected)
            if not item.strip():
                raise _Invalid(f"item {index} is empty", expected)
        return list(value)

    return check


# The 40-pin header of every Raspberry Pi since the B+ (and its 26-pin predecessor's
# first 26 pins): physical pin number -> BCM GPIO number.
HEADER_PINS = {
    3: 2, 5: 3, 7: 4, 8: 14, 10: 15, 11: 17, 12: 18, 13: 27, 15: 22, 16: 23, 18: 24,
    19: 10, 21: 9, 22: 25, 23: 11, 24: 8, 26: 7, 27: 0, 28: 1, 29: 5, 31: 6, 32: 12,
    33: 13, 35: 19, 36: 16, 37: 26, 38: 20, 40: 21,
}
# wiringPi pin number -> BCM GPIO number, for gpiozero's "WPIn" names.
WIRINGPI_PINS = {
    0: 17, 1: 18, 2: 27, 3: 22, 4: 23, 5: 24, 6: 25, 7: 4, 8: 2, 9: 3, 10: 8, 11: 7,
    12: 10, 13: 9, 14: 11, 15: 14, 16: 15, 21: 5, 22: 6, 23: 13, 24: 19, 25: 26,
    26: 12, 27: 16, 28: 20, 29: 21, 30: 0, 31: 1,
}
# NOTE: Compute Modules bring GPIO28-45 out on their SODIMM edge, and gpiozero accepts
# those names there. This check covers the 40-pin header only.
MAX_HEADER_GPIO = 27
_PIN_EXPECTED = (
    "a gpiozero pin name on the 40-pin header (GPIO0..GPIO27, BCMn, BOARDn, J8:n, "
    "WPIn) or a BCM number from 0 to 27"
)
_PIN_NAME = re.compile(r"(GPIO|BCM|BOARD|J8:|P1:|WPI)?(\d+)")


def gpio_number(pin: int | str) -> int | None:
    """Return the BCM GPIO number a gpiozero pin name refers to, or None if unknown."""
    if _is_integer(pin):
        return pin if 0 <= pin <= MAX_HEADER_GPIO else None
    match = _PIN_NAME.fullmatch(pin) if isinstance(pin, str) else None
    if match is None:
        return None
    prefix, number = match.group(1), int(match.group(2))
    if prefix in (None, "GPIO", "BCM"):
        return number if number <= MAX_HEADER_GPIO else None
    if prefix == "WPI":
        return WIRINGPI_PINS.get(number)
    return HEADER_PINS.get(number)


def _pin() -> Check:
    def check(value: Any, _base: str) -> int | str:
        if not (_is_integer(value) or isinstance(value, str)):
            raise _wrong_type(value, _PIN_EXPECTED)
        if gpio_number(value) is None:
            raise _Invalid("not a GPIO pin name", _PIN_EXPECTED)
        return value

    return check


def _i2c_address() -> Check:
    # 7-bit addresses 0x00-0x02 and 0x78-0x7F are reserved by the I2C specification.
    low, high = 0x03, 0x77
    expected = f'an I2C address from 0x{low:02X} to 0x{high:02X} (integer or "0x3C" string) or "auto"'

    def check(value: Any, _base: str) -> int | str:
        if value == "auto":
            return value
        if isinstance(value, str):
            if not re.fullmatch(r"0[xX][0-9A-Fa-f]{1,2}", value):
                raise _Invalid("not a hexadecimal address", expected)
            value = int(value, 16)
        elif not _is_integer(value):
            raise _wrong_type(value, expected)
        if not low <= value <= high:
            raise _Invalid("out of range", expected)
        return value

    return check


# --- The schema --------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One configuration key: its built-in default and the check for its values."""

    default: Any
    check: Check


DEFAULT_PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Describe a city where it never stops raining.",
    "Write a letter from a clockwork robot to the person who built it.",
    "Explain how a steam engine works, as a grandmother would to a child.",
    "Tell me about the last dragon living in the mountains.",
]

DISPLAY_DRIVERS = (
    "ssd1306", "ssd1309", "ssd1315", "sh1106", "sh1107", "terminal", "png", "gif", "dummy",
)
# Drivers that talk to a panel over I2C or SPI, as opposed to the emulators.
HARDWARE_DISPLAY_DRIVERS = ("ssd1306", "ssd1309", "ssd1315", "sh1106", "sh1107")
FILE_DISPLAY_DRIVERS = ("png", "gif")

# luma.core's spi interface accepts only these bus speeds (luma.core 2.x).
SPI_BUS_SPEEDS_HZ = tuple(
    int(mhz * 1_000_000)
    for mhz in (0.5, 1, 2, 4, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48, 50, 52)
)
# The rates Linux termios has a Bnnn constant for.
BAUDRATES = (
    50, 75, 110, 134, 150, 200, 300, 600, 1200, 1800, 2400, 4800, 9600, 19200, 38400,
    57600, 115200, 230400, 460800, 500000, 576000, 921600, 1000000, 1152000, 1500000,
    2000000, 2500000, 3000000, 3500000, 4000000,
)

SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "path": Key("", _path()),
        "prompt_format": Key("chat", _choice("chat", "raw")),
        "n_ctx": Key(512, _integer(16, 131072)),
        "n_threads": Key(0, _integer(0)),
        "n_batch": Key(64, _integer(1)),
        "temperature": Key(0.8, _number(0)),
        "top_k": Key(40, _integer(0)),
        "top_p": Key(0.95, _number(0, 1)),
        "min_p": Key(0.05, _number(0, 1)),
        "repeat_penalty": Key(1.1, _number(0, above=True)),
        "repeat_last_n": Key(64, _integer(0)),
        "seed": Key("random", _seed()),
        "context_policy": Key("shift", _choice("shift", "restart", "stop")),
        "end_policy": Key("stop", _choice("stop", "restart")),
        "extra_buffer_types": Key("auto", _buffer_types()),
    },
    "crank": {
        "source": Key("gpio", _choice("gpio", "serial")),
        "pin_factory": Key("lgpio", _choice("lgpio", "rpigpio", "native", "mock")),
        "gpiochip": Key(0, _integer(0)),
        "pin_a": Key("GPIO17", _pin()),
        "pin_b": Key("GPIO18", _pin()),
        "pin_button": Key("GPIO27", _pin()),
        "pull_up": Key(True, _boolean()),
        "invert": Key(False, _boolean()),
        "transitions_per_detent": Key(4, _choice(4, 2)),
        "detents_per_token": Key(1, _integer(1)),
        "tokens_per_detent": Key(1, _integer(1)),
        "reverse": Key("rewind", _choice("rewind", "ignore", "generate")),
        "max_backlog": Key(64, _integer(1)),
        "long_press": Key(1.5, _number(0, above=True)),
        "button_bounce": Key(0.02, _number(0)),
    },
    "display": {
        "driver": Key("ssd1306", _choice(*DISPLAY_DRIVERS)),
        "interface": Key("i2c", _choice("i2c", "spi", "fake")),
        "i2c_port": Key(1, _integer(0)),
        "i2c_address": Key(0x3C, _i2c_address()),
        "spi_port": Key(0, _integer(0)),
        "spi_device": Key(0, _integer(0)),
        "spi_bus_speed_hz": Key(8_000_000, _choice(*SPI_BUS_SPEEDS_HZ)),
        "gpio_dc": Key(24, _integer(0, MAX_HEADER_GPIO)),
        "gpio_rst": Key(25, _integer(0, MAX_HEADER_GPIO)),
        "width": Key(128, _integer(1, 4096)),
        "height": Key(64, _integer(1, 4096)),
        "rotate": Key(0, _integer(0, 3)),
        "contrast": Key(255, _integer(0, 255)),
        # A font is a file path or a name that Pillow looks up in the system font
        # folders, so it is not resolved like the other paths.
        "font": Key("", _string()),
        "font_size": Key(10, _integer(4, 128)),
        "fps_max": Key(10.0, _number(0, above=True)),
        "persist": Key(False, _boolean()),
        "dim_after": Key(60.0, _number(0)),
        "dim_contrast": Key(16, _integer(0, 255)),
        "off_after": Key(600.0, _number(0)),
        "output": Key("", _path()),
    },
    "prompts": {
        "list": Key(DEFAULT_PROMPTS, _prompt_list()),
        "file": Key("", _path()),
    },
    "transcripts": {
        "enabled": Key(True, _boolean()),
        "dir": Key("", _path()),
        "fsync_interval": Key(5.0, _number(0)),
    },
    "serial": {
        "mode": Key("off", _choice("off", "console", "pulses")),
        "port": Key("/dev/serial0", _string(nonempty=True)),
        "baudrate": Key(115200, _choice(*BAUDRATES)),
        "max_line": Key(256, _integer(16, 4096)),
    },
    "service": {
        "control_socket": Key("", _path()),
        "log_level": Key("info", _choice("debug", "info", "warning", "error")),
    },
}


# --- The loaded configuration ------------------------------------------------------------


class Section:
    """The validated keys of one config section, read as attributes."""

    def __init__(self, name: str, values: dict[str, Any]):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            hint = _suggestion(key, self._values)
            raise AttributeError(f"[{self._name}] has no key {key!r}{hint}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("configuration sections are read-only")

    def __iter__(self):
        return iter(self._values)

    def __repr__(self) -> str:
        return f"Section({self._name!r}, {self._values!r})"


class Config:
    """The effective configuration: one ``Section`` attribute per TOML table.

    ``files`` lists the files read, in order. ``all_prompts`` is ``[prompts] list``
    followed by the prompts read from ``[prompts] file``.
    """

    def __init__(self, values, sources, files, all_prompts, transcripts_dir, control_socket):
        self._values = values
        self._sources = sources
        self.files: list[str] = files
        self.all_prompts: tuple[str, ...] = all_prompts
        # The transcripts folder and control socket path with "" resolved, for the
        # environment the config was loaded in.
        self.effective_transcripts_dir: str = transcripts_dir
        self.effective_control_socket: str = control_socket
        for name, section in values.items():
            setattr(self, name, Section(name, section))

    def source_of(self, section: str, key: str) -> str:
        """Return the file that set ``[section] key`` last, or "built-in default"."""
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise KeyError(f"[{section}] {key} is not a configuration key")
        return self._sources.get((section, key), BUILTIN)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Return the effective values as nested dicts (a copy)."""
        return {
            name: {key: list(value) if isinstance(value, list) else value for key, value in section.items()}
            for name, section in self._values.items()
        }


# --- Loading ------------------------------------------------------------------------


def _suggestion(word: str, candidates) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {matches[0]!r}?" if matches else ""


def _error(origin: str, section: str, key: str, value: Any, problem: str, expected: str) -> ConfigError:
    return ConfigError(f"{origin}: [{section}] {key} = {_toml_value(value)}: {problem}; expected {expected}")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8; expected a UTF-8 TOML file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {_describe_toml_error(exc)}") from None


def _describe_toml_error(exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's tomllib puts the position in the message text only, as
    # "... (at line 3, column 7)" or "... (at end of document)".
    message = str(exc)
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match:
        return f"line {match.group(2)}, column {match.group(3)}: invalid TOML: {match.group(1)}"
    match = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if match:
        return f"end of file: invalid TOML: {match.group(1)}"
    return f"invalid TOML: {message}"


def _config_files(path: str | None, env: Mapping[str, str]) -> list[str]:
    """List the config files to read, main file first; a missing default is skipped."""
    explicit = path or env.get(CONFIG_ENV) or None
    main = explicit or DEFAULT_CONFIG_PATH
    files = []
    if explicit or os.path.exists(main):
        if not os.path.exists(main):
            raise ConfigError(f"{main}: config file not found")
        files.append(main)

    dropin_dir = os.path.join(os.path.dirname(os.path.abspath(main)), DROPIN_DIR)
    try:
        names = sorted(os.listdir(dropin_dir))
    except FileNotFoundError:
        names = []
    except NotADirectoryError:
        raise ConfigError(f"{dropin_dir}: is not a folder; expected a folder of *.toml drop-ins") from None
    except OSError as exc:
        raise ConfigError(f"{dropin_dir}: cannot list drop-ins: {exc.strerror}") from None
    for name in names:
        candidate = os.path.join(dropin_dir, name)
        # Hidden files and editor or package manager leftovers (.dpkg-old, ~) are skipped.
        if name.endswith(".toml") and not name.startswith(".") and os.path.isfile(candidate):
            files.append(candidate)
    return files


def _merge_file(path: str, data: Mapping[str, Any], values: dict, sources: dict, base: str) -> None:
    """Validate one layer's values and merge them in; ``base`` is the folder for relative paths."""
    for section, table in data.items():
        if section not in SCHEMA:
            owners = [name for name, keys in SCHEMA.items() if section in keys]
            if owners and not isinstance(table, dict):
                hint = f"; did you mean [{owners[0]}] {section}?"
            else:
                hint = _suggestion(section, SCHEMA)
            raise ConfigError(f"{path}: unknown section [{section}]{hint}")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] is {_type_name(table)}; expected a table")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{path}: [{section}] {key}: unknown key{_key_hint(section, key)}")
            try:
                values[section][key] = SCHEMA[section][key].check(value, base)
            except _Invalid as invalid:
                raise _error(path, section, key, value, invalid.problem, invalid.expected) from None
            sources[(section, key)] = path


def _key_hint(section: str, key: str) -> str:
    hint = _suggestion(key, SCHEMA[section])
    if hint:
        return hint
    owners = [name for name, keys in SCHEMA.items() if key in keys]
    if owners:
        return f"; did you mean [{owners[0]}] {key}?"
    return "; expected one of " + ", ".join(SCHEMA[section])


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Load, merge and validate the configuration; raise ConfigError naming the file, key and value.

    ``path`` (the ``--config`` option) wins over CRANKLLM_CONFIG in ``env``, which wins
    over /etc/crankllm/crankllm.toml. Only the default file may be missing.
    ``overrides`` ({section: {key: value}}, as from command-line options) is merged
    last and checked like a file; relative paths in it are taken from the current
    folder, and ``source_of`` reports it as "command-line override".
    """
    values = {section: {key: spec.default for key, spec in keys.items()} for section, keys in SCHEMA.items()}
    values["prompts"]["list"] = list(DEFAULT_PROMPTS)
    sources: dict[tuple[str, str], str] = {}

    files = _config_files(path, env)
    for file in files:
        _merge_file(file, _read_toml(file), values, sources, os.path.dirname(os.path.abspath(file)))
    layers = list(files)
    if overrides:
        _merge_file(OVERRIDES, overrides, values, sources, os.getcwd())
        layers.append(OVERRIDES)

    context = _Context(values, sources, layers)
    _check_combinations(context)
    _check_model_path(context)
    all_prompts = _load_prompts(context)
    transcripts_dir = _transcripts_dir(values["transcripts"]["dir"], env)
    control_socket = _control_socket(context, env)
    return Config(values, sources, files, all_prompts, transcripts_dir, control_socket)


@dataclass
class _Context:
    values: dict[str, dict[str, Any]]
    sources: dict[tuple[str, str], str]
    layers: list[str]  # the files read, then OVERRIDES if given

    def error(self, section: str, key: str, problem: str, expected: str) -> ConfigError:
        origin = self.sources.get((section, key), BUILTIN)
        return _error(origin, section, key, self.values[section][key], problem, expected)

    def later(self, *keys: tuple[str, str]) -> tuple[str, str]:
        """Return the key set by the file read last (the first key on a tie), to blame in an error."""
        order = {layer: index for index, layer in enumerate(self.layers)}
        return max(keys, key=lambda item: order.get(self.sources.get(item, BUILTIN), -1))


# --- Checks across keys ------------------------------------------------------------


def _check_combinations(context: _Context) -> None:
    values = context.values
    crank, serial, display = values["crank"], values["serial"], values["display"]

    if crank["source"] == "serial" and serial["mode"] != "pulses":
        problem = f'[serial] mode is "{serial["mode"]}"'
        raise context.error("crank", "source", problem, 'source = "gpio", or [serial] mode = "pulses"')
    if serial["mode"] == "pulses" and crank["source"] != "serial":
        problem = f'[crank] source is "{crank["source"]}"'
        raise context.error("serial", "mode", problem, '[crank] source = "serial" to count pulses from the serial port')

    if crank["detents_per_token"] > 1 and crank["tokens_per_detent"] > 1:
        section, key = context.later(("crank", "detents_per_token"), ("crank", "tokens_per_detent"))
        problem = "detents_per_token and tokens_per_detent are both above 1"
        raise context.error(section, key, problem, "at most one of them above 1")

    if display["driver"] in FILE_DISPLAY_DRIVERS and not display["output"]:
        problem = f'the {display["driver"]} driver writes a file'
        raise context.error("display", "output", problem, "the path of the file to write")

    _check_pins(context)


# SPI bus -> ({GPIO: signal}, {chip select: GPIO}). SPI0 is on GPIO7-11 and SPI1,
# an auxiliary controller, on GPIO16-21.
SPI_PINS = {
    0: ({11: "SCLK", 10: "MOSI", 9: "MISO"}, {0: 8, 1: 7}),
    1: ({21: "SCLK", 20: "MOSI", 19: "MISO"}, {0: 18, 1: 17, 2: 16}),
}


def _bus_pins(values: dict[str, dict[str, Any]]) -> dict[int, str]:
    """Return the GPIOs the display and serial port occupy, each with its role."""
    display, serial = values["display"], values["serial"]
    pins: dict[int, str] = {}
    if display["driver"] in HARDWARE_DISPLAY_DRIVERS:
        if display["interface"] == "i2c" and display["i2c_port"] == 1:
            # /dev/i2c-1 is the header's I2C bus (dtparam=i2c_arm).
            pins.update({2: "I2C1 SDA for the display", 3: "I2C1 SCL for the display"})
        elif display["interface"] == "spi":
            port, device = display["spi_port"], display["spi_device"]
            if port in SPI_PINS:
                signals, chip_selects = SPI_PINS[port]
                pins.update({gpio: f"SPI{port} {name} for the display" for gpio, name in signals.items()})
                if device in chip_selects:
                    pins[chip_selects[device]] = f"SPI{port} CE{device} for the display"
            pins[display["gpio_rst"]] = "[display] gpio_rst"
            pins[display["gpio_dc"]] = "[display] gpio_dc"
    if serial["mode"] != "off" and serial["port"] == "/dev/serial0":
        # /dev/serial0 is the UART on header pins 8 and 10.
        pins.update({14: "UART TXD for [serial] port", 15: "UART RXD for [serial] port"})
    return pins


def _check_pins(context: _Context) -> None:
    values = context.values
    display = values["display"]
    if (
        display["driver"] in HARDWARE_DISPLAY_DRIVERS
        and display["interface"] == "spi"
        and display["gpio_dc"] == display["gpio_rst"]
    ):
        section, key = context.later(("display", "gpio_dc"), ("display", "gpio_rst"))
        problem = "gpio_dc and gpio_rst are the same GPIO"
        raise context.error(section, key, problem, "a different GPIO for each role")

    bus_pins = _bus_pins(values)
    crank_pins: dict[int, str] = {}
    for key in ("pin_a", "pin_b", "pin_button"):
        gpio = gpio_number(values["crank"][key])
        if gpio in crank_pins:
            # Blame the key set last, so the message names the file that broke the rule.
            _, blamed = context.later(("crank", key), ("crank", crank_pins[gpio]))
            other = crank_pins[gpio] if blamed == key else key
            problem = f"GPIO{gpio} is also [crank] {other}"
            raise context.error("crank", blamed, problem, "a different pin for each role")
        if gpio in bus_pins:
            problem = f"GPIO{gpio} is also {bus_pins[gpio]}"
            raise context.error("crank", key, problem, "a different pin for each role")
        crank_pins[gpio] = key


def _check_model_path(context: _Context) -> None:
    path = context.values["model"]["path"]
    if not path:
        return
    expected = 'an existing GGUF file, or "" for the prepared default model'
    if not os.path.exists(path):
        raise context.error("model", "path", "file not found", expected)
    if not os.path.isfile(path):
        raise context.error("model", "path", "not a regular file", expected)


def _load_prompts(context: _Context) -> tuple[str, ...]:
    prompts = list(context.values["prompts"]["list"])
    path = context.values["prompts"]["file"]
    if path:
        prompts.extend(_read_prompt_file(context, path))
    if not prompts:
        key = "file" if path else "list"
        expected = "at least one prompt in [prompts] list or [prompts] file"
        raise context.error("prompts", key, "no prompts", expected)
    return tuple(prompts)


def _read_prompt_file(context: _Context, path: str) -> list[str]:
    expected = "a UTF-8 text file with one prompt per line"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise context.error("prompts", "file", "file not found", expected) from None
    except OSError as exc:
        raise context.error("prompts", "file", f"cannot read: {exc.strerror}", expected) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise context.error("prompts", "file", f"line {line} is not valid UTF-8", expected) from None
    prompts = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line)
    return prompts


def _first_directory(value: str | None) -> str | None:
    # systemd sets STATE_DIRECTORY and RUNTIME_DIRECTORY to a colon-separated list when
    # the unit names several folders; the first is the one named first in the unit.
    if not value:
        return None
    return value.split(":")[0] or None


def _transcripts_dir(configured: str, env: Mapping[str, str]) -> str:
    if configured:
        return configured
    state = _first_directory(env.get("STATE_DIRECTORY"))
    if state:
        return os.path.join(state, "transcripts")
    home = env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    data_home = env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(data_home, "crankllm", "transcripts")


def _control_socket(context: _Context, env: Mapping[str, str]) -> str:
    configured = context.values["service"]["control_socket"]
    if configured:
        path = configured
    elif _first_directory(env.get("RUNTIME_DIRECTORY")):
        path = os.path.join(_first_directory(env.get("RUNTIME_DIRECTORY")), "control.sock")
    elif env.get("XDG_RUNTIME_DIR"):
        path = os.path.join(env["XDG_RUNTIME_DIR"], "crankllm", "control.sock")
    else:
        path = "/run/crankllm/control.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{context.sources.get(('service', 'control_socket'), BUILTIN)}: [service] control_socket "
            f"resolves to {_toml_value(path)}: longer than {MAX_SOCKET_PATH_BYTES} bytes; "
            "expected a shorter path, as a Unix socket path is limited to 107 bytes"
        )
    return path


# --- Rendering ------------------------------------------------------------------------


def render_config(config: Config) -> str:
    """Return the effective configuration as TOML, each value commented with its source file."""
    lines = ["# Effective crankllm configuration."]
    if config.files:
        lines.append("# Files read, in order: " + ", ".join(_comment_text(file) for file in config.files))
    else:
        lines.append("# No config file was found; every value is a built-in default.")

    values = config.as_dict()
    for section, keys in SCHEMA.items():
        lines.extend(["", f"[{section}]"])
        for key in keys:
            value = values[section][key]
            comment = _comment_text(config.source_of(section, key))
            if (section, key) == ("transcripts", "dir") and not value:
                comment += f"; resolves to {_comment_text(config.effective_transcripts_dir)}"
            if (section, key) == ("service", "control_socket") and not value:
                comment += f"; resolves to {_comment_text(config.effective_control_socket)}"
            lines.extend(_render_key(key, value, comment))
        if section == "prompts" and values["prompts"]["file"]:
            count = len(config.all_prompts) - len(values["prompts"]["list"])
            lines.append(f"# [prompts] file adds {count} prompt{'s' if count != 1 else ''} after the list.")
    return "\n".join(lines) + "\n"


def _render_key(key: str, value: Any, comment: str) -> list[str]:
    if key == "i2c_address" and isinstance(value, int):
        return [f"{key} = 0x{value:02X}  # {comment}"]
    if isinstance(value, list) and value:
        return [f"{key} = ["] + [f"    {_toml_value(item)}," for item in value] + [f"]  # {comment}"]
    return [f"{key} = {_toml_value(value)}  # {comment}"]


def _comment_text(text: str) -> str:
    # A file name may contain a newline, which would end the comment early.
    return text.replace("\r", "\\r").replace("\n", "\\n")
