"""Malformed model files are reported by path before llama.cpp sees them."""

from __future__ import annotations

import os
import shutil

import pytest

from appliance.engine.engine import Engine, EngineSettings
from appliance.engine.gguf import read_gguf
from appliance.errors import ModelFileError


def expect_error(path, fragment):
    with pytest.raises(ModelFileError) as caught:
        Engine(path, EngineSettings(prompt_format="raw"))
    message = str(caught.value)
    assert str(path) in message
    assert fragment in message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    expect_error(path, "empty")


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + b"\0" * 100)
    expect_error(path, "not a GGUF file")


def test_unsupported_version(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + b"\0" * 100)
    expect_error(path, "unsupported GGUF version 99")


def test_truncated_after_header(tiny_model, tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(tiny_model, "rb") as source:
        path.write_bytes(source.read(24))
    expect_error(path, "truncated")


def test_truncated_data(tiny_model, tmp_path):
    path = tmp_path / "short.gguf"
    size = os.path.getsize(tiny_model)
    with open(tiny_model, "rb") as source:
        path.write_bytes(source.read(size - 1000))
    expect_error(path, "truncated")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable(tiny_model, tmp_path):
    path = tmp_path / "locked.gguf"
    shutil.copy(tiny_model, path)
    path.chmod(0)
    expect_error(path, "not readable")


def test_unreadable_as_other_user(tiny_model, tmp_path):
    # The suite runs as root in CI, where mode 0 does not stop reads, so the
    # permission check runs in a child that drops to nobody.
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    import subprocess
    import sys

    import tempfile

    # Under a directory that nobody may enter, so the file itself is the obstacle.
    directory = tempfile.mkdtemp(prefix="crankllm-perm-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "locked.gguf")
    shutil.copy(tiny_model, path)
    os.chmod(path, 0o600)
    code = (
        "import os, sys\n"
        "from appliance.engine.gguf import read_gguf\n"
        "from appliance.errors import ModelFileError\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    read_gguf(sys.argv[1])\nexcept ModelFileError as e:\n    print(e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": root},
    )
    shutil.rmtree(directory)
    assert "not readable" in result.stdout
    assert "(a parent directory" not in result.stdout
    assert str(path) in result.stdout


def test_info_of_default_model(default_model):
    info = read_gguf(default_model)
    assert info.file_type == "Q2_K"
    fallen, matrices, by_type = info.fallbacks()
    assert by_type["Q4_0"] == 180
    assert 5.0 < info.bits_per_weight < 5.3
    assert 134_000_000 < info.n_params < 135_000_000
