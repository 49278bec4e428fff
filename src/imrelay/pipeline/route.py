"""The route stage: pick the model that answers a message (see :mod:`imrelay.routing.rules`)."""

from __future__ import annotations

from collections.abc import Mapping

from imrelay.config import RoutingSettings
from imrelay.errors import ConfigError
from imrelay.observability.metrics import CounterChildren, Metrics
from imrelay.pipeline.context import Drop, TurnContext
from imrelay.routing.rules import Router
from imrelay.security.access import DepartmentLookup

__all__ = ["RouteStage"]


class RouteStage:
    """Ask the :class:`~imrelay.routing.rules.Router`; record the model, reason and prompt.

    Args:
        router: the router; None builds one from ``default`` and ``by_kind`` alone.
        default: the default model (without ``router``).
        by_kind: a model per message kind (without ``router``).
        departments_of: the sender's departments, needed when a rule matches departments.
        metrics: where decisions are counted (``imrelay_route_decisions_total``), if anywhere.

    Raises:
        ConfigError: a rule matches departments and no ``departments_of`` was given.
    """

    name = "route"

    def __init__(
        self,
        router: Router | None = None,
        *,
        default: str = "default",
        by_kind: Mapping[str, str] | None = None,
        departments_of: DepartmentLookup | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if router is None:
            routing = RoutingSettings.model_validate(
                {"default": default, "by_kind": dict(by_kind or {})}
            )
            router = Router(routing)
        if router.uses_departments and departments_of is None:
            index = next(r.index for r in router.rules if r.departments)
            raise ConfigError(
                "department rules need a directory lookup of the sender's departments, "
                "which this platform does not provide yet",
                key=f"routing.rules.{index}.match.department",
            )
        self.router = router
        self.departments_of = departments_of
        self.metrics = metrics
        self._decisions = None if metrics is None else CounterChildren(metrics.route_decisions)

    def pick(self, kind: str) -> str:
        """The model for a message kind when no rule or pin applies."""
        return self.router.by_kind.get(kind, self.router.default)

    async def __call__(self, ctx: TurnContext) -> TurnContext | Drop:
        departments: frozenset[str] = frozenset()
        if self.departments_of is not None and self.router.uses_departments:
            departments = await self.departments_of(ctx.message)
        decision = self.router.pick(ctx.message, ctx.message.text, departments=departments)
        ctx.model_name = decision.model
        ctx.route_rule = decision.rule
        ctx.route_reason = f"{decision.rule}: {decision.reason}"
        ctx.system_prompt = decision.system_prompt
        ctx.log.debug("routed to %s by %s", decision.model, ctx.route_reason)
        if self._decisions is not None:
            self._decisions(decision.model, decision.rule, decision.canary or "none").inc()
        return ctx
