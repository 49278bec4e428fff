"""LocalBackend: a Hugging Face model directory run in-process, on a tiny model built offline."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from _support import TIMEOUT_FACTOR
from imrelay.config import LocalModelSettings
from imrelay.errors import ModelResponseError, ModelTimeout, ModelUnavailable
from imrelay.models import LocalBackend, build_model
from imrelay.models.base import ChatMessage, Generation
from imrelay.models.local import INSTALL_HINT, build_fallback_prompt
from imrelay.sim.local_model import build_tiny_model

QUESTION: list[ChatMessage] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "你好 world, what is the answer"},
]


def local_settings(model_dir: Path, **overrides: Any) -> LocalModelSettings:
    """Settings for a local model in ``model_dir``: greedy and short unless overridden."""
    data: dict[str, Any] = {
        "type": "local",
        "model_path": str(model_dir),
        "max_tokens": 8,
        "temperature": 0,
        "timeout_s": 30.0,
    }
    data.update(overrides)
    return LocalModelSettings(**data)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """A one-worker pool injected into backends, so tests can see whether it is busy."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-local")
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
async def make_local(tiny_model_dir: Path) -> AsyncIterator[Any]:
    """Build LocalBackends (on the tiny model unless ``model_dir`` is given); closed at the end."""
    built: list[LocalBackend] = []

    def make(model_dir: Path | None = None, **kwargs: Any) -> LocalBackend:
        backend_kw = {k: kwargs.pop(k) for k in ("executor", "import_module") if k in kwargs}
        settings = local_settings(model_dir or tiny_model_dir, **kwargs)
        backend = LocalBackend("local", settings, **backend_kw)
        built.append(backend)
        return backend

    yield make
    for backend in built:
        await backend.aclose()


async def answer(
    backend: LocalBackend, messages: list[ChatMessage] = QUESTION
) -> tuple[list[str], Generation]:
    """Run one generation to the end: its deltas and its filled Generation."""
    result = Generation()
    deltas = [delta async for delta in backend.generate(messages, result)]
    return deltas, result


async def pool_is_free(executor: ThreadPoolExecutor, within_s: float) -> bool:
    """Whether a no-op submitted to ``executor`` runs within ``within_s`` seconds."""
    future = asyncio.wrap_future(executor.submit(lambda: None))
    try:
        await asyncio.wait_for(future, within_s * TIMEOUT_FACTOR)
    except TimeoutError:
        return False
    return True


# -- answers ---------------------------------------------------------------------------------


async def test_local_generate_streams_deltas_and_fills_generation(make_local: Any) -> None:
    """Deltas arrive piece by piece, add up to result.text, and the usage is filled in."""
    deltas, result = await answer(make_local(max_tokens=24))
    assert len(deltas) > 1
    assert all(deltas)
    assert "".join(deltas) == result.text
    assert result.text.strip()
    assert result.completion_tokens == 24
    assert result.prompt_tokens is not None
    assert result.prompt_tokens > 10
    assert result.first_token_s is not None
    assert 0 < result.first_token_s <= result.total_s
    assert result.model_time_s is not None
    assert 0 < result.model_time_s <= result.total_s
    assert result.extra["finish_reason"] == "length"


async def test_local_generate_max_tokens_bounds_the_answer(make_local: Any) -> None:
    """max_tokens caps the answer's tokens; a greedy short answer is the long one's start."""
    _, short = await answer(make_local(max_tokens=3))
    _, long = await answer(make_local(max_tokens=16))
    assert (short.completion_tokens, long.completion_tokens) == (3, 16)
    assert len(short.text) < len(long.text)
    assert long.text.startswith(short.text)


async def test_local_generate_temperature_zero_is_deterministic(make_local: Any) -> None:
    """Greedy decoding gives the same answer every time; sampling does not."""
    greedy = make_local(max_tokens=16)
    first = (await answer(greedy))[1].text
    assert [(await answer(greedy))[1].text for _ in range(2)] == [first, first]
    sampling = make_local(max_tokens=16, temperature=2.0)
    sampled = {(await answer(sampling))[1].text for _ in range(4)}
    assert len(sampled) > 1


async def test_local_generate_without_chat_template_uses_fallback_prompt(
    make_local: Any, tiny_plain_model_dir: Path
) -> None:
    """A tokenizer without a chat template still answers, from the role-per-line prompt."""
    backend = make_local(tiny_plain_model_dir)
    assert "no chat template" in await backend.probe()
    _, result = await answer(backend)
    assert result.text.strip()
    assert result.completion_tokens == 8


def test_build_fallback_prompt_lists_roles_then_asks_the_assistant() -> None:
    """Each message is a role line (text parts only), and the last line asks for the answer."""
    messages: list[ChatMessage] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "你好"},
    ]
    assert build_fallback_prompt(messages) == (
        "system: be brief\nuser: hi\nassistant: hello\nuser: 你好\nassistant:"
    )


