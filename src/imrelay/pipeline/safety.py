"""The safety stages: sensitive words and PII on the way to the model, and on the way back.

Theory of operation: :class:`InboundSafetyStage` (``safety``, after the kind filter) scans the
message text, the text of its attachments (e.g. speech recognition) and any text parts of
``ctx.user_content`` for sensitive words on the RAW text. A category whose inbound action is
``block`` stops the message with the block notice; ``mask`` replaces the term; ``flag`` lets it
through with a warning line. Then personal data is masked, and ``ctx.message`` is replaced by a
copy carrying the masked texts (the message itself stays frozen), so every later stage (history
budget, prompt, the history written by the send stage) sees only masked text. ``raw`` is left
as the platform sent it.

:class:`OutboundSafetyStage` (``post_safety``) runs on the whole answer BEFORE the format
stage, so a term or a placeholder is never cut in two by a split and restored values count
toward each part's length: a ``withhold`` category replaces the answer with the withhold notice,
``mask`` categories are masked in it. In reversible mode it then restores the user's own values
(``<PHONE_1>`` → the number) into ``ctx.shown_answer``, which the format stage splits into the
reply parts: ``ctx.answer`` keeps the placeholders, so the history the send stage stores, and
the next prompt, never hold the values. An answer streamed while it was generated has been seen
before this stage runs; the streaming path passes each snapshot through
:meth:`OutboundSafetyStage.view`, and the stage still masks what is stored.

Vaults (placeholder → value, a plain ``dict``) are kept per conversation AND sender
(:func:`vault_key`), so a value is only ever restored in a reply to the person who wrote it.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from imrelay.message import InboundMessage
from imrelay.observability.metrics import Metrics
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.security.pii import PIIMasker, Vault, restore
from imrelay.security.words import Match, WordFilter

__all__ = [
    "BLOCKED",
    "InboundSafetyStage",
    "MemoryVaultStore",
    "OutboundSafetyStage",
    "VaultStore",
    "build_safety_stages",
    "vault_key",
]

BLOCKED = "sensitive_word"
"""The :class:`Drop` reason of a blocked message."""


def vault_key(message: InboundMessage) -> str:
    """The vault of the person who wrote ``message``, in its conversation."""
    return f"{message.platform}:{message.conversation.id}:{message.sender.id}"


class VaultStore(Protocol):
    """Where reversible-masking vaults live between a message and its reply (and later turns)."""

    async def load_vault(self, key: str) -> Vault:
        """The vault of ``key`` (a new empty one if there is none); the caller may modify it."""
        ...

    async def save_vault(self, key: str, vault: Vault) -> None:
        """Keep ``vault`` as the vault of ``key``."""
        ...


class MemoryVaultStore:
    """Vaults in process memory: the newest ``max_keys``, each for ``ttl_s`` after its last save.

    Lost on restart: a reply that names a placeholder from before then keeps the placeholder.
    """

    def __init__(
        self,
        *,
        ttl_s: float = 86400.0,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self.clock = clock
        self._vaults: OrderedDict[str, tuple[float, Vault]] = OrderedDict()

    async def load_vault(self, key: str) -> Vault:
        entry = self._vaults.get(key)
        if entry is None:
            return {}
        saved, vault = entry
        if self.clock() - saved > self.ttl_s:
            del self._vaults[key]
            return {}
        return dict(vault)

    async def save_vault(self, key: str, vault: Vault) -> None:
        self._vaults[key] = (self.clock(), dict(vault))
        self._vaults.move_to_end(key)
        while len(self._vaults) > self.max_keys:
            self._vaults.popitem(last=False)


class InboundSafetyStage:
    """Sensitive words and PII masking of the user's message (see the module docstring)."""

    name = "safety"

    def __init__(
        self,
        words: WordFilter | None,
        pii: PIIMasker | None,
        *,
        metrics: Metrics,
        vaults: VaultStore | None = None,
    ) -> None:
        if pii is not None and pii.settings.reversible and vaults is None:
            raise ValueError("reversible pii masking needs a vault store")
        self.words = words
        self.pii = pii if pii is not None and pii.active else None
        self.metrics = metrics
        reversible = self.pii is not None and self.pii.settings.reversible
        self.vaults = vaults if reversible else None

    def _scan(self, texts: list[str]) -> list[list[Match]]:
        if self.words is None:
            return [[] for _ in texts]
        return [self.words.scan(text) for text in texts]

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        msg = ctx.message
        parts = _content_texts(ctx.user_content)
        texts = [msg.text, *(a.text for a in msg.attachments), *parts]
        # a rich-text message's text segments repeat msg.text (kept in order for the media
        # stage): masked like everything else, but judged and counted once, in msg.text
        counted = [True, *(a.kind != "text" for a in msg.attachments), *(True for _ in parts)]
        found = self._scan(texts)
        if self.words is not None and any(found):
            judged = [m for ms, count in zip(found, counted, strict=True) if count for m in ms]
            drop = self._judge(ctx, self.words, judged)
            if drop is not None:
                return drop
        if self.pii is None and not any(found):
            return ctx
        if self.vaults is None:
            cleaned = self._clean(texts, found, counted, None)
        else:
            vault = await self.vaults.load_vault(vault_key(msg))
            before = dict(vault)
            cleaned = self._clean(texts, found, counted, vault)
            if vault != before:
                await self.vaults.save_vault(vault_key(msg), vault)
        text, rest = cleaned[0], cleaned[1:]
        ctx.text_masked = self.pii is not None
        attachments = tuple(
            dataclasses.replace(a, text=t)
            for a, t in zip(msg.attachments, rest[: len(msg.attachments)], strict=True)
        )
        if text != msg.text or attachments != msg.attachments:
            ctx.message = dataclasses.replace(msg, text=text, attachments=attachments)
        if parts:
            ctx.user_content = _with_content_texts(ctx.user_content, rest[len(msg.attachments) :])
        return ctx

    def _clean(
        self, texts: list[str], found: list[list[Match]], counted: list[bool], vault: Vault | None
    ) -> list[str]:
        return [
            self._clean_one(t, matches, count, vault)
            for t, matches, count in zip(texts, found, counted, strict=True)
        ]

    def _clean_one(self, text: str, matches: list[Match], count: bool, vault: Vault | None) -> str:
        """Mask the ``mask``-category terms of ``text``, then its personal data (counted in
        the metrics when ``count``)."""
        if self.words is not None and matches:
            masked = [m for m in matches if self.words.action(m.category).inbound == "mask"]
            text = self.words.mask(text, masked)
        if self.pii is not None:
            result = self.pii.mask(text, vault=vault)
            if count:
                for entity in result.entities:
                    self.metrics.pii_masked.labels(entity.type).inc()
            text = result.text
        return text

    def _judge(self, ctx: TurnContext, words: WordFilter, matches: list[Match]) -> Drop | None:
        counter = self.metrics.sensitive_matches
        for m in matches:
            counter.labels(m.category, "inbound", words.action(m.category).inbound).inc()
        actions = {c: a.inbound for c, a in words.categories_of(matches).items()}
        blocked = sorted(c for c, a in actions.items() if a == "block")
        if blocked:
            ctx.log.warning("message blocked: sensitive words of %s", ", ".join(blocked))
            return Drop(BLOCKED, notice=words.settings.block_notice)
        flagged = sorted(c for c, a in actions.items() if a == "flag")
        if flagged:
            ctx.log.warning("sensitive words flagged: %s", ", ".join(flagged))
        return None


