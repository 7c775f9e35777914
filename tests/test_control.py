"""Control socket: a real server on a Unix socket in a tmp folder, real clients."""

import grp
import io
import json
import logging
import os
import socket
import stat
import tempfile
import threading

import pytest

from appliance.config import load_config
from appliance.errors import ControlError
from appliance.service import control_client as client
from appliance.service.control import MAX_PROMPT_CHARS, MAX_REQUEST_BYTES, ControlServer
from appliance.service.daemon import NewStory, PromptRequest

WAIT = 10  # seconds; only reached when something is broken

SNAPSHOT = {
    "state": "ready",
    "model": "/var/lib/crankllm/models/SmolLM2-135M-Instruct.Q2_K.gguf",
    "bits_per_weight": 3.26,
    "story_id": 4,
    "tokens": 57,
    "ctx_used": 80,
    "n_ctx": 512,
    "tokens_per_s": 2.5,
    "ms_per_step": 41.7,
    "detents": {"received": 60, "generated": 57, "rewound": 2, "cancelled": 0,
                "dropped": 0, "ignored": 1, "pending": 0},
    "display": "on",
}


class Posted:
    """The daemon's post(): records events in order, thread-safe."""

    def __init__(self):
        self.events = []
        self._cond = threading.Condition()

    def __call__(self, event):
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, count):
        with self._cond:
            return self._cond.wait_for(lambda: len(self.events) >= count, WAIT)


class Output(io.StringIO):
    """A text stream that tail() writes to from another thread; tests wait on its contents."""

    def __init__(self):
        super().__init__()
        self._cond = threading.Condition()

    def write(self, text):
        with self._cond:
            written = super().write(text)
            self._cond.notify_all()
            return written

    def wait_for(self, text):
        with self._cond:
            return self._cond.wait_for(lambda: text in self.getvalue(), WAIT)


@pytest.fixture
def socket_path(tmp_path):
    return str(tmp_path / "run" / "control.sock")


