"""The ``imrelay`` command: parse arguments, configure logging, build the app, run it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import typer
from rich.console import Console
from rich.table import Table

from imrelay import __version__
from imrelay._loop import keep_heap_settled, settle_heap
from imrelay._loop import run as run_loop
from imrelay.cli._common import ConfigOption, err, load_or_exit
from imrelay.cli.audit import audit_app
from imrelay.cli.bench import bench
from imrelay.cli.demo import run_demo
from imrelay.cli.route import canary_app, route_app
from imrelay.cli.secrets import secrets_app
from imrelay.config import Settings, format_config_error, load_settings
from imrelay.errors import ConfigError, IMRelayError
from imrelay.observability.logging import configure_logging

__all__ = ["app", "main"]

app = typer.Typer(
    name="imrelay",
    help="A gateway between private AI models and enterprise IM platforms.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sim_app = typer.Typer(help="Run a platform or model simulator (no accounts, no GPU).")
app.add_typer(sim_app, name="sim")
app.add_typer(audit_app, name="audit")
app.add_typer(secrets_app, name="secrets")
app.add_typer(route_app, name="route")
app.add_typer(canary_app, name="canary")
app.command()(bench)

LogFormat = Literal["ecs", "text"]


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in ``settings``, for log masking."""
    values: list[str] = []
    for platform in settings.platforms.values():
        values.append(platform.app_secret.get_secret_value())
        for secret in (platform.aes_key, platform.token):
            if secret is not None:
                values.append(secret.get_secret_value())
        if platform.proxy is not None:  # its password, as written and as meant
            password = urlsplit(platform.proxy.get_secret_value()).password
            if password:
                values.extend({password, unquote(password)})
    for model in settings.models.values():
        key = getattr(model, "api_key", None)
        if key is not None:
            values.append(key.get_secret_value())
    audit_key = settings.security.audit.hmac_key
    if audit_key is not None:
        values.append(audit_key.get_secret_value())
    return [v for v in values if v]


@app.command()
def version() -> None:
    """Print the version."""
    print(f"imrelay {__version__}")


