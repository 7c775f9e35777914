"""Shared fixtures: the real default model and a tiny genuine-Q2_K model made here."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tinymodel import write_tiny_gguf  # noqa: E402


@pytest.fixture
def factory():
    """A MockFactory set as gpiozero's global pin factory, the old one restored after."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    saved = Device.pin_factory
    mock = MockFactory()
    Device.pin_factory = mock
    yield mock
    mock.reset()
    Device.pin_factory = saved


@pytest.fixture(scope="session")
def default_model():
    """The prepared default model (SmolLM2-135M-Instruct, Q2_K file type), prepared if missing."""
    from appliance import models

    return str(models.ensure_default_model())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 1.6 M-parameter llama GGUF quantized to Q2_K, with rows wide enough for K-quants."""
    from appliance import models

    directory = tmp_path_factory.mktemp("tiny")
    source = directory / "tiny.F32.gguf"
    write_tiny_gguf(source)
    return str(models.prepare(str(source), output=directory / "tiny.Q2_K.gguf"))
