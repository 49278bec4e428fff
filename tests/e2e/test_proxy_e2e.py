"""``dingtalk.proxy``: every call to DingTalk (token, Stream ticket, the WebSocket, replies)
goes through an HTTP proxy; the model is called directly."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from _proxy import TunnelProxy
from _support import gateway_settings, wait_for
from imrelay.app import Gateway
from imrelay.cli.main import _probe_all, secrets_of
from imrelay.config import format_config_error, load_settings
from imrelay.errors import ConfigError
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


async def test_dingtalk_traffic_goes_through_the_proxy(
    model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """The simulator is reachable only by a name the proxy alone resolves, so every DingTalk
    call must go through it: the token and ticket, the WebSocket (aiohttp), the AI card
    calls (imrelay.http). Both send the same non-ASCII credentials; the model is called
    directly."""
    port = _free_port()
    sim = DingTalkSimulator(
        port=port, ping_interval_s=5.0, public_url=f"http://dingtalk.test:{port}"
    )
    await sim.start()
    try:
        async with TunnelProxy(
            credentials=("bot", "pässwörd:1"), aliases={"dingtalk.test": "127.0.0.1"}
        ) as proxy:
            proxy_port = proxy.url.rsplit(":", 1)[1]
            settings = gateway_settings(
                sim,
                model_sim,
                tmp_path / "imrelay.db",
                platforms__dingtalk__api_base=f"http://dingtalk.test:{port}",
                platforms__dingtalk__proxy=f"http://bot:p%C3%A4ssw%C3%B6rd%3A1@127.0.0.1:{proxy_port}",
                platforms__dingtalk__reply__stream="card",
            )
            gateway = Gateway(settings, registry=CollectorRegistry())
            await gateway.start()
            try:
                await wait_for(lambda: sim.active_connections() >= 1, what="stream")
                ids = await sim.send_message("through the proxy", conversation_type="1")
                await wait_for(lambda: len(sim.replies()) >= 1, what="the card")
                (card,) = sim.replies()
                assert card["body"]["card"]["text"] == "echo: through the proxy (turns: 1)"
                assert ids["msg_id"]
            finally:
                await gateway.stop()
            assert proxy.refused == 0
            assert ("CONNECT", f"dingtalk.test:{port}") in proxy.seen  # imrelay.http
            assert any(m == "GET" and "ticket=" in t for m, t in proxy.seen)  # the WebSocket
            model_address = model_sim.base_url.removeprefix("http://").split("/")[0]
            assert not any(model_address in t for _, t in proxy.seen)
    finally:
        await sim.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_check_probes_through_the_proxy(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """``imrelay check`` asks for a token through the proxy, so a wrong proxy password shows
    as a failed platform row (the password itself never shown)."""
    async with TunnelProxy(credentials=("bot", "right")) as proxy:
        port = proxy.url.rsplit(":", 1)[1]
        for password, ok in (("right", True), ("wrong-one", False)):
            settings = gateway_settings(
                dingtalk_sim,
                model_sim,
                tmp_path / "imrelay.db",
                platforms__dingtalk__proxy=f"http://bot:{password}@127.0.0.1:{port}",
            )
            rows = [row for row in await _probe_all(settings) if row[0] == "platform"]
            assert [row[2] for row in rows] == [ok]
            assert all(password not in row[3] for row in rows)
        assert proxy.refused >= 1


@pytest.mark.parametrize(
    "proxy",
    ["https://proxy.corp:3128", "socks5://proxy:1080", "http://proxy:3128/x", "corp-gw:3128"],
)
def test_a_proxy_that_is_not_an_http_proxy_url_is_refused(tmp_path: Path, proxy: str) -> None:
    """The setting is checked when the file is loaded: the error names the key and never
    repeats the value (it may hold a password)."""
    config = tmp_path / "imrelay.yaml"
    config.write_text(
        "platforms:\n"
        "  dingtalk:\n"
        "    type: dingtalk\n"
        "    app_key: key\n"
        "    app_secret: secret-value\n"
        f"    proxy: '{proxy}'\n"
        "models:\n"
        "  default: {type: echo}\n"
        "routing: {default: default}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    shown = format_config_error(info.value)
    assert "platforms.dingtalk.proxy" in shown
    assert "http://host:port" in shown
    assert proxy not in shown


def test_the_proxy_password_is_masked_in_logs(
    dingtalk_sim: DingTalkSimulator, model_sim: ModelSimulator, tmp_path: Path
) -> None:
    """The log filter masks the proxy's password, as written in the URL and decoded."""
    settings = gateway_settings(
        dingtalk_sim,
        model_sim,
        tmp_path / "imrelay.db",
        platforms__dingtalk__proxy="http://bot:s%C3%A9cret-proxy@127.0.0.1:3128",
    )
    assert {"s%C3%A9cret-proxy", "sécret-proxy"} <= set(secrets_of(settings))
