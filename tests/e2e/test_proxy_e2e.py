"""``dingtalk.proxy``: every call to DingTalk (token, Stream ticket, the WebSocket, replies)
goes through an HTTP proxy; the model is called directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from _proxy import TunnelProxy
from _support import GatewayFactory, gateway_settings, wait_for
from imrelay.cli.main import _probe_all
from imrelay.config import format_config_error, load_settings
from imrelay.errors import ConfigError
from imrelay.sim.dingtalk import DingTalkSimulator
from imrelay.sim.model import ModelSimulator


async def test_dingtalk_traffic_goes_through_the_proxy(
    gateway_factory: GatewayFactory,
    dingtalk_sim: DingTalkSimulator,
    model_sim: ModelSimulator,
) -> None:
    """A message arrives over a WebSocket opened through the proxy and is answered through
    it; the proxy saw the token and ticket calls, the WebSocket and the reply's tunnel, and
    nothing for the model."""
    sim_address = dingtalk_sim.base_url.removeprefix("http://")
    async with TunnelProxy(credentials=("bot", "proxy-secret")) as proxy:
        port = proxy.url.rsplit(":", 1)[1]
        gateway = await gateway_factory(
            platforms__dingtalk__proxy=f"http://bot:proxy-secret@127.0.0.1:{port}"
        )
        await wait_for(lambda: dingtalk_sim.active_connections() >= 1, what="stream")
        ids = await dingtalk_sim.send_message("through the proxy", conversation_type="1")
        await wait_for(lambda: len(dingtalk_sim.replies(ids["msg_id"])) == 1, what="a reply")
        targets = [target for _, target in proxy.seen]
        # the ticket and the reply over imrelay.http's tunnels; the WebSocket through aiohttp
        assert ("CONNECT", sim_address) in proxy.seen
        assert any(m == "GET" and "ticket=" in t for m, t in proxy.seen)
        model_address = model_sim.base_url.removeprefix("http://").split("/")[0]
        assert not any(model_address in t for t in targets)
        assert proxy.refused == 0
        await gateway.stop()


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