async def test_local_generate_folds_system_prompt_when_template_refuses_it(
    make_local: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A template that refuses the system role gets the system text in the first user turn."""
    strict = tmp_path / "strict"
    shutil.copytree(tiny_model_dir, strict)
    template = (strict / "chat_template.jinja").read_text(encoding="utf-8")
    refusal = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('system role not supported') }}{% endif %}"
    )
    (strict / "chat_template.jinja").write_text(refusal + template, encoding="utf-8")
    backend = make_local(strict)
    _, with_system = await answer(backend)
    _, without = await answer(backend, [QUESTION[1]])
    assert with_system.text.strip()
    assert with_system.prompt_tokens is not None
    assert without.prompt_tokens is not None
    assert with_system.prompt_tokens > without.prompt_tokens  # "be brief" reached the model


async def test_local_generate_drops_oldest_prompt_tokens_to_fit(
    make_local: Any, tmp_path: Path
) -> None:
    """A prompt longer than the model's window loses its oldest tokens; the answer still fits."""
    small = build_tiny_model(tmp_path / "small", n_positions=64)
    backend = make_local(small, max_tokens=16)
    long_question: list[ChatMessage] = [{"role": "user", "content": "hello world " * 100}]
    _, result = await answer(backend, long_question)
    assert result.completion_tokens == 16
    assert result.prompt_tokens == 64 - 16


# -- time ------------------------------------------------------------------------------------


async def test_local_generate_timeout_raises_model_timeout_and_stops_worker(
    make_local: Any, pool: ThreadPoolExecutor
) -> None:
    """Past timeout_s the answer fails with ModelTimeout and the worker stops generating."""
    backend = make_local(max_tokens=3000, timeout_s=0.3, executor=pool)
    await backend.probe()  # the timeout counts from when the model is loaded
    result = Generation()
    started = time.monotonic()
    with pytest.raises(ModelTimeout, match=r"did not answer within 0\.3 s") as info:
        async for _ in backend.generate(QUESTION, result):
            pass
    assert info.value.retryable
    assert time.monotonic() - started < 2.0 * TIMEOUT_FACTOR
    assert result.text  # what arrived before the deadline is kept
    # 3000 tokens take several seconds; a stopped worker is free at once.
    assert await pool_is_free(pool, within_s=1.0)


async def test_local_generate_consumer_leaving_early_stops_worker(
    make_local: Any, pool: ThreadPoolExecutor
) -> None:
    """A consumer that stops reading ends the generation at the next token."""
    backend = make_local(max_tokens=3000, executor=pool)
    stream = backend.generate(QUESTION, Generation())
    assert await anext(stream)
    await stream.aclose()
    assert await pool_is_free(pool, within_s=1.0)


async def test_local_generate_keeps_event_loop_responsive(make_local: Any) -> None:
    """While the model loads and generates, another task keeps running on the event loop."""
    backend = make_local(max_tokens=1000)
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        started = time.monotonic()
        _, result = await answer(backend)
        elapsed = time.monotonic() - started
    finally:
        done.set()
        await ticker
    assert result.completion_tokens == 1000
    assert elapsed > 0.3  # long enough for the ticks to mean something
    assert len(gaps) > elapsed / 0.05  # the ticker ran all along…
    assert max(gaps) < 0.25 * TIMEOUT_FACTOR  # …and was never held up for long


# -- loading and errors ----------------------------------------------------------------------


async def test_local_probe_loads_once_and_describes_the_model(make_local: Any) -> None:
    """probe() loads the model (once for the backend's life) and describes it."""
    imported: list[str] = []

    def counting_import(name: str) -> ModuleType:
        imported.append(name)
        return importlib.import_module(name)

    backend = make_local(import_module=counting_import)
    description = await backend.probe()
    assert description.startswith("local gpt2 model, ")
    assert "k parameters, chat template, on cpu" in description
    assert await backend.probe() == description
    await answer(backend)
    assert imported == ["torch", "transformers"]


async def test_local_concurrent_first_calls_share_one_load(make_local: Any) -> None:
    """Answers asked for before the model is loaded all wait for the same load."""
    imported: list[str] = []

    def counting_import(name: str) -> ModuleType:
        imported.append(name)
        return importlib.import_module(name)

    backend = make_local(import_module=counting_import, threads=2)
    results = await asyncio.gather(*(answer(backend) for _ in range(3)))
    assert [r.completion_tokens for _, r in results] == [8, 8, 8]
    assert imported == ["torch", "transformers"]


async def test_local_load_makes_no_network_connection(
    make_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading and answering read only the model directory: no connection is attempted."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backend = make_local()
    await backend.probe()
    _, result = await answer(backend)
    assert result.text.strip()
    assert attempts == []


async def test_local_missing_directory_is_model_unavailable(
    make_local: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A model directory gone since the configuration was loaded is reported, not crashed on."""
    gone = tmp_path / "gone"
    shutil.copytree(tiny_model_dir, gone)
    backend = make_local(gone)
    shutil.rmtree(gone)
    with pytest.raises(ModelUnavailable, match=r"is not a model directory \(no config.json\)"):
        await backend.probe()
    with pytest.raises(ModelUnavailable, match="is not a model directory"):
        await answer(backend)


async def test_local_unreadable_model_is_model_unavailable(
    make_local: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Model files transformers cannot load give ModelUnavailable naming the cause."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    backend = make_local(broken)
    with pytest.raises(ModelUnavailable, match="could not be loaded from") as info:
        await backend.probe()
    assert info.value.backend == "local"


async def test_local_missing_extra_names_the_install_command(make_local: Any) -> None:
    """Without torch or transformers, the error says which extra to install."""

    def no_torch(name: str) -> ModuleType:
        raise ModuleNotFoundError(f"No module named {name!r}")

    backend = make_local(import_module=no_torch)
    with pytest.raises(ModelUnavailable) as info:
        await backend.probe()
    assert INSTALL_HINT in str(info.value)
    assert INSTALL_HINT == "pip install 'imrelay[local]'"


async def test_local_failed_load_is_tried_again(make_local: Any) -> None:
    """A load that failed is attempted again on the next call (say, once the extra is there)."""
    calls: list[str] = []

    def flaky(name: str) -> ModuleType:
        calls.append(name)
        if len(calls) == 1:
            raise ModuleNotFoundError("No module named 'torch'")
        return importlib.import_module(name)

    backend = make_local(import_module=flaky)
    with pytest.raises(ModelUnavailable):
        await backend.probe()
    assert (await backend.probe()).startswith("local gpt2 model")


async def test_local_generation_error_is_model_response_error(
    make_local: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """An error inside generation (here a chat template that fails) is a ModelResponseError."""
    bad = tmp_path / "bad-template"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "chat_template.jinja").write_text("{{ raise_exception('no') }}", encoding="utf-8")
    backend = make_local(bad)
    with pytest.raises(ModelResponseError, match="failed while generating") as info:
        await answer(backend, [QUESTION[1]])
    assert not info.value.retryable


async def test_local_closed_backend_is_unavailable(make_local: Any) -> None:
    """After aclose(), generate and probe say the model is closed."""
    backend = make_local()
    await backend.probe()
    await backend.aclose()
    with pytest.raises(ModelUnavailable, match="model local is closed"):
        await answer(backend)
    with pytest.raises(ModelUnavailable, match="model local is closed"):
        await backend.probe()


async def test_local_aclose_stops_running_generation(
    make_local: Any, pool: ThreadPoolExecutor
) -> None:
    """aclose() stops a generation in progress, whose consumer gets ModelUnavailable."""
    backend = make_local(max_tokens=3000, executor=pool)
    result = Generation()
    stream = backend.generate(QUESTION, result)
    assert await anext(stream)
    await backend.aclose()
    assert await pool_is_free(pool, within_s=1.0)
    with pytest.raises(ModelUnavailable, match="model local is closed"):
        async for _ in stream:
            pass
    assert result.text  # what arrived before is kept


async def test_build_model_local_is_local_backend(tiny_model_dir: Path) -> None:
    """type: local builds a LocalBackend that answers."""
    backend = build_model("m", local_settings(tiny_model_dir))
    try:
        assert isinstance(backend, LocalBackend)
        _, result = await answer(backend)
        assert result.completion_tokens == 8
    finally:
        await backend.aclose()


async def test_local_aclose_drops_queued_generation(make_local: Any) -> None:
    """A generation still waiting for a worker when aclose() runs fails as closed."""
    backend = make_local(max_tokens=3000)
    await backend.probe()
    first = backend.generate(QUESTION, Generation())
    assert await anext(first)  # the only worker is busy with this one
    second = asyncio.create_task(answer(backend))
    await asyncio.sleep(0.01)  # let the second generation queue behind the first
    await backend.aclose()
    with pytest.raises(ModelUnavailable, match="model local is closed"):
        await second
    await first.aclose()


async def test_local_load_dropped_from_a_shut_down_pool_is_closed(
    make_local: Any, pool: ThreadPoolExecutor
) -> None:
    """A load still queued when its injected pool is shut down fails as closed, not cancelled."""
    gate = threading.Event()
    busy = pool.submit(gate.wait, 10)
    backend = make_local(executor=pool)
    probe = asyncio.create_task(backend.probe())
    await asyncio.sleep(0.01)  # the load is queued behind the busy worker
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    with pytest.raises(ModelUnavailable, match="model local is closed"):
        await probe
    assert busy.result(timeout=5) is True