@pytest.fixture
def make_server(socket_path):
    servers = []

    def make(path=socket_path, **options):
        options.setdefault("snapshot", lambda: dict(SNAPSHOT))
        options.setdefault("post", Posted())
        options.setdefault("group", None)
        server = ControlServer(path, **options)
        server.start()
        servers.append(server)
        return server

    make.servers = servers
    yield make
    for server in servers:
        server.close()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def follow(socket_path, make_server):
    """Run client.tail() in a thread, writing to an Output."""
    threads = []

    def start(terminal=False):
        out = Output()
        errors = []

        def run():
            try:
                client.tail(socket_path, out, terminal=terminal)
            except ControlError as err:
                errors.append(err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return out, thread, errors

    yield start
    for server in make_server.servers:
        server.close()  # ends every tail() still running
    for thread in threads:
        thread.join(WAIT)


def raw_request(path, data, shutdown=False):
    """Send raw bytes as a request and return the parsed reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(path)
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline()
    return json.loads(reply)


# -- commands ---------------------------------------------------------------------------

def test_status_returns_snapshot(server, socket_path):
    assert client.status(socket_path) == SNAPSHOT


def test_prompt_posts_request(server, socket_path):
    client.send_prompt(socket_path, "Once upon a time\nthere was")
    assert server._post.events == [PromptRequest("Once upon a time\nthere was")]


def test_new_posts_new_story(server, socket_path):
    client.new_story(socket_path)
    assert server._post.events == [NewStory()]


def test_format_status_shows_fields():
    text = client.format_status(SNAPSHOT)
    lines = text.splitlines()
    assert "state:           ready" in lines
    assert "bits per weight: 3.26" in lines
    assert "story:           4" in lines
    assert "tokens:          57 (context 80 of 512)" in lines
    assert "speed:           2.5 tok/s, 41.7 ms per step" in lines
    assert any(line.startswith("detents:") and "received 60" in line for line in lines)
    assert "display:         on" in lines


def test_format_status_shows_unknown_keys():
    text = client.format_status({"state": "ready", "serial_console": "connected"})
    assert "serial console:  connected" in text.splitlines()


def test_snapshot_failure_reported(make_server, socket_path):
    def broken():
        raise RuntimeError("engine gone")

    make_server(snapshot=broken)
    with pytest.raises(ControlError, match="status failed inside crankllm"):
        client.status(socket_path)


def test_server_survives_snapshot_failure(make_server, socket_path):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("engine gone")
        return dict(SNAPSHOT)

    make_server(snapshot=flaky)
    with pytest.raises(ControlError):
        client.status(socket_path)
    assert client.status(socket_path) == SNAPSHOT


# -- prompt validation ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "  \n\t", "x" * (MAX_PROMPT_CHARS + 1), "ring\x07", "cr\r", "esc\x1b[2J"])
def test_client_rejects_invalid_prompt(server, socket_path, text):
    with pytest.raises(ControlError, match="prompt"):
        client.send_prompt(socket_path, text)
    assert server._post.events == []


@pytest.mark.parametrize("text", ["x" * MAX_PROMPT_CHARS, "tab\tand\nnewline", "caf\u00e9 \u732b"])
def test_valid_prompt_accepted(server, socket_path, text):
    client.send_prompt(socket_path, text)
    assert server._post.events == [PromptRequest(text)]


@pytest.mark.parametrize("request_line", [
    b'{"command":"prompt","text":""}\n',
    b'{"command":"prompt","text":"bell\\u0007"}\n',
    b'{"command":"prompt","text":"lone \\ud800 surrogate"}\n',
    b'{"command":"prompt","text":42}\n',
    b'{"command":"prompt"}\n',
    b'{"command":"prompt","text":"' + b"y" * (MAX_PROMPT_CHARS + 1) + b'"}\n',
])
def test_server_rejects_invalid_prompt(server, socket_path, request_line):
    reply = raw_request(socket_path, request_line)
    assert reply["ok"] is False
    assert "prompt" in reply["error"]
    assert server._post.events == []


# -- garbage, oversize and broken clients -----------------------------------------------

@pytest.mark.parametrize("garbage", [
    b"hello\n",
    b"\xff\xfe\x00\n",
    b"[1, 2]\n",
    b"\n",
    b'{"command": "reboot"}\n',
    b'{"command": "status", "verbose": true}\n',
    b"[" * 8000 + b"\n",
])
def test_garbage_request_gets_error(server, socket_path, garbage):
    reply = raw_request(socket_path, garbage)
    assert reply["ok"] is False
    assert reply["error"]


def test_server_serves_after_garbage(server, socket_path):
    raw_request(socket_path, b"\xff" * 100 + b"\n")
    assert client.status(socket_path) == SNAPSHOT


def test_oversize_request_rejected(server, socket_path):
    reply = raw_request(socket_path, b"x" * (MAX_REQUEST_BYTES * 3))
    assert reply["ok"] is False
    assert "too long" in reply["error"]


def test_request_of_max_size_accepted(server, socket_path):
    request = b'{"command":"status"}'
    request += b" " * (MAX_REQUEST_BYTES - len(request) - 1) + b"\n"
    reply = raw_request(socket_path, request)
    assert reply["ok"] is True


def test_oversize_request_leaves_other_clients(server, socket_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
        hog.connect(socket_path)
        hog.sendall(b"z" * (MAX_REQUEST_BYTES - 1))  # one byte short of the limit, no newline
        assert client.status(socket_path) == SNAPSHOT


def test_request_without_newline_ignored(server, socket_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(socket_path)
        sock.sendall(b'{"command":"new"}')
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    assert server._post.events == []


def test_disconnect_mid_request_ignored(server, socket_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        sock.sendall(b'{"command":"prompt","text":"half a pro')
    client.send_prompt(socket_path, "whole")
    assert server._post.events == [PromptRequest("whole")]


def test_idle_client_times_out(make_server, socket_path):
    make_server(request_timeout=0.2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(socket_path)
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] is False
    assert "timed out" in reply["error"]


def test_connection_limit_refuses_extra(make_server, socket_path):
    make_server(max_connections=2)
    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for sock in idle:
            sock.connect(socket_path)
        with pytest.raises(ControlError, match="try again later"):
            client.status(socket_path)
    finally:
        for sock in idle:
            sock.close()


def test_connection_limit_frees_slot(make_server, socket_path):
    make_server(max_connections=1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(socket_path)
        with pytest.raises(ControlError):
            client.status(socket_path)
    assert client.status(socket_path) == SNAPSHOT


def test_concurrent_clients_served(server, socket_path):
    results = []
    errors = []

    def user(n):
        try:
            results.append(client.status(socket_path))
            client.send_prompt(socket_path, f"prompt {n}")
        except ControlError as err:
            errors.append(err)

    # One client keeps a connection open without a request the whole time.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(socket_path)
        threads = [threading.Thread(target=user, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    assert errors == []
    assert len(results) == 12
    assert sorted(event.text for event in server._post.events) == sorted(f"prompt {n}" for n in range(12))


# -- tail -------------------------------------------------------------------------------

def test_tail_replays_current_story(server, follow):
    server.story_started(3, "Once upon a time")
    server.text_added(" there")
    server.text_added(" was a crank")
    server.text_removed("crank")
    out, _, _ = follow()
    assert out.wait_for(" there was a ")
    assert out.getvalue().startswith("--- story 3: Once upon a time ---\n there was a ")


def test_tail_follows_new_text(server, follow):
    server.story_started(1, "Hello")
    out, _, _ = follow()
    assert out.wait_for("--- story 1: Hello ---\n")
    server.text_added(" wor")
    server.text_added("ld")
    assert out.wait_for(" world")


def test_tail_rewind_backspaces_on_terminal(server, follow):
    server.story_started(1, "Hello")
    server.text_added(" world")
    out, _, _ = follow(terminal=True)
    assert out.wait_for(" world")
    server.text_removed("ld")
    assert out.wait_for(" world\b \b\b \b")


def test_tail_rewind_marker_when_not_terminal(server, follow):
    server.story_started(1, "Hello")
    server.text_added(" world")
    out, _, _ = follow(terminal=False)
    assert out.wait_for(" world")
    server.text_removed("ld")
    server.text_added("ms")
    assert out.wait_for(" world\n[rewound 2 characters]\nms")


def test_tail_shows_story_boundaries(server, follow):
    server.story_started(1, "First")
    out, _, _ = follow()
    assert out.wait_for("--- story 1: First ---\n")
    server.text_added(" words")
    server.story_ended("new story")
    server.story_started(2, "Second\nprompt")
    assert out.wait_for(" words\n--- story 1 ended: new story ---\n--- story 2: Second prompt ---\n")


def test_tail_long_story_replay_bounded(server, follow):
    server.story_started(1, "Long")
    for _ in range(70):
        server.text_added("x" * 1024)
    out, _, _ = follow()
    assert out.wait_for("earlier characters not shown]\n")
    assert out.wait_for("x" * 60000)


def test_tail_returns_when_server_closes(server, follow):
    server.story_started(1, "Bye")
    out, thread, errors = follow()
    assert out.wait_for("--- story 1: Bye ---\n")
    server.close()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert errors == []
    assert out.getvalue().endswith("--- crankllm is stopping ---\n")


def test_tail_control_characters_replaced(server, follow):
    server.story_started(1, "Hi")
    out, _, _ = follow()
    assert out.wait_for("--- story 1: Hi ---\n")
    server.text_added("a\x1b[2Jb\rc")
    assert out.wait_for("a\ufffd[2Jb\ufffdc")


def test_slow_tail_client_does_not_block_mirror(make_server, socket_path):
    server = make_server(tail_buffer=64 * 1024)
    server.story_started(1, "Fast")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(socket_path)
        slow.sendall(b'{"command":"tail"}\n')
        assert json.loads(slow.makefile("rb").readline())["ok"] is True

        # The slow client never reads while 2 MiB of text is generated.
        crank = threading.Thread(target=lambda: [server.text_added("y" * 1024) for _ in range(2048)])
        crank.start()
        crank.join(WAIT)
        assert not crank.is_alive()
        assert server.followers == 0


def test_slow_tail_client_told_why(make_server, socket_path):
    server = make_server(tail_buffer=64 * 1024)
    server.story_started(1, "Fast")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(WAIT)
        slow.connect(socket_path)
        slow.sendall(b'{"command":"tail"}\n')
        reader = slow.makefile("rb")
        assert json.loads(reader.readline()) == {"ok": True}
        for _ in range(2048):
            server.text_added("y" * 1024)
        messages = [json.loads(line) for line in reader]
    assert messages[-1]["event"] == "dropped"
    assert "crankllm tail again" in messages[-1]["error"]


def test_slow_tail_client_leaves_others(make_server, socket_path, follow):
    server = make_server(tail_buffer=64 * 1024)
    server.story_started(1, "Fast")
    out, _, _ = follow()
    assert out.wait_for("--- story 1: Fast ---\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(socket_path)
        slow.sendall(b'{"command":"tail"}\n')
        # 512 KiB in steps the reading client keeps up with; the slow one never reads.
        for step in range(64):
            server.text_added(f"<{step}>" + "y" * 8192)
            assert out.wait_for(f"<{step}>")
        assert server.followers == 1
        server.text_added(" the end")
        assert out.wait_for(" the end")
    sent = "".join(f"<{step}>" + "y" * 8192 for step in range(64))
    assert sent + " the end" in out.getvalue()


def test_tail_client_gets_drop_error(make_server, socket_path):
    server = make_server(tail_buffer=4096)
    server.story_started(1, "Drop")
    errors = []
    reader_ready = threading.Event()

    class Stalled(Output):
        """Blocks tail() in its first write until the server has dropped it."""

        def write(self, text):
            reader_ready.set()
            release.wait(WAIT)
            return super().write(text)

    release = threading.Event()
    out = Stalled()

    def run():
        try:
            client.tail(socket_path, out)
        except ControlError as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    assert reader_ready.wait(WAIT)
    for _ in range(2048):
        server.text_added("z" * 1024)
    release.set()
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert "run crankllm tail again" in str(errors[0])


# -- the socket file --------------------------------------------------------------------

def test_socket_mode_0660(server, socket_path):
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660


def test_socket_is_unix_socket(server, socket_path):
    assert stat.S_ISSOCK(os.stat(socket_path).st_mode)


def test_socket_group_set(make_server, socket_path):
    if os.geteuid() == 0:
        group = grp.getgrnam("daemon")
    else:
        others = [gid for gid in os.getgroups() if gid != os.getegid()]
        if not others:
            pytest.skip("needs root or a supplementary group")
        group = grp.getgrgid(others[0])
    make_server(group=group.gr_name)
    assert os.stat(socket_path).st_gid == group.gr_gid


def test_missing_group_left_alone(make_server, socket_path, caplog):
    caplog.set_level(logging.DEBUG, logger="appliance.service.control")
    make_server(group="crankllm-no-such-group")
    assert os.stat(socket_path).st_gid == os.getegid()
    assert any("crankllm-no-such-group does not exist" in r.getMessage() for r in caplog.records)


def test_stale_socket_removed(make_server, socket_path):
    os.makedirs(os.path.dirname(socket_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(socket_path)  # bound, never listening: what a killed daemon leaves
    make_server()
    assert client.status(socket_path) == SNAPSHOT


def test_live_socket_not_removed(make_server, socket_path):
    make_server()
    with pytest.raises(ControlError, match="another crankllm is running"):
        make_server(snapshot=lambda: {"state": "second"})
    assert client.status(socket_path) == SNAPSHOT


def test_non_socket_path_rejected(make_server, socket_path):
    os.makedirs(os.path.dirname(socket_path))
    with open(socket_path, "w") as file:
        file.write("notes")
    with pytest.raises(ControlError, match="not a socket"):
        make_server()
    with open(socket_path) as file:
        assert file.read() == "notes"


def test_close_removes_socket(make_server, socket_path):
    server = make_server()
    server.close()
    assert not os.path.exists(socket_path)


def test_invalid_mode_rejected(socket_path):
    with pytest.raises(ControlError, match="mode"):
        ControlServer(socket_path, snapshot=dict, post=print, mode=0o1777)


# -- default socket path ----------------------------------------------------------------

def test_default_socket_configured_wins(tmp_path):
    config = load_config(os.devnull, env={}, overrides={"service": {"control_socket": "/srv/c.sock"}})
    service = tmp_path / "service.sock"
    service.touch()
    assert client.default_socket(config, service_socket=str(service)) == "/srv/c.sock"


def test_default_socket_prefers_service(tmp_path):
    config = load_config(os.devnull, env={"XDG_RUNTIME_DIR": str(tmp_path / "user")})
    service = tmp_path / "service.sock"
    service.touch()
    assert client.default_socket(config, service_socket=str(service)) == str(service)


def test_default_socket_falls_back_to_user(tmp_path):
    config = load_config(os.devnull, env={"XDG_RUNTIME_DIR": str(tmp_path / "user")})
    missing = str(tmp_path / "service.sock")
    expected = str(tmp_path / "user" / "crankllm" / "control.sock")
    assert client.default_socket(config, service_socket=missing) == expected


# -- client errors ----------------------------------------------------------------------

def test_client_reports_not_running(socket_path):
    with pytest.raises(ControlError) as caught:
        client.status(socket_path)
    message = str(caught.value)
    assert f"crankllm is not running (no control socket at {socket_path})" in message
    assert "sudo systemctl start crankllm" in message


def test_client_reports_stale_socket(socket_path):
    os.makedirs(os.path.dirname(socket_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(socket_path)
    with pytest.raises(ControlError, match="crankllm is not running"):
        client.new_story(socket_path)


def status_as_nobody(path):
    """Call client.status(path) as uid 65534 (nobody) in a forked child; return its error message."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, ask, report, and leave without cleanup
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                client.status(path)
                message = "no error"
            except ControlError as err:
                message = str(err)
            os.write(write_end, message.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return message


def test_client_reports_permission_denied(make_server):
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "control.sock")
        make_server(path)
        if os.geteuid() == 0:
            # root passes every permission check, so ask as a user outside the group.
            message = status_as_nobody(path)
        else:
            os.chmod(path, 0o600)
            with pytest.raises(ControlError) as caught:
                client.status(path)
            message = str(caught.value)
    assert f"permission denied on {path}" in message
    assert "sudo usermod -aG crankllm $USER" in message


def test_crank_turns_detents(make_server, socket_path):
    turned = []
    make_server(crank=turned.append)
    client.crank(socket_path, 3)
    client.crank(socket_path, -2)
    assert turned == [1, 1, 1, -1, -1]


@pytest.mark.parametrize("detents", [0, 1001, -1001, "3", 2.5, True, None])
def test_crank_rejects_invalid_detents(make_server, socket_path, detents):
    turned = []
    make_server(crank=turned.append)
    with pytest.raises(ControlError, match="invalid detents"):
        client.crank(socket_path, detents)
    assert turned == []


def test_crank_without_crank_rejected(server, socket_path):
    with pytest.raises(ControlError, match="takes no crank commands"):
        client.crank(socket_path, 1)
