"""A model backend that runs a Hugging Face model directory in-process (``imrelay[local]``).

Theory of operation: torch and transformers are imported, and the model and tokenizer loaded
from ``model_path`` (``local_files_only=True``: nothing is ever downloaded), the first time the
backend is used or probed. Loading and generating run in a thread pool of ``threads`` workers,
never on the event loop. One generation is one job on that pool: the worker renders the prompt,
tokenizes it and calls ``model.generate`` with a streamer and a stopping criterion.

The streamer is transformers' ``TextStreamer`` (the decoder behind ``TextIteratorStreamer``:
text is released at word ends, line ends and CJK characters, so a multi-token character is
never split). Instead of a blocking queue read by yet another thread, each released piece is
handed to the event loop with ``call_soon_threadsafe`` into an ``asyncio.Queue`` that
:meth:`LocalBackend.generate` reads, so deltas arrive as they are generated and a pool of one
worker suffices. The worker's last item is an end marker carrying the token counts, or the
error it met.

``timeout_s`` bounds one answer from when the model is loaded (the first answer also waits for
the load): every wait on the queue runs under one deadline, applied around each wait rather
than around the generator body (a timeout scope spanning a ``yield`` would cancel the consumer).
When the deadline passes, or the consumer stops early, the job's stop flag is set and the
stopping criterion ends ``generate`` at the next token; the criterion also checks the deadline
itself, so a worker never runs past it even when nobody is reading.

The prompt: the tokenizer's chat template when it has one (``add_generation_prompt=True``);
otherwise :func:`build_fallback_prompt`. Only text reaches the model (image parts are dropped).
When the model declares a longest sequence (``max_position_embeddings``), the answer is capped
to fit it and the prompt's oldest tokens are dropped to make room. ``temperature: 0`` decodes
greedily; otherwise tokens are sampled at that temperature, with the model's own generation
settings (``generation_config.json``: top-p, stop tokens, …) kept.

Errors, translated here:

======================================  ==============================================
problem                                 imrelay error
======================================  ==============================================
torch or transformers not installed     ``ModelUnavailable`` naming :data:`INSTALL_HINT`
directory missing, no ``config.json``   ``ModelUnavailable``
the files do not load                   ``ModelUnavailable``
no answer within ``timeout_s``          ``ModelTimeout(retryable=True)``
generation fails (prompt, template, …)  ``ModelResponseError``
closed before or while answering        ``ModelUnavailable``
======================================  ==============================================
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import logging
import pathlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

from imrelay.config import LocalModelSettings
from imrelay.errors import ModelError, ModelResponseError, ModelTimeout, ModelUnavailable
from imrelay.models.base import ChatMessage, Generation
from imrelay.models.echo import extract_content_text

__all__ = ["INSTALL_HINT", "LocalBackend", "build_fallback_prompt"]

logger = logging.getLogger(__name__)

INSTALL_HINT: Final = "pip install 'imrelay[local]'"
"""How to install what local models need (named in the error when it is missing)."""

_DETAIL_MAX: Final = 200

ImportModule = Callable[[str], ModuleType]


def build_fallback_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt for a tokenizer without a chat template.

    Each message becomes a ``<role>: <text>`` line (its text parts; images are dropped), and a
    last ``assistant:`` line asks for the answer::

        system: You are helpful.
        user: hello
        assistant:

    Args:
        messages: OpenAI-shaped chat messages.

    Returns:
        The prompt text.
    """
    lines = [
        f"{message.get('role', 'user')}: {extract_content_text(message.get('content'))[0]}"
        for message in messages
    ]
    lines.append("assistant:")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A loaded model, its tokenizer and what generation needs of the libraries."""

    torch: Any
    transformers: Any
    model: Any
    tokenizer: Any
    max_positions: int | None
    description: str


@dataclass(frozen=True, slots=True)
class _End:
    """The last item of a job: token counts and time, or what cut it short."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_time_s: float = 0.0
    finish_reason: str = "stop"
    error: BaseException | None = None
    stopped: bool = False  # by the stop flag (deadline, aclose), not by the model


