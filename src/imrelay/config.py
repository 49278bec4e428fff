"""Configuration: the schema (pydantic models) and, below it, loading and validation.

See ../../docs/configuration.md for every key. Settings are loaded once by the CLI and passed
down; nothing reads configuration globally.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = [
    "ContextSettings",
    "DingTalkSettings",
    "EchoModelSettings",
    "LoggingSettings",
    "ModelSettings",
    "OpenAIModelSettings",
    "PipelineSettings",
    "PlatformSettings",
    "RoutingSettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """The one HTTP server: webhooks, /metrics, /healthz, /readyz."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class StorageSettings(_Section):
    """Where the inbox, reply records and context live."""

    url: str = "sqlite:///./imrelay.db"
    dedup_ttl_s: float = Field(86400.0, ge=300)
    retention_s: float = Field(7 * 86400.0, ge=300)
    commit_interval_ms: float = Field(2.0, ge=0, le=1000)


class DingTalkSettings(_Section):
    """A DingTalk enterprise-internal app bot."""

    type: Literal["dingtalk"]
    mode: Literal["stream", "webhook"] = "stream"
    app_key: str = Field(min_length=1)
    app_secret: SecretStr
    robot_code: str | None = None
    api_base: str = "https://api.dingtalk.com"
    heartbeat_s: float = Field(60.0, gt=0)
    pong_timeout_s: float = Field(10.0, gt=0)
    open_timeout_s: float = Field(10.0, gt=0)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    healthy_after_s: float = Field(30.0, ge=0)
    http_timeout_s: float = Field(10.0, gt=0)

    @property
    def effective_robot_code(self) -> str:
        """``robot_code``, defaulting to the app key (enterprise-internal apps)."""
        return self.robot_code or self.app_key


PlatformSettings = DingTalkSettings


class OpenAIModelSettings(_Section):
    """Any OpenAI-compatible endpoint (vLLM, Ollama /v1, TGI, llama.cpp server, …)."""

    type: Literal["openai"]
    base_url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key: SecretStr | None = None
    max_tokens: int = Field(2048, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)
    stream: bool = True
    system_prompt: str | None = None


class EchoModelSettings(_Section):
    """A model that answers with what it was sent: for trying imrelay without a model."""

    type: Literal["echo"]
    latency_ms: float = Field(0.0, ge=0)
    system_prompt: str | None = None


ModelSettings = Annotated[OpenAIModelSettings | EchoModelSettings, Field(discriminator="type")]


class RoutingSettings(_Section):
    """Which model answers which message."""

    default: str = "default"
    by_kind: dict[Literal["text", "image", "audio", "video", "file", "rich"], str] = Field(
        default_factory=dict
    )


class PipelineSettings(_Section):
    """Worker limits and the texts imrelay sends on its own behalf."""

    max_concurrency: int = Field(64, ge=1)
    max_pending: int = Field(10000, ge=1)
    group_require_mention: bool = True
    drain_timeout_s: float = Field(20.0, ge=0)
    unsupported_notice: str = "Sorry, I can only read text messages for now."
    failure_notice: str = "Sorry, something went wrong while answering. Please try again later."
    help_text: str = (
        "Send me a message and I will answer. Commands: /reset clears our conversation, "
        "/help shows this text."
    )
    reset_notice: str = "Conversation cleared."


class ContextSettings(_Section):
    """Conversation history given to the model."""

    max_turns: int = Field(20, ge=0)
    max_tokens: int = Field(3000, ge=1)
    ttl_s: float = Field(86400.0, gt=0)
    scope: Literal["conversation", "sender"] = "conversation"


class LoggingSettings(_Section):
    """Log format and level; ``include_text`` logs message text (at DEBUG only)."""

    format: Literal["ecs", "text"] = "ecs"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    include_text: bool = False


class Settings(_Section):
    """The whole configuration file."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    platforms: dict[str, PlatformSettings] = Field(default_factory=dict)
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    context: ContextSettings = Field(default_factory=ContextSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="after")
    def _routes_name_models(self) -> Settings:
        names = set(self.models)
        if not self.models:
            raise ValueError("models: at least one model is required")
        if self.routing.default not in names:
            raise ValueError(f"routing.default: unknown model {self.routing.default!r}")
        for kind, model in self.routing.by_kind.items():
            if model not in names:
                raise ValueError(f"routing.by_kind.{kind}: unknown model {model!r}")
        return self
