"""The benchmark's own error."""

from appliance.errors import CrankError


class BenchError(CrankError, RuntimeError):
    """A benchmark phase that could not run: a process that never got ready, a step that timed out."""

    exit_code = 1