class _Job:
    """One generation, shared by the event loop and the worker thread that runs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | _End] = asyncio.Queue()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + timeout_s  # for the worker; the loop keeps its own

    def send(self, item: str | _End) -> None:
        """Hand ``item`` to the event loop (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will read the rest
            self.stop.set()

    def should_stop(self) -> bool:
        """Whether the worker should end the generation now."""
        if not self.stop.is_set() and time.monotonic() >= self.deadline:
            self.stop.set()
        return self.stop.is_set()


class LocalBackend:
    """A :class:`~imrelay.models.base.ModelBackend` running a model directory in-process.

    Args:
        name: the configured model name (used in errors and logs).
        settings: the model directory, sampling, timeout and thread settings.
        executor: the thread pool that loads and runs the model; when given, its owner shuts it
            down. By default a pool of ``settings.threads`` workers is built and owned.
        clock: a monotonic clock in seconds, for the timings in :class:`Generation`.
        import_module: imports ``torch`` and ``transformers`` (injected by tests).
    """

    def __init__(
        self,
        name: str,
        settings: LocalModelSettings,
        *,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.perf_counter,
        import_module: ImportModule = importlib.import_module,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._import = import_module
        self._owns_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=settings.threads, thread_name_prefix=f"imrelay-local-{name}"
        )
        self._loading: asyncio.Future[_Loaded] | None = None
        self._jobs: set[_Job] = set()
        self._closed = False

    # -- the ModelBackend protocol ----------------------------------------------------------

    async def generate(
        self, messages: Sequence[ChatMessage], result: Generation
    ) -> AsyncIterator[str]:
        """Run the model on ``messages``; yield text deltas as they are generated.

        Args:
            messages: the chat messages (system prompt and history included).
            result: filled with the text, first-token and total time, prompt and completion
                token counts, and the time spent in ``generate`` as ``model_time_s``;
                ``extra["finish_reason"]`` is ``"length"`` when the answer reached its token
                limit, else ``"stop"``. On error, ``result.text`` holds what arrived before it.

        Yields:
            Text deltas.

        Raises:
            ModelTimeout: no full answer within ``timeout_s``.
            ModelUnavailable: the model cannot be loaded, or the backend was closed before the
                answer was complete.
            ModelResponseError: the generation failed.
        """
        started = self._clock()
        loaded = await self._ensure_loaded()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout_s
        job = _Job(loop, self.settings.timeout_s)
        prompt = [dict(message) for message in messages]
        parts: list[str] = []
        self._jobs.add(job)
        try:
            try:
                running = loop.run_in_executor(self._executor, self._run, loaded, prompt, job)
            except RuntimeError as exc:  # the pool was shut down
                raise self._closed_error() from exc
            running.add_done_callback(lambda future: self._dropped(future, job))
            while not isinstance(item := await self._next(job, deadline), _End):
                if result.first_token_s is None:
                    result.first_token_s = self._clock() - started
                parts.append(item)
                yield item
            if item.error is not None:
                raise self._generation_error(item.error)
            if item.stopped:  # a cut-short answer is never passed off as a whole one
                raise self._closed_error() if self._closed else self._timeout_error()
            result.prompt_tokens = item.prompt_tokens
            result.completion_tokens = item.completion_tokens
            result.model_time_s = item.model_time_s
            result.extra["finish_reason"] = item.finish_reason
        finally:
            job.stop.set()
            self._jobs.discard(job)
            result.text = "".join(parts)
            result.total_s = self._clock() - started

    async def probe(self) -> str:
        """Load the model (once) and describe it.

        Returns:
            e.g. ``"local gpt2 model, 1.2M parameters, chat template, on cpu"``.

        Raises:
            ModelUnavailable: the model cannot be loaded, or the backend is closed.
        """
        return (await self._ensure_loaded()).description

    async def aclose(self) -> None:
        """Stop generations in progress (their callers get ``ModelUnavailable``), release the
        model, and shut down an owned thread pool."""
        self._closed = True
        for job in list(self._jobs):
            job.stop.set()
        self._loading = None
        if self._owns_executor:
            # Waiting for the workers is quick (each stops at its next token) but blocking.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # -- loading ----------------------------------------------------------------------------

    async def _ensure_loaded(self) -> _Loaded:
        if self._closed:
            raise self._closed_error()
        if self._loading is None:
            try:
                future = asyncio.get_running_loop().run_in_executor(self._executor, self._load)
            except RuntimeError as exc:  # the pool was shut down
                raise self._closed_error() from exc
            future.add_done_callback(_retrieve)
            self._loading = future
        loading = self._loading
        try:
            # Shielded: a caller that gives up does not cancel the load others wait for.
            return await asyncio.shield(loading)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if loading.cancelled() and (task is None or not task.cancelling()):
                raise self._closed_error() from None  # aclose() dropped the queued load
            raise
        except Exception as exc:
            if self._loading is loading:
                self._loading = None  # try again on the next call
            if isinstance(exc, ModelError):
                raise
            raise ModelUnavailable(
                f"model {self.name} could not be loaded: {_describe(exc)}", backend=self.name
            ) from exc

    def _load(self) -> _Loaded:
        """Import the libraries and load the model and tokenizer (in a worker thread)."""
        name = self.name
        directory = pathlib.Path(self.settings.model_path).expanduser()
        if not (directory / "config.json").is_file():
            raise ModelUnavailable(
                f"model {name}: {directory} is not a model directory (no config.json)",
                backend=name,
            )
        try:
            torch = self._import("torch")
            transformers = self._import("transformers")
        except ImportError as exc:
            raise ModelUnavailable(
                f"model {name} is a local model, which needs torch and transformers: "
                f"{INSTALL_HINT}",
                backend=name,
            ) from exc
        started = time.perf_counter()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(directory), local_files_only=True
            )
            model.eval()
        except Exception as exc:  # a third-party loader: anything it raises means "cannot load"
            raise ModelUnavailable(
                f"model {name} could not be loaded from {directory}: {_describe(exc)}",
                backend=name,
            ) from exc
        parameters = sum(int(p.numel()) for p in model.parameters())
        template = "chat template" if tokenizer.chat_template else "no chat template"
        description = (
            f"local {model.config.model_type} model, {_human(parameters)} parameters, "
            f"{template}, on {model.device}"
        )
        logger.info(
            "local model %s loaded from %s in %.1f s: %s",
            name,
            directory,
            time.perf_counter() - started,
            description,
        )
        positions = getattr(model.config, "max_position_embeddings", None)
        return _Loaded(
            torch=torch,
            transformers=transformers,
            model=model,
            tokenizer=tokenizer,
            max_positions=positions if isinstance(positions, int) and positions > 1 else None,
            description=description,
        )

    # -- generating -------------------------------------------------------------------------

    async def _next(self, job: _Job, deadline: float) -> str | _End:
        try:
            async with asyncio.timeout_at(deadline):
                return await job.queue.get()
        except TimeoutError:
            job.stop.set()
            raise self._timeout_error() from None

    def _run(self, loaded: _Loaded, messages: list[dict[str, Any]], job: _Job) -> None:
        """Generate one answer, streaming its text to ``job`` (in a worker thread)."""
        end = _End(stopped=True)
        try:
            if not job.should_stop():
                end = self._generate(loaded, messages, job)
        except Exception as exc:  # reported to the caller, who translates it
            end = _End(error=exc)
        job.send(end)

    def _generate(self, loaded: _Loaded, messages: list[dict[str, Any]], job: _Job) -> _End:
        torch, model, tokenizer = loaded.torch, loaded.model, loaded.tokenizer
        ids = self._encode(tokenizer, messages)
        new_tokens = self.settings.max_tokens
        if loaded.max_positions is not None:
            new_tokens = min(new_tokens, loaded.max_positions - 1)
            ids = ids[-(loaded.max_positions - new_tokens) :]
        input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
        streamer = loaded.transformers.TextStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True
        )

        def release(text: str, stream_end: bool = False) -> None:
            if text:
                job.send(text)

        # TextStreamer prints what it releases; here it goes to the event loop instead.
        streamer.on_finalized_text = release

        def stop(input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],), job.should_stop(), dtype=torch.bool, device=input_ids.device
            )

        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=self._generation_config(loaded, new_tokens),
                streamer=streamer,
                stopping_criteria=loaded.transformers.StoppingCriteriaList([stop]),
            )
        completion = int(output.shape[-1]) - len(ids)
        return _End(
            prompt_tokens=len(ids),
            completion_tokens=completion,
            model_time_s=time.perf_counter() - started,
            finish_reason="length" if completion >= new_tokens else "stop",
            stopped=job.stop.is_set() and completion < new_tokens,
        )

    def _encode(self, tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
        """The prompt's token ids: the chat template's rendering, else the fallback format."""
        chat = [
            {
                "role": str(m.get("role", "user")),
                "content": extract_content_text(m.get("content"))[0],
            }
            for m in messages
        ]
        if not tokenizer.chat_template:
            encoded = tokenizer(build_fallback_prompt(chat), add_special_tokens=True)
            return list(encoded["input_ids"])
        try:
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except Exception:
            # Some templates (Gemma's, Mistral's) refuse a system role: fold it into the first
            # user message and try once more.
            if not any(m["role"] == "system" for m in chat):
                raise
            text = tokenizer.apply_chat_template(
                _fold_system(chat), add_generation_prompt=True, tokenize=False
            )
        # The template writes the special tokens itself.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generation_config(self, loaded: _Loaded, new_tokens: int) -> Any:
        """The model's own generation settings with this backend's length and sampling."""
        model, tokenizer = loaded.model, loaded.tokenizer
        config = copy.deepcopy(model.generation_config)
        config.max_new_tokens = new_tokens
        config.max_length = None
        config.min_new_tokens = None
        config.min_length = 0
        config.num_beams = 1
        if self.settings.temperature == 0:
            config.do_sample = False
            # Sampling settings mean nothing to greedy decoding (and transformers warns).
            config.temperature = None
            config.top_p = None
            config.top_k = None
            config.min_p = None
            config.typical_p = None
        else:
            config.do_sample = True
            config.temperature = self.settings.temperature
        if config.pad_token_id is None:
            eos = config.eos_token_id
            config.pad_token_id = (
                tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else (eos[0] if isinstance(eos, list) and eos else eos)
            )
        return config

    # -- errors -----------------------------------------------------------------------------

    def _dropped(self, future: asyncio.Future[None], job: _Job) -> None:
        """End a job that aclose() dropped from the pool's queue before it ran."""
        if future.cancelled():
            job.queue.put_nowait(_End(error=self._closed_error()))

    def _timeout_error(self) -> ModelTimeout:
        return ModelTimeout(
            f"model {self.name} did not answer within {self.settings.timeout_s:g} s",
            backend=self.name,
            retryable=True,
        )

    def _closed_error(self) -> ModelUnavailable:
        return ModelUnavailable(f"model {self.name} is closed", backend=self.name)

    def _generation_error(self, exc: BaseException) -> ModelError:
        if isinstance(exc, ModelError):
            return exc
        error = ModelResponseError(
            f"model {self.name} failed while generating: {_describe(exc)}", backend=self.name
        )
        error.__cause__ = exc
        return error


def _fold_system(chat: list[dict[str, str]]) -> list[dict[str, str]]:
    """Move system messages' text to the start of the first user message."""
    system = "\n\n".join(m["content"] for m in chat if m["role"] == "system" and m["content"])
    rest = [dict(m) for m in chat if m["role"] != "system"]
    if not system:
        return rest
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{system}\n\n{message['content']}"
            return rest
    return [{"role": "user", "content": system}, *rest]


def _describe(exc: BaseException) -> str:
    """``TypeName: first line of the message``, at most :data:`_DETAIL_MAX` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


def _human(count: int) -> str:
    """``1234567`` → ``"1.2M"``."""
    for size, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "k")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


def _retrieve(future: asyncio.Future[_Loaded]) -> None:
    """Mark a load's error as retrieved (it is raised to whoever awaits it, if anyone does)."""
    if not future.cancelled():
        future.exception()