def _content_texts(content: Any) -> list[str]:
    """The texts of OpenAI content: a string, or the ``text`` of each text part."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if _is_text_part(p)]
    return []


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, Mapping)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    )


def _with_content_texts(content: Any, texts: Iterable[str]) -> Any:
    """``content`` with its texts (as listed by :func:`_content_texts`) replaced by ``texts``."""
    replacements = iter(texts)
    if isinstance(content, str):
        return next(replacements)
    return [{**p, "text": next(replacements)} if _is_text_part(p) else p for p in content]


class OutboundSafetyStage:
    """Sensitive words in the answer, and PII restore for the asker (see the module docstring)."""

    name = "post_safety"

    def __init__(
        self,
        words: WordFilter | None,
        pii: PIIMasker | None,
        *,
        metrics: Metrics,
        vaults: VaultStore | None = None,
    ) -> None:
        if pii is not None and pii.settings.reversible and vaults is None:
            raise ValueError("reversible pii masking needs a vault store")
        self.words = words
        self.metrics = metrics
        restores = pii is not None and pii.active and pii.settings.reversible
        self.vaults = vaults if restores else None

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        if self.words is not None:
            self._filter(ctx, self.words)
        if self.vaults is not None:
            vault = await self.vaults.load_vault(vault_key(ctx.message))
            if vault:
                shown = restore(ctx.answer, vault)
                if shown != ctx.answer:
                    ctx.shown_answer = shown
        return ctx

    def _filter(self, ctx: TurnContext, words: WordFilter) -> None:
        matches = words.scan(ctx.answer)
        if not matches:
            return
        counter = self.metrics.sensitive_matches
        for m in matches:
            counter.labels(m.category, "outbound", words.action(m.category).outbound).inc()
        actions = words.categories_of(matches)
        withheld = sorted(c for c, a in actions.items() if a.outbound == "withhold")
        if withheld:
            ctx.log.warning("answer withheld: sensitive words of %s", ", ".join(withheld))
            ctx.answer = words.settings.withhold_notice
            return
        ctx.answer = words.mask(ctx.answer, matches)

    async def view(self, ctx: TurnContext, text: str) -> str:
        """What the asker may see of ``text``: a whole answer or a prefix being streamed.

        The withhold notice if a ``withhold`` term is in it, else ``text`` with ``mask`` terms
        masked and (reversible mode) the asker's placeholders restored. For a streaming path,
        which shows an answer before this stage runs: pass each snapshot through this.
        Nothing is counted; the stage counts once the answer is complete.
        """
        if self.words is not None:
            matches = self.words.scan(text)
            if any(self.words.action(m.category).outbound == "withhold" for m in matches):
                return self.words.settings.withhold_notice
            text = self.words.mask(text, matches)
        if self.vaults is not None:
            text = restore(text, await self.vaults.load_vault(vault_key(ctx.message)))
        return text


def build_safety_stages(
    words: WordFilter | None,
    pii: PIIMasker | None,
    *,
    metrics: Metrics,
    vaults: VaultStore | None = None,
) -> tuple[InboundSafetyStage, OutboundSafetyStage]:
    """Both stages, sharing one vault store (a :class:`MemoryVaultStore` if reversible masking
    is on and none is given)."""
    if vaults is None and pii is not None and pii.settings.reversible:
        vaults = MemoryVaultStore()
    return (
        InboundSafetyStage(words, pii, metrics=metrics, vaults=vaults),
        OutboundSafetyStage(words, pii, metrics=metrics, vaults=vaults),
    )
