"""Serial test helpers: a pty in place of a USB serial adapter, and a fast backoff sleep."""

import os
import select
import threading
import time

import pytest

WAIT = 10  # seconds; only reached when something is broken


class PtyAdapter:
    """A USB serial adapter stand-in: a pty reached through a by-id style symlink.

    ``link`` is the port name the code under test opens. ``send`` and ``read`` act
    on the far end, as the microcontroller or terminal would.
    """

    def __init__(self, link):
        self.link = link
        self.master = None
        self.slave = None

    def plug(self):
        self.master, self.slave = os.openpty()
        os.symlink(os.ttyname(self.slave), self.link)

    def unplug(self):
        os.unlink(self.link)
        os.close(self.master)
        os.close(self.slave)
        self.master = self.slave = None

    def close(self):
        """Unplug the adapter if it is still plugged in, as fixture teardown does."""
        if self.master is not None:
            self.unplug()

    def send(self, data):
        os.write(self.master, data)

    def read(self, size):
        """Return exactly ``size`` bytes the port wrote, or fewer if WAIT passes first."""
        data = b""
        deadline = time.monotonic() + WAIT
        while len(data) < size:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, remaining))
            if not ready:
                break
            data += os.read(self.master, size - len(data))
        return data

    def expect(self, expected):
        return self.read(len(expected))


def adapter_fixture(name):
    """Return a fixture that yields an unplugged PtyAdapter named ``name`` in tmp_path.

    Assign it to ``adapter`` in a test module. Teardown unplugs the adapter if a
    test left it plugged in.
    """

    @pytest.fixture
    def adapter(tmp_path):
        fake = PtyAdapter(str(tmp_path / name))
        yield fake
        fake.close()

    return adapter


class FastBackoff:
    """Backoff sleep that records each requested delay and returns after 1 ms."""

    def __init__(self):
        self.delays = []
        self.called = threading.Event()
        self._pause = threading.Event()

    def __call__(self, seconds):
        self.delays.append(seconds)
        self.called.set()
        self._pause.wait(0.001)
