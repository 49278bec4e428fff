"""Wires everything into one running gateway, with one aiohttp server.

Theory of operation: :meth:`Gateway.start` opens the store, builds the model backends, the
platform connectors, the pipeline and the worker, resumes unfinished inbox messages, starts the
inbox purge (handled messages older than ``storage.retention_s``, at start and hourly), starts
the HTTP server (``/healthz``, ``/readyz``, ``/metrics``) and finally starts intake.
:meth:`Gateway.stop` runs the same steps backwards: intake stops first (no new frames are
read; ACKs for messages already committed still go out), in-flight work drains up to
``pipeline.drain_timeout_s``, and what is left stays in the inbox for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from imrelay import __version__
from imrelay._loop import resettle_heap
from imrelay.config import Settings
from imrelay.errors import AuthError, ConfigError, StoreError
from imrelay.http import HTTPClient, ProxyURL
from imrelay.models import FallbackChain, build_model
from imrelay.models.base import ModelBackend
from imrelay.observability.metrics import Metrics, ProcessLimits, read_process_limits
from imrelay.pipeline.command import CommandStage
from imrelay.pipeline.context import Stage, TurnContext
from imrelay.pipeline.filter import AccessStage, DedupStage, KindStage
from imrelay.pipeline.format import FormatStage
from imrelay.pipeline.guard import (
    AdminCommandStage,
    MemoryModelPins,
    PermissionStage,
    RateLimitStage,
    audit_settled,
)
from imrelay.pipeline.history import HistoryStage
from imrelay.pipeline.media import Fetch, MediaStage
from imrelay.pipeline.model import GenerateStage
from imrelay.pipeline.route import RouteStage
from imrelay.pipeline.runner import Runner
from imrelay.pipeline.safety import build_safety_stages
from imrelay.pipeline.send import ReplySender, SendStage
from imrelay.pipeline.think import ThinkStage
from imrelay.platforms.base import Platform
from imrelay.platforms.dingtalk.connector import DingTalkConnector
from imrelay.routing.canary import (
    CanaryBook,
    CanaryController,
    CanaryStateFile,
    canary_state_path,
)
from imrelay.routing.rules import Router
from imrelay.routing.tokens import load_token_counter
from imrelay.security.access import AccessPolicy
from imrelay.security.audit import AuditLog
from imrelay.security.pii import PIIMasker
from imrelay.security.secrets import SecretAgeCollector, SecretStore
from imrelay.security.words import WordFilter
from imrelay.stores import open_store
from imrelay.stores.base import MessageState, Store
from imrelay.worker import Worker

__all__ = ["Gateway", "build_platforms", "close_opened"]

logger = logging.getLogger(__name__)

_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10, sock_read=30)
# Outbound connections per origin (a DingTalk API host, a model endpoint): enough for every
# in-flight message of the default pipeline.max_concurrency to have its own.
_HTTP_CONNECTIONS = 512
# how often handled messages past storage.retention_s are forgotten (and once at start)
_PURGE_INTERVAL_S = 3600.0
# Settings a reload cannot apply: they need new connections, files or worker limits.
_RESTART_ONLY = (
    "server",
    "storage",
    "platforms",
    "security.audit",
    "pipeline.max_concurrency",
    "pipeline.max_pending",
    "pipeline.max_attempts",
    "pipeline.loop_lag_target_ms",
)


def core_share(read: Callable[[], ProcessLimits]) -> float:
    """The share of a core the event loop may use: 1, or the CPU quota when that is less.

    The worker's adaptive limit measures saturation against it. Limits that cannot be read
    (an unusual cgroup file, a platform without them) count as a whole core, with a warning:
    the gateway starts either way.
    """
    try:
        cores = float(read().cpu_cores)
    except Exception as exc:  # the limit is an optimisation; never a reason not to start
        logger.warning("could not read the process's CPU limit (%s); assuming one core", exc)
        return 1.0
    if not cores > 0:  # 0, negative or NaN
        return 1.0
    return min(1.0, max(cores, 0.01))


def _get(settings: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        settings = getattr(settings, part)
    return settings


def _with(settings: Any, dotted: str, value: Any) -> Any:
    """A copy of ``settings`` with the setting at ``dotted`` replaced by ``value``."""
    head, _, rest = dotted.partition(".")
    if rest:
        value = _with(getattr(settings, head), rest, value)
    return settings.model_copy(update={head: value})


async def _close_models(models: Iterable[ModelBackend]) -> None:
    for model in models:
        with contextlib.suppress(Exception):
            await model.aclose()


def build_platforms(
    settings: Settings,
    http: aiohttp.ClientSession,
    metrics: Metrics,
    client: HTTPClient | None = None,
    *,
    opened: list[aiohttp.ClientSession | HTTPClient] | None = None,
) -> dict[str, Platform]:
    """One connector per configured platform; REST calls go through ``client`` when given.

    A platform with a ``proxy`` gets a session (and a client, when ``client`` is given) of its
    own that go through it; they are appended to ``opened``, for the caller to close once the
    platforms are done with (:func:`close_opened`).

    Raises:
        ValueError: a platform has a proxy and ``opened`` is not given.
    """
    platforms: dict[str, Platform] = {}
    for name, conf in settings.platforms.items():
        own_http, own_client = http, client
        if conf.proxy is not None:
            if opened is None:
                raise ValueError("build_platforms: a proxied platform needs `opened`")
            own_http, own_client = _proxied(conf.proxy.get_secret_value(), http, client)
            opened.append(own_http)
            if own_client is not None:
                opened.append(own_client)
        platforms[name] = DingTalkConnector(name, conf, own_http, metrics, client=own_client)
    return platforms


def _proxied(
    proxy: str, http: aiohttp.ClientSession, client: HTTPClient | None
) -> tuple[aiohttp.ClientSession, HTTPClient | None]:
    """A session and a client like ``http`` and ``client`` that go through ``proxy``."""
    url = ProxyURL.parse(proxy)  # checked by the settings
    # aiohttp 3.x has no session-wide proxy headers, and calls its session-wide proxy_auth
    # deprecated (for 4.0, which the dependency pin excludes): the warning is not the user's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        auth = None
        if url.user is not None:  # UTF-8, as imrelay.http encodes the same credentials
            auth = aiohttp.BasicAuth(url.user, url.password, encoding="utf-8")
        session = aiohttp.ClientSession(
            timeout=http.timeout, proxy=f"http://{url.address}", proxy_auth=auth
        )
    tunnel = None
    if client is not None:
        tunnel = HTTPClient(limit=client.limit, user_agent=f"imrelay/{__version__}", proxy=proxy)
    return session, tunnel


async def close_opened(opened: list[aiohttp.ClientSession | HTTPClient]) -> None:
    """Close what :func:`build_platforms` opened (each of them, whatever the others do)."""
    while opened:
        thing = opened.pop()
        try:
            if isinstance(thing, HTTPClient):
                await thing.aclose()
            else:
                await thing.close()
        except Exception as exc:  # closing is best effort: the rest still gets closed
            logger.warning("closing a proxied http client failed: %s", type(exc).__name__)


class Gateway:
    """The running gateway. Every I/O dependency can be injected; defaults come from settings."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        store: Store | None = None,
        models: Mapping[str, ModelBackend] | None = None,
        wall_clock: Callable[[], float] = time.time,
        reloader: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self._reloader = reloader
        self.metrics = Metrics(registry)
        self.wall_clock = wall_clock
        self._store = store
        self._models = dict(models) if models is not None else None
        self.store: Store
        self.models: dict[str, ModelBackend] = {}
        self.platforms: dict[str, Platform] = {}
        self.worker: Worker
        self.http: aiohttp.ClientSession | None = None
        self.client: HTTPClient | None = None
        # sessions and clients of platforms that go through a proxy (build_platforms)
        self._proxied: list[aiohttp.ClientSession | HTTPClient] = []
        self.port = 0
        self._web: web.AppRunner | None = None
        self._intake: dict[str, asyncio.Task[None]] = {}
        self.fatal: asyncio.Future[BaseException] | None = None
        self.audit: AuditLog | None = None
        self._pins = MemoryModelPins()
        self.canary_book = CanaryBook(CanaryStateFile(None))
        self.canaries: CanaryController | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self._purge_task: asyncio.Task[None] | None = None
        self._rate_limits: RateLimitStage | None = None
        self._stopped = False
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build and start everything (see the module docstring)."""
        s = self.settings
        self.fatal = asyncio.get_running_loop().create_future()
        self.store = self._store or open_store(
            s.storage.url,
            commit_interval_ms=s.storage.commit_interval_ms,
            dedup_ttl_s=s.storage.dedup_ttl_s,
        )
        await self.store.open()
        self._dedup = DedupStage(self.store)
        if s.security.audit.enabled:
            self.audit = AuditLog.from_settings(s.security.audit, clock=self.wall_clock)
            await self.audit.open()
        try:
            state_path = canary_state_path(s.storage.url)
        except ValueError as exc:
            raise ConfigError(str(exc), key="storage.url") from None
        self.canary_book = CanaryBook(CanaryStateFile(state_path))
        await asyncio.to_thread(self.canary_book.load)
        self._watch_secret_ages()
        self.http = aiohttp.ClientSession(timeout=_HTTP_TIMEOUT)
        self.client = HTTPClient(limit=_HTTP_CONNECTIONS, user_agent=f"imrelay/{__version__}")
        self.models = self._models or {name: build_model(name, m) for name, m in s.models.items()}
        self.platforms = build_platforms(
            s, self.http, self.metrics, self.client, opened=self._proxied
        )
        self.worker = self._build_worker()
        await self.worker.resume()
        self.worker.start()
        self.canaries = CanaryController(
            s.routing, self.canary_book, self.metrics, audit=self.audit, clock=self.wall_clock
        )
        if self.canaries.canaries:
            self._canary_task = asyncio.create_task(self.canaries.run(), name="canary")
        self._purge_task = asyncio.create_task(self._purge_loop(), name="inbox-purge")
        await self._start_web()
        for name, platform in self.platforms.items():
            task = asyncio.create_task(platform.run(self.worker), name=f"intake:{name}")
            task.add_done_callback(self._intake_ended)
            self._intake[name] = task
        logger.info(
            "gateway started: %d platform(s), %d model(s), http on %s:%d",
            len(self.platforms),
            len(self.models),
            s.server.host,
            self.port,
        )

    def _rate_limit_stage(self, policy: AccessPolicy) -> RateLimitStage:
        """The rate-limit stage; a reload that leaves ``security.rate_limit`` as it was keeps
        the stage and so every user's bucket (a new stage would refill them all)."""
        settings = self.settings.security.rate_limit
        stage = self._rate_limits
        if stage is None or stage.settings != settings:
            stage = self._rate_limits = RateLimitStage(settings, audit=self.audit)
        stage.exempt = policy.is_admin  # the access lists may have changed
        return stage

    async def _purge_loop(self) -> None:
        """Forget handled messages, their reply records and expired dedup keys once they are
        older than ``storage.retention_s``, and conversation turns older than
        ``context.ttl_s`` (no load asks for them any more): at start, then every hour (or a
        quarter of the shorter of the two, if less). Unfinished messages are never purged."""
        while True:
            retention_s = self.settings.storage.retention_s  # a reload may change them
            ttl_s = self.settings.context.ttl_s
            try:
                purged = await self.store.purge(self.wall_clock() - retention_s)
            except StoreError as exc:  # tried again at the next interval
                logger.warning("inbox purge failed: %s", exc)
            else:
                if purged:
                    logger.info(
                        "purged %d handled messages older than %s", purged, _age(retention_s)
                    )
            try:
                expired = await self.store.expire(self.wall_clock() - ttl_s)
            except StoreError as exc:
                logger.warning("context purge failed: %s", exc)
            else:
                if expired:
                    logger.info("purged %d conversation turns older than %s", expired, _age(ttl_s))
            await asyncio.sleep(min(_PURGE_INTERVAL_S, retention_s / 4, max(ttl_s / 4, 60.0)))

    def _watch_secret_ages(self) -> None:
        """Export ``imrelay_secret_age_seconds`` when an encrypted secret store is in use."""
        conf = self.settings.security.secrets
        if not os.path.exists(conf.path):
            return
        try:
            store = SecretStore.from_settings(conf, environ=os.environ)
        except ConfigError as exc:
            logger.warning("secret store %s not readable, ages not exported: %s", conf.path, exc)
            return
        self.metrics.registry.register(SecretAgeCollector(store, clock=self.wall_clock))

    def _build_worker(self) -> Worker:
        """The worker that runs the pipeline."""
        s = self.settings
        return Worker(
            self.store,
            self._build_runner(),
            self.metrics,
            max_concurrency=s.pipeline.max_concurrency,
            max_pending=s.pipeline.max_pending,
            max_attempts=s.pipeline.max_attempts,
            lag_target_s=s.pipeline.loop_lag_target_ms / 1000,
            core_share=core_share(read_process_limits) if s.pipeline.loop_lag_target_ms else 1.0,
            wall_clock=self.wall_clock,
        )

    def _build_runner(self) -> Runner:
        """The pipeline, in the order DESIGN §1 gives (rebuilt from scratch by a reload)."""
        s = self.settings
        sec = s.security
        dedup = self._dedup
        sender = ReplySender(self.platforms, self.store, self.metrics, clock=self.wall_clock)
        policy = AccessPolicy(sec.access)
        words = WordFilter(sec.words) if sec.words.files else None
        pii = PIIMasker(sec.pii) if sec.pii.enabled else None
        inbound_safety, outbound_safety = build_safety_stages(words, pii, metrics=self.metrics)
        router = Router(s.routing, pins=self._pins, models=s.models, canaries=self.canary_book)
        stages: list[Stage] = [
            dedup,
            AccessStage(group_require_mention=s.pipeline.group_require_mention),
            *([self._rate_limit_stage(policy)] if sec.rate_limit.enabled else []),
            PermissionStage(policy, notice=sec.access.denied_notice, audit=self.audit),
            KindStage(
                unsupported_notice=s.pipeline.unsupported_notice, routes=router.routed_kinds
            ),
            AdminCommandStage(
                policy,
                denied_notice=sec.access.admin_denied_notice,
                audit=self.audit,
                status=self._status_text,
                reload=self.reload,
                pins=self._pins,
                models=list(s.models),
            ),
            inbound_safety,
            CommandStage(
                self.store,
                scope=s.context.scope,
                help_text=s.pipeline.help_text,
                reset_notice=s.pipeline.reset_notice,
            ),
            RouteStage(router, metrics=self.metrics),
            HistoryStage(
                self.store,
                scope=s.context.scope,
                max_turns=s.context.max_turns,
                max_tokens=s.context.max_tokens,
                ttl_s=s.context.ttl_s,
                clock=self.wall_clock,
                counter=load_token_counter(s.context.tokenizer),
            ),
            MediaStage(
                self._media_fetchers(),
                notice=s.pipeline.failure_notice,
                unsupported_notice=s.pipeline.unsupported_notice,
            ),
            GenerateStage(
                self._routed_models(),
                system_prompts={name: m.system_prompt for name, m in s.models.items()},
                metrics=self.metrics,
                failure_notice=s.pipeline.failure_notice,
                streams=sender.open_stream,
                view=outbound_safety.view,
            ),
            ThinkStage(),
            outbound_safety,
            FormatStage(
                markdown={name: p.reply_format == "markdown" for name, p in s.platforms.items()},
                max_chars={name: p.reply.max_chars for name, p in s.platforms.items()},
            ),
            SendStage(sender, self.store, keep_turns=s.context.max_turns, clock=self.wall_clock),
        ]
        audit = self.audit
        mask = (lambda text: pii.mask(text).text) if pii is not None else None

        async def on_settled(ctx: TurnContext, state: MessageState, reason: str) -> None:
            if audit is not None:
                await audit_settled(audit, ctx, state.value, reason, mask=mask)

        return Runner(
            stages,
            sender=sender,
            inbox=self.store,
            metrics=self.metrics,
            dedup=dedup,
            failure_notice=s.pipeline.failure_notice,
            include_text=s.logging.include_text,
            wall_clock=self.wall_clock,
            on_settled=on_settled if audit is not None else None,
        )

    def _media_fetchers(self) -> dict[str, Fetch]:
        """The download function of each platform that has media."""
        fetchers: dict[str, Fetch] = {}
        for name, platform in self.platforms.items():
            fetch = getattr(platform, "fetch_media", None)
            if fetch is not None:
                fetchers[name] = fetch
        return fetchers

    async def _status_text(self) -> str:
        """The answer to ``/status`` (admins only)."""
        counts = await self.store.counts()
        problems = await self.readiness()
        state = "NOT ready: " + "; ".join(problems) if problems else "ready"
        return (
            f"imrelay {__version__}: {state}. "
            f"Messages: {', '.join(f'{k.value} {v}' for k, v in counts.items())}. "
            f"Models: {', '.join(self.models)}."
        )

    def _routed_models(self) -> dict[str, ModelBackend]:
        """Each model as routing sees it: wrapped in its ``routing.fallback`` chain, if any."""
        chains = self.settings.routing.fallback
        return {
            name: FallbackChain(
                [(name, backend), *((m, self.models[m]) for m in chains[name])],
                metrics=self.metrics,
            )
            if chains.get(name)
            else backend
            for name, backend in self.models.items()
        }

    async def reload(self) -> str:
        """Re-read the configuration and swap the pipeline atomically (SIGHUP, ``/reload``).

        Routing, models, sensitive words, PII and rate limits, access lists, context and
        pipeline texts take effect for the next message; messages in flight finish with the
        pipeline they started with. What needs new connections or files — ``server``,
        ``storage``, ``platforms``, ``security.audit`` and the worker's limits — is kept and
        takes effect at the next start. A file that does not validate (or a pipeline that
        cannot be built from it, e.g. an unreadable word list) changes nothing.

        Returns:
            One line saying what happened (the answer to ``/reload``).
        """
        if self._reloader is None:
            return "reload is not available: the gateway was not started from a file"
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(self._reloader)
            except ConfigError as exc:
                logger.error("reload refused, the running configuration stays: %s", exc)
                return f"reload refused: {exc}"
            old = self.settings
            kept = [k for k in _RESTART_ONLY if _get(new, k) != _get(old, k)]
            for key in kept:
                new = _with(new, key, _get(old, key))
            if kept:
                logger.warning("changes to %s take effect at the next start", ", ".join(kept))
            old_models = self.models
            models = self._models or {n: build_model(n, m) for n, m in new.models.items()}
            self.settings, self.models = new, models
            try:
                runner = self._build_runner()
            except Exception as exc:
                self.settings, self.models = old, old_models
                if models is not old_models:
                    await _close_models(models.values())
                logger.error("reload refused, the running configuration stays: %s", exc)
                return f"reload refused: {exc}"
            self.worker.runner = runner
            await self._restart_canaries()
            if models is not old_models:
                # calls still running on the old models finish first
                grace = new.pipeline.drain_timeout_s
                self._spawn_later(grace, _close_models(old_models.values()))
            resettle_heap()  # the old pipeline may sit in the frozen start-up heap
            logger.info("configuration reloaded: %d model(s)", len(models))
            return "configuration reloaded" + (
                f" ({', '.join(kept)} at the next start)" if kept else ""
            )

    async def _restart_canaries(self) -> None:
        if self._canary_task is not None:
            self._canary_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._canary_task
            self._canary_task = None
        self.canaries = CanaryController(
            self.settings.routing,
            self.canary_book,
            self.metrics,
            audit=self.audit,
            clock=self.wall_clock,
        )
        if self.canaries.canaries:
            self._canary_task = asyncio.create_task(self.canaries.run(), name="canary")

    def _spawn_later(self, delay: float, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` after ``delay``, or at once when :meth:`stop` comes first."""

        async def later() -> None:
            try:
                await asyncio.sleep(delay)
            finally:
                await coro

        task = asyncio.create_task(later())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _intake_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, AuthError):
            logger.error("%s: credentials refused by the platform: %s", task.get_name(), exc)
        else:
            logger.error("%s stopped: %r", task.get_name(), exc, exc_info=exc)
        if self.fatal is not None and not self.fatal.done():
            self.fatal.set_result(exc)

    async def stop(self) -> bool:
        """Stop intake, drain, close. Returns True if every in-flight message finished."""
        if self._stopped:
            return True
        self._stopped = True
        for task in self._intake.values():
            task.cancel()
        for task in self._intake.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for job in (self._canary_task, self._purge_task):
            if job is not None:
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        for platform in self.platforms.values():
            await platform.aclose()
        drained = True
        if hasattr(self, "worker"):
            drained = await self.worker.drain(self.settings.pipeline.drain_timeout_s)
        if self._web is not None:
            await self._web.cleanup()
        for task in list(self._background):
            task.cancel()  # each still runs its deferred work (see _spawn_later)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _close_models(self.models.values())
        if self.http is not None:
            await self.http.close()
        if self.client is not None:
            await self.client.aclose()
        await close_opened(self._proxied)
        if self.audit is not None:
            await self.audit.aclose()
        if hasattr(self, "store"):
            await self.store.aclose()
        logger.info("gateway stopped%s", "" if drained else " (unfinished work left in the inbox)")
        return drained

    # -- HTTP surface ----------------------------------------------------------------------

    async def _start_web(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        for name, platform in self.platforms.items():
            if platform.ingress == "webhook":
                app.router.add_post(f"/webhooks/{name}", platform.handle_webhook)
        self._web = web.AppRunner(app, access_log=None)
        await self._web.setup()
        site = web.TCPSite(self._web, self.settings.server.host, self.settings.server.port)
        await site.start()
        address: Any = self._web.addresses[0]
        self.port = int(address[1])

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pid": os.getpid()})

    async def readiness(self) -> list[str]:
        """Reasons the gateway is not ready; empty when it is."""
        reasons = [
            f"platform {name}: {p.not_ready_reason or 'not ready'}"
            for name, p in self.platforms.items()
            if not p.ready
        ]
        try:
            await self.store.ping()
        except StoreError as exc:
            reasons.append(f"store: {exc}")
        return reasons

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = await self.readiness()
        if reasons:
            return web.json_response(
                {"status": "unavailable", "reasons": reasons},
                status=503,
                dumps=lambda o: json.dumps(o, ensure_ascii=False),
            )
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})


def _age(seconds: float) -> str:
    """``7d``, ``12h`` or ``300s``: a retention period for a log line."""
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
