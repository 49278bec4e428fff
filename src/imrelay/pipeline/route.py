"""The route stage: pick the model that answers a message."""

from __future__ import annotations

from collections.abc import Mapping

from imrelay.pipeline.context import Drop, TurnContext

__all__ = ["RouteStage"]


class RouteStage:
    """``routing.by_kind`` first, then ``routing.default``."""

    name = "route"

    def __init__(self, *, default: str, by_kind: Mapping[str, str]) -> None:
        self.default = default
        self.by_kind = dict(by_kind)

    def pick(self, kind: str) -> str:
        """The model name for a message kind."""
        return self.by_kind.get(kind, self.default)

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        ctx.model_name = self.pick(ctx.message.kind)
        return ctx
