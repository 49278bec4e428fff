"""Configuration: the schema (pydantic models) and, below it, loading and validation.

See ../../docs/configuration.md for every key. Settings are loaded once by the CLI and passed
down; nothing reads configuration globally: the environment, home and working directory are
arguments (defaulting to the process's own only when not given).

Loading, in order: :func:`discover_config` finds the file, it is read as YAML or JSON, and
:func:`parse_settings` expands ``${VAR}`` references, maps the integration guide's layout
(``endpoints``/``ai_engine``), applies ``IMRELAY_<SECTION>__<KEY>`` overrides and validates.
Every problem found is reported at once in one :class:`~imrelay.errors.ConfigError` whose key
paths name the user's own keys and whose messages never contain a configured value.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Final, Literal, Union, cast, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from imrelay.errors import ConfigError
from imrelay.http import ProxyURL
from imrelay.security.access import AccessSettings
from imrelay.security.audit import AuditSettings
from imrelay.security.pii import PIISettings
from imrelay.security.ratelimit import RateLimitSettings
from imrelay.security.secrets import (
    SecretsSettings,
    SecretStore,
    has_secret_refs,
    resolve_secret_refs,
)
from imrelay.security.words import WordsSettings

__all__ = [
    "CanarySettings",
    "ContextSettings",
    "DingTalkRateLimitSettings",
    "DingTalkReplySettings",
    "DingTalkSettings",
    "EchoModelSettings",
    "LocalModelSettings",
    "LoggingSettings",
    "ModelSettings",
    "OpenAIModelSettings",
    "PipelineSettings",
    "PlatformSettings",
    "RoutingSettings",
    "RuleMatchSettings",
    "RuleSettings",
    "SecuritySettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "discover_config",
    "format_config_error",
    "load_settings",
    "parse_settings",
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


class DingTalkReplySettings(_Section):
    """How answers are delivered on DingTalk."""

    stream: Literal["off", "card"] = "off"
    card_template_id: str = Field("382e4302-551d-4880-bf29-a30acfab2e71.schema", min_length=1)
    card_update_interval_ms: float = Field(300.0, ge=50)
    max_chars: int = Field(4000, ge=200, le=20000)
    openapi_after_s: float = Field(600.0, ge=0)


class DingTalkRateLimitSettings(_Section):
    """Sending limits imrelay keeps to, below DingTalk's own."""

    per_conversation_per_minute: int = Field(20, ge=1)
    app_qps: float = Field(20.0, gt=0)


