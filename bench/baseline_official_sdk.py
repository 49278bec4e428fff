"""The baseline of ``imrelay bench``: the bot a team writes with the official DingTalk SDK.

A straightforward Stream-mode bot on ``dingtalk-stream`` (the official SDK): for each message
it calls the model's OpenAI-compatible ``/chat/completions`` endpoint with ``requests`` and
answers with ``reply_text`` on the message's sessionWebhook. Nothing is stored, nothing is
deduplicated, no conversation history is kept, and there is no ordering per conversation: it is
the comparison point, not a recommendation.

Two handler styles, both taken from the SDK's own examples:

* ``thread`` (default): ``AsyncChatbotHandler`` (as in the SDK's ``cardbot`` example and most
  model bots built on it): the message is ACKed at once and ``process`` runs in a thread pool of
  ``--workers`` threads (the SDK's default is 8), so a slow model does not block the
  connection. Replies within a conversation can overtake each other.
* ``inline``: ``ChatbotHandler`` with ``async def process`` calling the blocking ``requests``
  functions (as in the SDK's ``helloworld``/``calcbot`` examples): one message at a time, ACKed
  after the reply.

Run it against the simulators (``imrelay bench --baseline official-sdk`` does this)::

    BENCH_DINGTALK_CLIENT_SECRET=... python bench/baseline_official_sdk.py \\
        --endpoint http://127.0.0.1:8765 --client-id sim-app-key \\
        --model-url http://127.0.0.1:8000/v1

``DINGTALK_OPENAPI_ENDPOINT`` must be set before the SDK is imported (it reads it at import
time), and the SDK's ``get_host_ip`` (a UDP "connection" towards 8.8.8.8) is replaced by
127.0.0.1: the benchmark never leaves the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

__all__ = ["main"]

UNSUPPORTED = "Sorry, I can only read text messages for now."


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="DingTalk OpenAPI base URL")
    parser.add_argument("--client-id", required=True, help="app key")
    parser.add_argument(
        "--client-secret",
        default=os.environ.get("BENCH_DINGTALK_CLIENT_SECRET"),
        help="app secret (default: $BENCH_DINGTALK_CLIENT_SECRET)",
    )
    parser.add_argument("--model-url", required=True, help="OpenAI-compatible base URL (…/v1)")
    parser.add_argument("--model", default="sim-model", help="model name")
    parser.add_argument("--handler", choices=("thread", "inline"), default="thread")
    parser.add_argument("--workers", type=int, default=8, help="threads of the thread handler")
    options = parser.parse_args(argv)
    if not options.client_secret:
        parser.error("--client-secret or $BENCH_DINGTALK_CLIENT_SECRET is required")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run the bot until killed."""
    options = _options(argv)
    os.environ["DINGTALK_OPENAPI_ENDPOINT"] = options.endpoint.rstrip("/")
    import dingtalk_stream  # the SDK reads DINGTALK_OPENAPI_ENDPOINT at import time
    import requests

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logger = logging.getLogger("baseline")
    completions = options.model_url.rstrip("/") + "/chat/completions"

    def answer(callback: Any, handler: Any) -> None:
        incoming = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
        if incoming.message_type != "text" or incoming.text is None:
            handler.reply_text(UNSUPPORTED, incoming)
            return
        response = requests.post(
            completions,
            json={
                "model": options.model,
                "messages": [{"role": "user", "content": incoming.text.content.strip()}],
            },
            timeout=60,
        )
        response.raise_for_status()
        text = response.json()["choices"][0]["message"]["content"]
        handler.reply_text(text, incoming)

    class ThreadBot(dingtalk_stream.AsyncChatbotHandler):  # type: ignore[misc]
        def process(self, callback: Any) -> Any:
            answer(callback, self)
            return dingtalk_stream.AckMessage.STATUS_OK, "OK"

    class InlineBot(dingtalk_stream.ChatbotHandler):  # type: ignore[misc]
        async def process(self, callback: Any) -> Any:
            answer(callback, self)
            return dingtalk_stream.AckMessage.STATUS_OK, "OK"

    class Client(dingtalk_stream.DingTalkStreamClient):  # type: ignore[misc]
        def get_host_ip(self) -> str:
            return "127.0.0.1"

    if options.handler == "thread":
        handler: Any = ThreadBot(max_workers=options.workers)
    else:
        handler = InlineBot()
    credential = dingtalk_stream.Credential(options.client_id, options.client_secret)
    client = Client(credential, logger=logger)
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, handler)
    logger.info("baseline bot (%s handler) starting", options.handler)
    client.start_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
