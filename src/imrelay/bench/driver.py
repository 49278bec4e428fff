"""The load driver: an open-loop sender and a reply collector on the simulators' control APIs.

Theory of operation: :meth:`Driver.send` schedules message ``i`` of a phase at
``start + i / rate`` whatever the replies do (open loop). About every 10 ms the messages that
are due go to the DingTalk simulator in one ``POST /_sim/messages/batch``; up to 32 batches are
in flight at once (in HTTP mode a batch lasts until the gateway answered each of its POSTs), but
never two holding the same conversation: a message whose conversation is still in flight waits,
and so do the later ones of that conversation, so each conversation's messages reach the bot in
schedule order (the order the out-of-order count compares with).
How late the simulator handed each message over compared with the schedule is kept as the
*driver lag*; latencies start at the simulator's hand-over, not at the schedule. The batches go
over the keep-alive connections of an :class:`imrelay.http.HTTPClient`: at a hundred requests a
second, aiohttp's client would cost the rig more CPU than the simulator spends handing the
messages over.

:meth:`Driver.collect` polls ``GET /_sim/replies?after=`` on the DingTalk simulator and
``GET /_sim/timings?after=`` on the model simulator in the background and feeds the
:class:`~imrelay.bench.stats.Ledger`. :meth:`Driver.settle` waits until every message has a
reply, or until no reply came for the grace period, then a little longer for late duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp

from imrelay.bench.load import Mix, build_message
from imrelay.bench.procs import BenchProcessError
from imrelay.bench.stats import Ledger, Sent
from imrelay.http import HTTPClient

__all__ = ["Driver"]

_TICK_S = 0.01
_MAX_IN_FLIGHT = 32
_DUPLICATE_WINDOW_S = 0.3
_REQUEST_TIMEOUT_S = 120.0


class Driver:
    """Sends messages to the DingTalk simulator and collects what comes back.

    Args:
        http: the session for the control APIs.
        dingtalk_url: the DingTalk simulator's base URL.
        model_url: the model simulator's base URL (without ``/v1``).
        conversations: how many conversations the messages are spread over.
        mix: the message kinds.
        ledger: where everything is recorded.
        max_batch: the most messages in one batch request.
        poll_interval_s: seconds between two polls of the replies.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        dingtalk_url: str,
        model_url: str,
        conversations: int,
        mix: Mix,
        ledger: Ledger,
        max_batch: int = 500,
        poll_interval_s: float = 0.1,
    ) -> None:
        self._http = http
        self._dingtalk = dingtalk_url.rstrip("/")
        self._model = model_url
        self._conversations = conversations
        self._mix = mix
        self.ledger = ledger
        self._max_batch = max_batch
        self._poll_interval_s = poll_interval_s
        self._batches = HTTPClient(limit=16, user_agent="imrelay-bench")
        self._next = 0
        self._reply_after = 0
        self._timing_after = 0
        # collect() polls in the background while settle() polls too: two polls at once would
        # fetch the same page and count its replies twice
        self._polling = asyncio.Lock()
        self.last_progress = time.monotonic()

    async def send(
        self,
        rate: float,
        duration_s: float,
        *,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[Sent]:
        """Send ``round(rate * duration_s)`` messages (at least one) on the open-loop schedule.

        Args:
            rate: messages per second.
            duration_s: how long the phase lasts.
            on_batch: called with the number of messages sent so far in this phase.

        Returns:
            The messages sent, in schedule order.

        Raises:
            BenchProcessError: the DingTalk simulator refused a batch or stopped answering.
        """
        loop = asyncio.get_running_loop()
        total = max(1, round(rate * duration_s))
        first = self._next
        self._next += total
        start, start_wall = loop.time(), time.time()
        phase: list[Sent] = []
        waiting: deque[int] = deque()  # due message numbers not yet in a batch
        busy: set[int] = set()  # conversations with a message in an unanswered batch
        flying: set[asyncio.Task[None]] = set()
        scheduled = 0
        next_send = start
        try:
            while len(phase) < total:
                now = loop.time()
                due = min(total, math.floor((now - start) * rate) + 1)
                waiting.extend(range(first + scheduled, first + due))
                scheduled = due
                if now >= next_send and len(flying) < _MAX_IN_FLIGHT:
                    # At most one batch per tick: batches stay large enough to be cheap.
                    next_send = now + _TICK_S
                    batch = self._take(waiting, busy)
                    if batch:
                        busy.update(n % self._conversations for n in batch)
                        flying.add(
                            asyncio.create_task(
                                self._post_batch(batch, start_wall, first, rate, phase, busy)
                            )
                        )
                pause = max(next_send - loop.time(), 0.001)
                if not flying:
                    await asyncio.sleep(pause)
                    continue
                done, _ = await asyncio.wait(
                    flying, timeout=pause, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    flying.discard(task)
                    task.result()  # a failed batch ends the run
                    if on_batch is not None:
                        on_batch(len(phase))
        finally:
            for task in flying:
                task.cancel()
        phase.sort(key=lambda sent: sent.n)
        return phase

    def _take(self, waiting: deque[int], busy: set[int]) -> list[int]:
        """Due messages whose conversation has nothing in flight, in schedule order.

        A message of a busy conversation stays queued, and so does every later message of the
        same conversation: each conversation's messages reach the simulator in order.
        """
        batch: list[int] = []
        blocked = set(busy)
        kept: list[int] = []
        for n in waiting:
            conversation = n % self._conversations
            if conversation in blocked or len(batch) >= self._max_batch:
                blocked.add(conversation)
                kept.append(n)
            else:
                batch.append(n)
        if batch:
            waiting.clear()
            waiting.extend(kept)
        return batch

    async def aclose(self) -> None:
        """Close the connections the batches went over."""
        await self._batches.aclose()

    async def _post_batch(
        self,
        numbers: list[int],
        start_wall: float,
        first: int,
        rate: float,
        phase: list[Sent],
        busy: set[int],
    ) -> None:
        c = self._conversations
        kinds = [self._mix.kind_of(n) for n in numbers]
        items = [
            build_message(n, n % c, n // c, kind) for n, kind in zip(numbers, kinds, strict=True)
        ]
        payload = json.dumps({"messages": items}, ensure_ascii=False).encode()
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                resp = await self._batches.request(
                    "POST",
                    f"{self._dingtalk}/_sim/messages/batch",
                    body=payload,
                    headers={"Content-Type": "application/json"},
                )
                raw = await resp.read()
                status = resp.status
        except (OSError, TimeoutError) as exc:
            raise BenchProcessError(f"the dingtalk simulator stopped answering: {exc}") from exc
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        if status != 200 or not isinstance(body, dict):
            raise BenchProcessError(f"the dingtalk simulator refused a batch: {body}")
        for n, kind, ids in zip(numbers, kinds, body["sent"], strict=True):
            sent = Sent(
                n=n,
                conversation=n % c,
                k=n // c,
                kind=kind,
                due=start_wall + (n - first) / rate,
                msg_id=ids["msg_id"],
                sent_at=float(ids["sent_at"]),
                webhook_status=ids.get("webhook_status"),
                webhook_ms=ids.get("webhook_ms"),
            )
            self.ledger.add_sent(sent)
            phase.append(sent)
            busy.discard(n % c)
        self.ledger.rematch()

    async def poll(self) -> None:
        """Fetch the new replies and model timings once (one poll at a time)."""
        async with self._polling:
            await self._poll()

    async def _poll(self) -> None:
        async with self._http.get(
            f"{self._dingtalk}/_sim/replies", params={"after": str(self._reply_after)}
        ) as resp:
            replies: list[dict[str, Any]] = (await resp.json(content_type=None))["replies"]
        async with self._http.get(
            f"{self._model}/_sim/timings", params={"after": str(self._timing_after)}
        ) as resp:
            timings: list[dict[str, Any]] = (await resp.json(content_type=None))["timings"]
        for record in timings:
            self.ledger.add_timing(record)
            self._timing_after = max(self._timing_after, int(record["seq"]))
        before = self.ledger.answered
        for record in replies:
            self.ledger.add_reply(record)
            self._reply_after = max(self._reply_after, int(record["seq"]))
        self.ledger.rematch()
        if replies or self.ledger.answered != before:
            self.last_progress = time.monotonic()

    async def collect(self, on_poll: Callable[[], None] | None = None) -> None:
        """Poll until cancelled; a failed poll is retried at the next interval."""
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                await self.poll()
            if on_poll is not None:
                on_poll()
            await asyncio.sleep(self._poll_interval_s)

    async def settle(self, grace_s: float, *, deadline_s: float | None = None) -> None:
        """Wait for the replies still owed.

        Returns when every sent message has a reply, when no reply arrived for ``grace_s``,
        or after ``deadline_s`` in all; then waits a little more for late duplicates.
        """
        started = time.monotonic()
        self.last_progress = started
        while self.ledger.backlog > 0:
            now = time.monotonic()
            if now - self.last_progress > grace_s:
                break
            if deadline_s is not None and now - started > deadline_s:
                break
            await asyncio.sleep(self._poll_interval_s)
        await asyncio.sleep(_DUPLICATE_WINDOW_S)
        await self.poll()
