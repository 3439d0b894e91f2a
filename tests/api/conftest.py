"""API test fixtures: the app over a FakeEngine, driven in-process through ASGI."""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import httpx
import openai
import pytest

from vlmserve.api.app import create_app
from vlmserve.config import ServerConfig
from tests.api.fake_engine import FakeEngine
from tests.api.helpers import API_KEY, MODEL
from tests.engine.tiny_tokenizer import make_tiny_tokenizer

@pytest.fixture(scope="session")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer, model_name=MODEL)


@pytest.fixture
def make_client(engine) -> Callable[..., httpx.AsyncClient]:
    """make_client(**ServerConfig fields) -> an httpx client on a fresh app over `engine`."""

    def make(**config: Any) -> httpx.AsyncClient:
        app = create_app(engine, ServerConfig(**config))
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)

    return make


@pytest.fixture
async def client(make_client) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as c:
        yield c


@pytest.fixture
async def oai(make_client) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client against the app, with an API key configured and sent."""
    http = make_client(api_key=API_KEY)
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key=API_KEY, http_client=http,
                                  max_retries=0) as c:
        yield c