@app.command()
def run(
    config: ConfigOption = None,
    log_format: Annotated[
        str | None, typer.Option(help="ecs (JSON, default) or text.", show_default=False)
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.", show_default=False)
    ] = None,
) -> None:
    """Run the gateway until SIGTERM or Ctrl-C."""
    settings = load_or_exit(config)
    fmt = log_format or settings.logging.format
    level = (log_level or settings.logging.level).upper()
    if fmt not in ("ecs", "text"):
        err(f"config error: --log-format: expected ecs or text, got {fmt!r}")
        raise typer.Exit(2)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        err(f"config error: --log-level: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
        raise typer.Exit(2)
    configure_logging(fmt=fmt, level=level, secrets=secrets_of(settings))  # type: ignore[arg-type]
    raise typer.Exit(run_loop(_serve(settings, lambda: load_settings(config)[0])))


async def _serve(settings: Settings, reloader: Callable[[], Settings] | None = None) -> int:
    import logging

    from imrelay.app import Gateway  # imported late: `imrelay --help` stays fast

    log = logging.getLogger("imrelay.cli")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateway = Gateway(settings, reloader=reloader)
    reloads: set[asyncio.Task[str]] = set()

    def reload() -> None:  # SIGHUP: re-read the file; an invalid one changes nothing
        task = asyncio.ensure_future(gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    code = 0
    try:
        await gateway.start()
        settle_heap()
    except ConfigError as exc:
        err(format_config_error(exc))
        await gateway.stop()
        return 2
    except (IMRelayError, OSError) as exc:
        log.error("gateway could not start: %s", exc)
        await gateway.stop()
        return 1
    fatal = gateway.fatal
    assert fatal is not None  # nosec B101  # set by start(); narrows the type
    stopper: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[object]] = {stopper, fatal}  # type: ignore[arg-type]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if fatal.done():
        code = 1
    stopper.cancel()
    log.info("stopping: intake closed, draining in-flight messages")
    await gateway.stop()
    return code


@app.command()
def check(config: ConfigOption = None) -> None:
    """Validate the configuration, then probe every model endpoint and platform credential."""
    settings = load_or_exit(config)
    configure_logging(fmt="text", level="ERROR", secrets=secrets_of(settings))
    rows = run_loop(_probe_all(settings))
    table = Table(title="imrelay check")
    table.add_column("what")
    table.add_column("name")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    table.add_row("config", "-", "[green]ok[/green]", "valid")
    ok = True
    for what, name, passed, detail in rows:
        ok = ok and passed
        result = "[green]ok[/green]" if passed else "[red]failed[/red]"
        table.add_row(what, name, result, detail)
    Console(soft_wrap=True).print(table)
    raise typer.Exit(0 if ok else 1)


async def _probe_all(settings: Settings) -> list[tuple[str, str, bool, str]]:
    import aiohttp

    from imrelay.app import build_platforms, close_opened
    from imrelay.http import HTTPClient
    from imrelay.models import build_model
    from imrelay.observability.metrics import Metrics

    rows: list[tuple[str, str, bool, str]] = []
    for name, conf in settings.models.items():
        backend = build_model(name, conf)
        try:
            rows.append(("model", name, True, await backend.probe()))
        except Exception as exc:
            rows.append(("model", name, False, str(exc) or type(exc).__name__))
        finally:
            await backend.aclose()
    rows.extend(_secret_rows(settings))
    opened: list[aiohttp.ClientSession | HTTPClient] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        try:
            try:
                platforms = build_platforms(settings, http, Metrics(process=False), opened=opened)
            except ConfigError as exc:
                return [*rows, ("platform", exc.key, False, str(exc))]
            for name, platform in platforms.items():
                try:
                    rows.append(("platform", name, True, await platform.probe()))
                except Exception as exc:
                    rows.append(("platform", name, False, str(exc) or type(exc).__name__))
        finally:
            await close_opened(opened)
    return rows


def _secret_rows(settings: Settings) -> list[tuple[str, str, bool, str]]:
    """One row per secret older than the rotation period (names only, never values)."""
    import os

    from imrelay.security.secrets import SecretStore, stale_secrets

    conf = settings.security.secrets
    if not os.path.exists(conf.path):
        return []
    try:
        store = SecretStore.from_settings(conf, environ=os.environ)
    except ConfigError as exc:
        return [("secrets", conf.path, False, str(exc))]
    stale = stale_secrets(store, max_age_days=conf.max_age_days)
    if not stale:
        return [("secrets", conf.path, True, "every secret is within its rotation period")]
    return [("secrets", conf.path, False, warning) for warning in stale]


@sim_app.command("dingtalk")
def sim_dingtalk(  # nosec B107  # the simulator's own default credential
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    app_key: Annotated[str, typer.Option(help="The app key clients must present.")] = (
        "sim-app-key"
    ),
    app_secret: Annotated[str, typer.Option(help="The app secret clients must present.")] = (
        "sim-app-secret"
    ),
    ping_interval: Annotated[
        float, typer.Option(help="Seconds between SYSTEM ping frames.")
    ] = 20.0,
    webhook_url: Annotated[
        str | None,
        typer.Option(help="HTTP mode: sign and POST messages to this URL instead of streaming."),
    ] = None,
) -> None:
    """Run the DingTalk simulator: Stream gateway, sessionWebhook, token, web chat page."""
    from imrelay.sim.dingtalk import DingTalkSimulator

    async def main() -> None:
        sim = DingTalkSimulator(
            host=host,
            port=port,
            app_key=app_key,
            app_secret=app_secret,
            ping_interval_s=ping_interval,
            webhook_url=webhook_url,
        )
        async with sim:
            print(f"DingTalk simulator on {sim.base_url} (web chat: {sim.base_url}/)", flush=True)
            settle_heap()
            await _until_signal(keep_heap_settled())

    run_loop(main())


@sim_app.command("model")
def sim_model(
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(help="Delay before the first token.")] = 0.0,
    tokens_per_s: Annotated[
        float | None, typer.Option(help="Stream word by word at this rate.")
    ] = None,
    error_rate: Annotated[float, typer.Option(help="Share of requests answered 500.")] = 0.0,
) -> None:
    """Run the OpenAI-compatible model simulator (answers with what it was sent)."""
    from imrelay.sim.model import ModelSimulator

    async def main() -> None:
        sim = ModelSimulator(
            host=host,
            port=port,
            latency_ms=latency_ms,
            tokens_per_s=tokens_per_s,
            error_rate=error_rate,
        )
        async with sim:
            print(f"model simulator on {sim.base_url}", flush=True)
            settle_heap()
            await _until_signal(keep_heap_settled())

    run_loop(main())


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port of the web chat page.")] = 8765,
) -> None:
    """Start the DingTalk simulator, the model simulator and the gateway; open the chat page."""
    raise typer.Exit(run_demo(port=port))


async def _until_signal(background: Coroutine[Any, Any, None] | None = None) -> None:
    """Wait for SIGTERM or SIGINT, running ``background`` meanwhile (cancelled after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = None if background is None else asyncio.create_task(background)
    try:
        await stop.wait()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main() -> None:
    """Entry point of the ``imrelay`` command."""
    with contextlib.suppress(KeyboardInterrupt):
        app()
