"""The exception tree.

Every error the appliance reports on purpose derives from CrankError, and also from the
builtin that fits (ValueError for bad values, OSError for devices and files), so callers
can catch either. ``exit_code`` follows sysexits.h, which the systemd unit's
RestartPreventExitStatus relies on: 78 (EX_CONFIG) for configuration and model errors,
77 (EX_NOPERM) for a device the service user may not open.
"""

EX_SOFTWARE = 70
EX_NOPERM = 77
EX_CONFIG = 78


class CrankError(Exception):
    """Base of every error crankllm raises on purpose."""

    exit_code = 1


class ConfigError(CrankError, ValueError):
    """An invalid configuration value, file or combination of values."""

    exit_code = EX_CONFIG


class ModelError(CrankError):
    """A model that cannot be used: missing, malformed, or rejected by llama.cpp."""

    exit_code = EX_CONFIG


class ModelFileError(ModelError, ValueError):
    """A model file that fails the checks made before llama.cpp loads it."""


class ModelPrepareError(ModelError, RuntimeError):
    """Fetching, verifying or quantizing a model failed."""

    exit_code = 1


class EngineError(CrankError, RuntimeError):
    """llama.cpp returned an error while priming or decoding."""

    exit_code = EX_SOFTWARE


class PinError(ConfigError):
    """A pin that is unknown, busy, or given two roles."""


class PinFactoryError(ConfigError):
    """The configured gpiozero pin factory could not be used."""


class DevicePermissionError(CrankError, PermissionError):
    """A device node exists but the service user may not open it."""

    exit_code = EX_NOPERM


class DisplayError(CrankError, OSError):
    """The display could not be reached or initialised."""


class SerialError(CrankError, OSError):
    """The serial port could not be opened or used."""


class ControlError(CrankError, OSError):
    """A control socket request failed or was invalid."""