class DingTalkSettings(_Section):
    """A DingTalk enterprise-internal app bot."""

    type: Literal["dingtalk"]
    mode: Literal["stream", "webhook"] = "stream"
    app_key: str = Field(min_length=1)
    app_secret: SecretStr
    robot_code: str | None = None
    reply_format: Literal["text", "markdown"] = "markdown"
    api_base: str = "https://api.dingtalk.com"
    heartbeat_s: float = Field(60.0, gt=0)
    pong_timeout_s: float = Field(10.0, gt=0)
    open_timeout_s: float = Field(10.0, gt=0)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    healthy_after_s: float = Field(30.0, ge=0)
    http_timeout_s: float = Field(10.0, gt=0)
    aes_key: SecretStr | None = None
    token: SecretStr | None = None
    allow_cidrs: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    timestamp_window_s: float = Field(3600.0, gt=0)
    media_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    proxy: SecretStr | None = None
    reply: DingTalkReplySettings = Field(default_factory=DingTalkReplySettings)
    rate_limit: DingTalkRateLimitSettings = Field(default_factory=DingTalkRateLimitSettings)

    @field_validator("allow_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"not an IP network: {cidr!r}") from None
        return value

    @field_validator("aes_key")
    @classmethod
    def _valid_aes_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _AES_KEY.fullmatch(value.get_secret_value()):
            raise ValueError("must be 43 letters and digits (the console's EncodingAESKey)")
        return value

    @field_validator("proxy")
    @classmethod
    def _valid_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            ProxyURL.parse(value.get_secret_value())
        return value

    @property
    def effective_robot_code(self) -> str:
        """``robot_code``, defaulting to the app key (enterprise-internal apps)."""
        return self.robot_code or self.app_key


PlatformSettings = DingTalkSettings

_AES_KEY = re.compile(r"[A-Za-z0-9]{43}")


class OpenAIModelSettings(_Section):
    """Any OpenAI-compatible endpoint (vLLM, Ollama /v1, TGI, llama.cpp server, …)."""

    type: Literal["openai"]
    base_url: str = Field(min_length=1)
    endpoints: list[str] = Field(default_factory=list)
    model: str = Field(min_length=1)
    api_key: SecretStr | None = None
    max_tokens: int = Field(2048, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)
    stream: bool = True
    system_prompt: str | None = None
    retries: int = Field(2, ge=0, le=10)
    retry_backoff_s: float = Field(0.2, ge=0)
    first_token_timeout_s: float | None = Field(None, gt=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_reset_s: float = Field(30.0, gt=0)

    @property
    def urls(self) -> list[str]:
        """Every replica of this model: ``base_url`` first, then the other ``endpoints``."""
        return [self.base_url, *(u for u in self.endpoints if u != self.base_url)]

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # "api_key: ${VLLM_API_KEY:-}" for a server without a key: empty means no key.
        return None if value == "" else value


class EchoModelSettings(_Section):
    """A model that answers with what it was sent: for trying imrelay without a model."""

    type: Literal["echo"]
    latency_ms: float = Field(0.0, ge=0)
    system_prompt: str | None = None


class LocalModelSettings(_Section):
    """A model directory in Hugging Face layout, run in-process by transformers.

    Needs the optional extra ``imrelay[local]`` (torch and transformers). Nothing is downloaded:
    the directory must hold the model's ``config.json``, weights and tokenizer files.
    """

    type: Literal["local"]
    model_path: str = Field(min_length=1)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    timeout_s: float = Field(120.0, gt=0)
    threads: int = Field(1, ge=1, le=64)
    system_prompt: str | None = None

    @field_validator("model_path")
    @classmethod
    def _model_directory(cls, value: str) -> str:
        # The message names no path: the key path says which setting is wrong.
        directory = pathlib.Path(value).expanduser()
        if not directory.is_dir():
            raise ValueError(
                "no such directory; give a model directory in hugging face layout "
                "(with config.json)"
            )
        if not (directory / "config.json").is_file():
            raise ValueError(
                "the directory has no config.json; give a model directory in hugging face "
                "layout (as save_pretrained writes it)"
            )
        return str(directory)


ModelSettings = Annotated[
    OpenAIModelSettings | EchoModelSettings | LocalModelSettings, Field(discriminator="type")
]


def _as_str_list(value: object) -> object:
    """One string or number for a list of ids; YAML reads numeric ids as integers."""
    if isinstance(value, str | int):
        value = [value]
    if isinstance(value, list):
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


class RuleMatchSettings(_Section):
    """What a routing rule matches: every key given must match (a list matches any member)."""

    platform: list[str] = Field(default_factory=list)
    conversation: list[str] = Field(default_factory=list)
    group: list[str] = Field(default_factory=list)
    user: list[str] = Field(default_factory=list)
    department: list[str] = Field(default_factory=list)
    kind: list[Literal["text", "image", "audio", "video", "file", "rich", "code"]] = Field(
        default_factory=list
    )
    keyword: list[str] = Field(default_factory=list)
    regex: str | None = None

    @field_validator(
        "platform", "conversation", "group", "user", "department", "keyword", mode="before"
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _as_str_list(value)

    @field_validator("kind", mode="before")
    @classmethod
    def _kinds(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("keyword")
    @classmethod
    def _no_empty_keyword(cls, value: list[str]) -> list[str]:
        if any(not k.strip() for k in value):
            raise ValueError("a keyword cannot be empty")
        return value

    @field_validator("regex")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class CanarySettings(_Section):
    """Send part of a rule's traffic to a candidate model, and roll back if it does worse."""

    model: str = Field(min_length=1)
    percent: float = Field(0.0, ge=0, le=100)
    groups: list[str] = Field(default_factory=list)
    max_error_rate_delta: float = Field(0.05, ge=0, le=1)
    max_latency_ratio: float = Field(1.5, ge=1)
    min_requests: int = Field(20, ge=1)
    window_s: float = Field(300.0, gt=0)

    @field_validator("groups", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _as_str_list(value)

    @model_validator(mode="after")
    def _some_traffic(self) -> CanarySettings:
        if self.percent == 0 and not self.groups:
            raise ValueError("a canary needs a percent above 0 or a list of groups")
        return self


class RuleSettings(_Section):
    """One routing rule: messages it matches go to ``model`` (or its canary)."""

    name: str | None = Field(None, min_length=1)
    match: RuleMatchSettings = Field(default_factory=RuleMatchSettings)
    model: str = Field(min_length=1)
    system_prompt: str | None = None
    canary: CanarySettings | None = None


class RoutingSettings(_Section):
    """Which model answers which message."""

    default: str = "default"
    by_kind: dict[Literal["text", "image", "audio", "video", "file", "rich", "code"], str] = Field(
        default_factory=dict
    )
    fallback: dict[str, list[str]] = Field(default_factory=dict)
    rules: list[RuleSettings] = Field(default_factory=list)


class PipelineSettings(_Section):
    """Worker limits and the texts imrelay sends on its own behalf."""

    max_concurrency: int = Field(64, ge=1)
    max_pending: int = Field(10000, ge=1)
    max_attempts: int = Field(3, ge=1)
    loop_lag_target_ms: float = Field(0.0, ge=0)
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
    tokenizer: str | None = None


class LoggingSettings(_Section):
    """Log format and level; ``include_text`` logs message text (at DEBUG only)."""

    format: Literal["ecs", "text"] = "ecs"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    include_text: bool = False


class SecuritySettings(_Section):
    """Audit log, access control, inbound rate limits and the encrypted secret store."""

    words: WordsSettings = Field(default_factory=WordsSettings)
    pii: PIISettings = Field(default_factory=PIISettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    secrets: SecretsSettings = Field(default_factory=SecretsSettings)


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
    security: SecuritySettings = Field(default_factory=SecuritySettings)

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
        for model, chain in self.routing.fallback.items():
            if model not in names:
                raise ValueError(f"routing.fallback.{model}: unknown model {model!r}")
            for member in chain:
                if member not in names:
                    raise ValueError(f"routing.fallback.{model}: unknown model {member!r}")
                if member == model:
                    raise ValueError(
                        f"routing.fallback.{model}: a model cannot fall back to itself"
                    )
        seen: set[str] = set()
        for i, rule in enumerate(self.routing.rules):
            where = f"routing.rules.{i}"
            if rule.model not in names:
                raise ValueError(f"{where}.model: unknown model {rule.model!r}")
            if rule.name is not None:
                if rule.name in seen:
                    raise ValueError(f"{where}.name: another rule has the name {rule.name!r}")
                seen.add(rule.name)
            if rule.canary is None:
                continue
            if rule.name is None:
                raise ValueError(f"{where}.name: a rule with a canary needs a name")
            if rule.canary.model not in names:
                raise ValueError(f"{where}.canary.model: unknown model {rule.canary.model!r}")
            if rule.canary.model == rule.model:
                raise ValueError(f"{where}.canary.model: the candidate is the rule's own model")
        return self


# --------------------------------------------------------------------------------------------
# Loading.
#
# Theory of operation: parse_settings works on plain data (what YAML/JSON produce) in passes
# that each collect problems instead of stopping at the first one:
#   1. ${VAR} references in string values are expanded; problems carry the user's key path;
#   2. a file in the integration guide's layout is mapped to the native one, remembering how
#      native key paths read in the user's file (_Layout);
#   3. IMRELAY_<SECTION>__<KEY> variables override or create keys (a problem at a key that an
#      override replaced is dropped: the override fixed it);
#   4. pydantic validates, and each of its errors becomes (user key path, message) built from
#      errors() without the input, because str(ValidationError) would print secret values.
# pydantic-settings is not used: Settings is validated from injected data (no implicit
# os.environ), and ${VAR} expansion, the guide layout and user key paths are not its features.

_KeyPath = tuple[Any, ...]
_Problem = tuple[_KeyPath, str]

_CONFIG_VAR: Final = "IMRELAY_CONFIG"
_OVERRIDE_PREFIX: Final = "IMRELAY_"
_LOCAL_NAMES: Final = ("imrelay.yaml", "imrelay.yml", "imrelay.json")
_GUIDE_FILE: Final = (".bot_config", "config.json")
_REFERENCE: Final = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")
_REFERENCE_BODY: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_MALFORMED_REFERENCE: Final = (
    "malformed environment variable reference; write ${NAME} or ${NAME:-default}, "
    "and $${ for a literal ${"
)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    home: pathlib.Path | None = None,
    cwd: pathlib.Path | None = None,
) -> tuple[Settings, pathlib.Path]:
    """Find, read and validate the configuration.

    Args:
        path: the file given on the command line (``--config``), if any.
        environ: the environment for discovery, ``${VAR}`` references and overrides
            (default: the process's).
        home: the home directory for ``~/.bot_config/config.json`` (default: the user's).
        cwd: the directory for ``./imrelay.yaml`` and relative paths (default: the current one).

    Returns:
        The settings and the file they came from (there are no built-in defaults: a file is
        required, since at least one model must be configured).

    Raises:
        ConfigError: no file was found, it could not be read or parsed, or it is invalid.
    """
    env = os.environ if environ is None else environ
    file = discover_config(path, environ=env, home=home, cwd=cwd)
    data = _read_file(file)
    return parse_settings(data, environ=env, source=str(file)), file


def discover_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    home: pathlib.Path | None = None,
    cwd: pathlib.Path | None = None,
) -> pathlib.Path:
    """Find the configuration file.

    The order: ``path``, ``$IMRELAY_CONFIG``, ``./imrelay.yaml``, ``./imrelay.yml``,
    ``./imrelay.json``, ``~/.bot_config/config.json``. A file named explicitly (``path`` or
    ``$IMRELAY_CONFIG``) must exist; the others are tried in turn.

    Args:
        path: the file given on the command line, if any; ``~`` and relative paths are allowed.
        environ: where ``IMRELAY_CONFIG`` is looked up (default: the process's environment).
        home: the home directory (default: the user's).
        cwd: the working directory (default: the current one).

    Returns:
        The path of the file to read.

    Raises:
        ConfigError: a named file does not exist, or no file was found.
    """
    env = os.environ if environ is None else environ
    base = pathlib.Path.cwd() if cwd is None else cwd
    if home is None:
        try:
            home = pathlib.Path.home()
        except RuntimeError:  # no HOME and no passwd entry: skip the guide location
            home = None
    if path is not None and os.fspath(path) != "":
        return _named_file(os.fspath(path), "", home, base)
    if env.get(_CONFIG_VAR, ""):
        return _named_file(env[_CONFIG_VAR], f" (from ${_CONFIG_VAR})", home, base)
    candidates = [base / name for name in _LOCAL_NAMES]
    if home is not None:
        candidates.append(home.joinpath(*_GUIDE_FILE))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        [
            (
                "config",
                f"no configuration file found; looked in: {looked}; "
                f"pass --config or set {_CONFIG_VAR}",
            )
        ]
    )


def parse_settings(
    data: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "<dict>",
) -> Settings:
    """Validate configuration data (a parsed file) into :class:`Settings`.

    Args:
        data: the file's top-level mapping, native or integration-guide layout.
        environ: for ``${VAR}`` references and ``IMRELAY_…`` overrides (default: the
            process's environment).
        source: names the data in problems about the whole document (usually the file path).

    Returns:
        The validated settings.

    Raises:
        ConfigError: with one ``(key path, message)`` per problem found.
    """
    env = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        raise ConfigError([(source, _top_level_problem(data))])
    try:
        return _parse(data, env, source)
    except RecursionError:
        pass
    raise ConfigError([(source, "the configuration is nested too deeply")])


def format_config_error(err: ConfigError) -> str:
    """Render a :class:`ConfigError` for a terminal: one ``config error: key: message`` line each.

    Args:
        err: the error to render.

    Returns:
        The lines, joined by newlines, without a trailing newline.
    """
    problems = err.problems or [("", str(err))]
    return "\n".join(
        f"config error: {key}: {message}" if key else f"config error: {message}"
        for key, message in problems
    )


# -- files -----------------------------------------------------------------------------------


def _named_file(
    given: str, origin: str, home: pathlib.Path | None, cwd: pathlib.Path
) -> pathlib.Path:
    if home is not None and (given == "~" or given.startswith(("~/", "~\\"))):
        file = home / given[2:]
    else:
        file = pathlib.Path(given)
    file = file if file.is_absolute() else cwd / file
    if not file.exists():
        raise ConfigError([(str(file), f"no such file{origin}")])
    return file


def _read_file(file: pathlib.Path) -> dict[Any, Any]:
    # Each ConfigError below is raised outside the ``except`` block that found the problem, so
    # it has no __context__: the parsers' exceptions quote the offending line and a
    # UnicodeDecodeError holds the whole file, either of which may contain a secret.
    key = str(file)
    problem: str | None = None
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raw, problem = b"", f"cannot read the file: {(exc.strerror or type(exc).__name__).lower()}"
    if problem is None:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            text, problem = "", f"the file is not utf-8 text (byte {exc.start})"
    if problem is None:
        parse = _parse_json if file.suffix.lower() == ".json" else _parse_yaml
        data, problem = parse(text)
    if problem is None and not isinstance(data, dict):
        problem = _top_level_problem(data)
    if problem is not None:
        raise ConfigError([(key, problem)])
    return cast("dict[Any, Any]", data)


def _parse_json(text: str) -> tuple[Any, str | None]:
    """The parsed document, or None and the problem."""
    try:
        return json.loads(text, object_pairs_hook=_json_object), None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return None, f"invalid json at {where}: {_lower_first(exc.msg)}"
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, _DuplicateKey) else "nesting is too deep"
        return None, f"invalid json: {reason}"


class _DuplicateKey(ValueError):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateKey(f"duplicate key {name!r}")
        out[name] = value
    return out


class _YAMLLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            name = self.construct_object(key_node, deep=deep)
            if name in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {name!r}", key_node.start_mark
                )
            seen.append(name)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> tuple[Any, str | None]:
    """The parsed document, or None and the problem (never quoting the text)."""
    try:
        return yaml.load(text, Loader=_YAMLLoader), None  # nosec B506  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, f"invalid yaml{where}: {what}"
    except yaml.reader.ReaderError as exc:
        return None, f"invalid yaml at character {exc.position}: {exc.reason}"
    except yaml.YAMLError:
        return None, "invalid yaml"
    except (ValueError, TypeError):  # an explicit tag (!!int, !!binary…) on a value it cannot take
        return None, "invalid yaml: a value does not match its tag"
    except RecursionError:
        return None, "invalid yaml: nesting is too deep"


def _top_level_problem(data: object) -> str:
    if data is None:
        return "the file is empty; it must hold a mapping of sections (server, platforms, models…)"
    kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
    return f"the top level must be a mapping of sections, not {kind}"


# -- passes ----------------------------------------------------------------------------------


def _parse(data: Mapping[Any, Any], env: Mapping[str, str], source: str) -> Settings:
    problems: list[_Problem] = []
    tree: dict[Any, Any] = _expand_tree(data, (), env, problems, set())
    layout = _Layout()
    if _is_guide(tree):
        tree, layout = _from_guide(tree, problems)
    overrides, override_problems = _read_overrides(env)
    applied = [(_apply_override(tree, path, value), var) for var, path, value in overrides]
    fixed = [layout.to_user(path) for path, _ in applied]
    problems = [p for p in problems if not any(p[0][: len(f)] == f for f in fixed)]
    problems += override_problems
    later: list[_Problem] = []
    settings: Settings | None = None
    if has_secret_refs(tree):
        tree = _resolve_secrets(tree, env, problems)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        later = _validation_problems(exc, layout, applied)
    # Raised here, outside the except block, so the ConfigError has no __context__: the
    # ValidationError holds (and prints) the input values, secrets included. A key that already
    # has a problem (say, an unset ${VAR} expanded to "") would only repeat it in other words.
    problems += [p for p in later if not any(p[0][: len(q)] == q for q, _ in problems)]
    if problems or settings is None:
        raise ConfigError(_render(problems, source))
    return settings


def _resolve_secrets(
    tree: dict[Any, Any], env: Mapping[str, str], problems: list[_Problem]
) -> dict[Any, Any]:
    """Replace ``secret:NAME`` values with the secrets kept by ``imrelay secrets``."""
    section = tree.get("security", {})
    raw = section.get("secrets", {}) if isinstance(section, dict) else {}
    try:
        secrets_settings = SecretsSettings.model_validate(raw if isinstance(raw, dict) else {})
    except ValidationError:
        problems.append((("security", "secrets"), "invalid secret store settings"))
        return tree
    failure: ConfigError | None = None
    try:
        store = SecretStore.from_settings(secrets_settings, environ=env)
        return resolve_secret_refs(tree, store)
    except ConfigError as exc:
        failure = exc
    problems.extend(
        (tuple(key.split(".")) if key else ("security", "secrets"), message)
        for key, message in failure.problems
    )
    return tree


def _render(problems: list[_Problem], source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for path, message in problems:
        entry = (".".join(_key_text(part) for part in path) if path else source, message)
        if entry not in out:
            out.append(entry)
    return out


def _key_text(part: Any) -> str:
    """A key as written in a key path; quoted when it is empty, holds a dot or is unprintable."""
    text = str(part)
    if text and "." not in text and text.isprintable() and text == text.strip():
        return text
    escaped = (json.dumps(ch)[1:-1] if ch in '"\\' or not ch.isprintable() else ch for ch in text)
    return '"' + "".join(escaped) + '"'


def _expand_tree(
    node: Any, path: _KeyPath, env: Mapping[str, str], problems: list[_Problem], open_: set[int]
) -> Any:
    """Copy ``node`` with ``${VAR}`` references in its strings expanded."""
    if isinstance(node, str):
        return _expand(node, path, env, problems) if "$" in node else node
    if not isinstance(node, Mapping | list | tuple):
        return node
    if id(node) in open_:
        problems.append((path, "a yaml alias contains itself"))
        return None
    open_.add(id(node))
    try:
        if isinstance(node, Mapping):
            return {k: _expand_tree(v, (*path, k), env, problems, open_) for k, v in node.items()}
        return [_expand_tree(v, (*path, i), env, problems, open_) for i, v in enumerate(node)]
    finally:
        open_.discard(id(node))


def _expand(text: str, path: _KeyPath, env: Mapping[str, str], problems: list[_Problem]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        ref = _REFERENCE_BODY.fullmatch(match.group(1)) if match.group(2) else None
        if ref is None or "${" in (ref.group(2) or ""):
            problems.append((path, _MALFORMED_REFERENCE))
            return ""
        name, default = ref.group(1), ref.group(2)
        value = env.get(name)
        if default is not None and not value:  # ":-" like the shell: unset or empty
            return default
        if value is None:
            problems.append((path, f"environment variable {name} is not set"))
            return ""
        return value

    return _REFERENCE.sub(replace, text)


@dataclass(frozen=True, slots=True)
class _Layout:
    """How native key paths read in the user's file (the identity for the native layout)."""

    guide: bool = False
    endpoints: tuple[Any, ...] = ()
    engine: bool = False

    def to_user(self, path: _KeyPath) -> _KeyPath:
        if len(path) >= 2 and path[0] == "platforms" and path[1] in self.endpoints:
            rest = path[2:]
            if rest[:1] == ("reply_format",):
                rest = ("message_format", *rest[1:])
            return ("endpoints", path[1], *rest)
        if self.engine and path[:2] == ("models", "default"):
            return ("ai_engine", *path[2:])
        return path

    def explain(self, path: _KeyPath, message: str) -> _Problem:
        if self.guide and path == ("models",):
            return ("ai_engine",), "field required"
        return path, message


def _is_guide(tree: Mapping[Any, Any]) -> bool:
    return ("endpoints" in tree or "ai_engine" in tree) and not (
        "platforms" in tree or "models" in tree
    )


def _from_guide(tree: dict[Any, Any], problems: list[_Problem]) -> tuple[dict[Any, Any], _Layout]:
    """Map the integration guide's ``endpoints``/``ai_engine`` to ``platforms``/``models``."""
    out = {k: v for k, v in tree.items() if k not in ("endpoints", "ai_engine")}
    names: list[Any] = []
    if "endpoints" in tree:
        endpoints = tree["endpoints"]
        if not isinstance(endpoints, dict):
            problems.append((("endpoints",), "input should be a valid dictionary"))
            endpoints = {}
        platforms: dict[Any, Any] = {}
        for name, endpoint in endpoints.items():
            mapped = _guide_endpoint(name, endpoint, problems)
            if mapped is not None:
                platforms[name] = mapped
                names.append(name)
        out["platforms"] = platforms
    if "ai_engine" in tree:
        engine = tree["ai_engine"]
        if isinstance(engine, dict):
            out["models"] = {"default": _guide_model(engine)}
        else:
            problems.append((("ai_engine",), "input should be a valid dictionary"))
    layout = _Layout(True, tuple(names), "models" in out)
    return out, layout


def _guide_model(engine: dict[Any, Any]) -> dict[Any, Any]:
    """``ai_engine`` as a model: a local model directory when it has ``model_path`` and no
    ``base_url`` (``model``, a served name, means nothing then), else an OpenAI endpoint."""
    local = "model_path" in engine and "base_url" not in engine
    if engine.get("type", "local" if local else "openai") == "local":
        model = {k: v for k, v in engine.items() if k != "model"}
        model.setdefault("type", "local")
        return model
    model = {k: v for k, v in engine.items() if k != "model_path"}
    model.setdefault("type", "openai")
    if model.get("model") in (None, ""):
        model["model"] = _basename(engine.get("model_path")) or "default"
    return model


def _guide_endpoint(name: Any, endpoint: Any, problems: list[_Problem]) -> dict[Any, Any] | None:
    if not isinstance(endpoint, dict):
        problems.append((("endpoints", name), "input should be a valid dictionary"))
        return None
    kind = endpoint.get("type", name.lower() if isinstance(name, str) else name)
    if kind not in _platform_types():
        problems.append((("endpoints", name), f"platform type {kind!r} is not supported yet"))
        return None
    platform: dict[Any, Any] = {"type": kind}
    for key, value in endpoint.items():
        if key == "stream_url":  # informational: the WS URL comes from the open-connection call
            continue
        if key == "message_format":
            platform["reply_format"] = value.lower() if isinstance(value, str) else value
        else:
            platform[key] = value
    return platform


def _basename(model_path: Any) -> str:
    if not isinstance(model_path, str):
        return ""
    return re.split(r"[/\\]", model_path.rstrip("/\\"))[-1]


def _platform_types() -> list[Any]:
    """The ``type`` tags :data:`PlatformSettings` accepts."""
    members = _union_members(PlatformSettings) or [PlatformSettings]
    return [tag for member in members for tag in _single_literals(member)]


def _read_overrides(
    env: Mapping[str, str],
) -> tuple[list[tuple[str, _KeyPath, str]], list[_Problem]]:
    """``IMRELAY_<SECTION>__<KEY>…`` variables, sorted by name (variables without ``__`` are
    not overrides, e.g. ``IMRELAY_CONFIG``)."""
    overrides: list[tuple[str, _KeyPath, str]] = []
    problems: list[_Problem] = []
    for var in sorted(env):
        if not var.upper().startswith(_OVERRIDE_PREFIX) or var.upper() == _CONFIG_VAR:
            continue
        rest = var[len(_OVERRIDE_PREFIX) :]
        if "__" not in rest:
            continue
        parts = tuple(rest.lower().split("__"))
        if "" in parts:
            problems.append(((var,), "malformed override name: an empty key between '__'"))
            continue
        overrides.append((var, parts, env[var]))
    return overrides, problems


def _apply_override(tree: dict[Any, Any], path: _KeyPath, value: str) -> _KeyPath:
    """Set ``path`` to ``value`` in ``tree``, creating mappings; returns the keys used.

    The value stays a string: pydantic converts it to the field's type ("9000" → 9000,
    "true" → True), where YAML scalar rules would turn a secret such as "0123" into 83.
    Existing keys match case-insensitively (a platform named "DingTalk" is ``…__DINGTALK__…``).
    """
    node, used = tree, []
    for depth, part in enumerate(path):
        same = [k for k in node if isinstance(k, str) and k.lower() == part]
        key = part if part in node or len(same) != 1 else same[0]
        used.append(key)
        if depth == len(path) - 1:
            node[key] = value
        else:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
    return tuple(used)


# -- pydantic errors -------------------------------------------------------------------------


def _validation_problems(
    exc: ValidationError, layout: _Layout, applied: list[tuple[_KeyPath, str]]
) -> list[_Problem]:
    problems: list[_Problem] = []
    for error in exc.errors(include_url=False, include_input=False, include_context=True):
        path, message = _user_loc(error["loc"]), _lower_first(error["msg"])
        ctx = error.get("ctx") or {}
        kind = error["type"]
        if kind in ("value_error", "assertion_error"):
            message = message.split(", ", 1)[-1]
            if not path and ": " in message:  # Settings' own checks say "key.path: message"
                head, message = message.split(": ", 1)
                path = tuple(head.split("."))
        elif kind == "union_tag_not_found":
            path, message = (
                (*path, str(ctx.get("discriminator", "type")).strip("'")),
                "field required",
            )
        elif kind == "union_tag_invalid":
            expected = str(ctx.get("expected_tags", ""))
            head, _, last = expected.rpartition(", ")
            path = (*path, str(ctx.get("discriminator", "type")).strip("'"))
            message = f"input should be {head} or {last}" if head else f"input should be {last}"
        if path[-1:] == ("[key]",):
            path, message = path[:-1], f"invalid key: {message}"
        native = path
        path, message = layout.explain(layout.to_user(path), message)
        setters = [var for used, var in applied if native and _related(used, native)]
        if setters:
            message = f"{message} (set by {', '.join(setters)})"
        problems.append((path, message))
    return problems


def _related(a: _KeyPath, b: _KeyPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _user_loc(loc: tuple[int | str, ...]) -> _KeyPath:
    """Drop the labels pydantic inserts after a union (``models.x.openai.base_url``)."""
    out: list[Any] = []
    shape: Any = Settings
    for item in loc:
        if item == "[key]":
            out.append(item)
            continue
        members = _union_members(shape)
        if members:
            shape = next((m for m in members if item in (m.__name__, *_single_literals(m))), None)
            continue
        out.append(item)
        shape = _child_shape(shape, item)
    return tuple(out)


def _union_members(shape: Any) -> list[type[BaseModel]] | None:
    """The model members of a union with two or more of them, else None."""
    if get_origin(shape) is Annotated:
        shape = get_args(shape)[0]
    if get_origin(shape) not in (Union, UnionType):
        return None
    members = [m for m in get_args(shape) if isinstance(m, type) and issubclass(m, BaseModel)]
    return members if len(members) >= 2 else None


def _child_shape(shape: Any, item: Any) -> Any:
    if get_origin(shape) is Annotated:
        shape = get_args(shape)[0]
    if get_origin(shape) in (Union, UnionType):  # X | None: pydantic adds no label
        rest = [m for m in get_args(shape) if m is not type(None)]
        shape = rest[0] if len(rest) == 1 else None
    if isinstance(shape, type) and issubclass(shape, BaseModel):
        field = shape.model_fields.get(item) if isinstance(item, str) else None
        return None if field is None else field.annotation
    if get_origin(shape) is dict:
        return get_args(shape)[1]
    if get_origin(shape) is list:
        return get_args(shape)[0]
    return None


def _single_literals(model: type[BaseModel]) -> list[Any]:
    """Values of the model's one-value ``Literal`` fields: the tags of a tagged union."""
    values: list[Any] = []
    for field in model.model_fields.values():
        if get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
            values.append(get_args(field.annotation)[0])
    return values


def _lower_first(message: str) -> str:
    return message[:1].lower() + message[1:]
