"""Tests for configuration loading: files, ${VAR} references, overrides, discovery, errors."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from imrelay.config import (
    ContextSettings,
    DingTalkRateLimitSettings,
    DingTalkReplySettings,
    DingTalkSettings,
    EchoModelSettings,
    LocalModelSettings,
    LoggingSettings,
    OpenAIModelSettings,
    PipelineSettings,
    RoutingSettings,
    SecuritySettings,
    ServerSettings,
    Settings,
    StorageSettings,
    discover_config,
    format_config_error,
    load_settings,
    parse_settings,
)
from imrelay.errors import ConfigError
from imrelay.security.access import AccessRule, AccessSettings
from imrelay.security.audit import AuditSettings
from imrelay.security.pii import CustomPattern, PIISettings
from imrelay.security.ratelimit import RateLimitSettings
from imrelay.security.secrets import SecretsSettings
from imrelay.security.words import CategoryAction, WordsSettings

REPO = pathlib.Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Value-9f8e7d"

MINIMAL_YAML = """\
platforms:
  dingtalk:
    type: dingtalk
    app_key: dingkey
    app_secret: ${DINGTALK_APP_SECRET}
models:
  default: {type: openai, base_url: "http://127.0.0.1:8000/v1", model: qwen}
"""


def minimal(**sections: Any) -> dict[str, Any]:
    """A valid native-layout document, with ``sections`` replacing or adding top-level keys."""
    data: dict[str, Any] = {
        "platforms": {"dingtalk": {"type": "dingtalk", "app_key": "k", "app_secret": "s"}},
        "models": {"default": {"type": "openai", "base_url": "http://h/v1", "model": "m"}},
    }
    data.update(sections)
    return data


def error_lines(data: Any, environ: dict[str, str] | None = None) -> list[str]:
    """The rendered error lines ``parse_settings`` raises for ``data``."""
    with pytest.raises(ConfigError) as info:
        parse_settings(data, environ=environ or {})
    return format_config_error(info.value).splitlines()


def file_error_lines(path: pathlib.Path, environ: dict[str, str] | None = None) -> list[str]:
    """The rendered error lines ``load_settings`` raises for the file at ``path``."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ or {}, home=path.parent, cwd=path.parent)
    return format_config_error(info.value).splitlines()


def outcome(build: Callable[[], Settings]) -> Settings | ConfigError:
    """What ``build`` returns, or the ConfigError it raises (any other exception propagates)."""
    try:
        return build()
    except ConfigError as err:
        return err


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    """Write ``text`` to ``path`` (creating folders) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- files -----------------------------------------------------------------------------------


def test_load_settings_reads_yaml(tmp_path: pathlib.Path) -> None:
    """A YAML file is read, its references expanded, and the file's path returned."""
    file = write(tmp_path / "imrelay.yaml", MINIMAL_YAML)
    settings, source = load_settings(file, environ={"DINGTALK_APP_SECRET": SECRET})
    assert source == file
    platform = settings.platforms["dingtalk"]
    assert platform.app_secret.get_secret_value() == SECRET
    assert platform.effective_robot_code == "dingkey"
    assert platform.reply_format == "markdown"
    model = settings.models["default"]
    assert isinstance(model, OpenAIModelSettings)
    assert model.model == "qwen"


def test_load_settings_reads_json(tmp_path: pathlib.Path) -> None:
    """A .json file is read as JSON."""
    file = write(tmp_path / "conf.json", json.dumps(minimal(server={"port": 9001})))
    settings, _ = load_settings(file, environ={})
    assert settings.server.port == 9001


def test_load_settings_accepts_json_content_in_yaml_file(tmp_path: pathlib.Path) -> None:
    """JSON text in a file not ending in .json is read (as YAML, which accepts it)."""
    file = write(tmp_path / "imrelay.yaml", json.dumps(minimal(server={"port": 9002})))
    assert load_settings(file, environ={})[0].server.port == 9002


def test_load_settings_reads_utf8_with_bom_and_chinese_text(tmp_path: pathlib.Path) -> None:
    """A UTF-8 BOM is tolerated and non-ASCII text is kept."""
    text = (
        MINIMAL_YAML.replace("${DINGTALK_APP_SECRET}", "s") + "pipeline: {reset_notice: 已清空}\n"
    )
    file = tmp_path / "imrelay.yaml"
    file.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_settings(file, environ={})[0].pipeline.reset_notice == "已清空"


def test_load_settings_shipped_example_is_valid() -> None:
    """examples/imrelay.yaml loads with its secrets set in the environment."""
    env = {"DINGTALK_APP_KEY": "dingabc", "DINGTALK_APP_SECRET": SECRET, "VLLM_HOST": "gpu1"}
    settings, _ = load_settings(REPO / "examples" / "imrelay.yaml", environ=env)
    model = settings.models[settings.routing.default]
    assert isinstance(model, OpenAIModelSettings)
    assert model.base_url == "http://gpu1:8000/v1"
    assert model.api_key is None  # ${VLLM_API_KEY:-} is empty: no key
    assert settings.platforms["dingtalk"].app_key == "dingabc"


def test_docs_configuration_lists_every_key() -> None:
    """docs/configuration.md mentions every key of every section."""
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    sections: list[type[BaseModel]] = [
        Settings,
        ServerSettings,
        StorageSettings,
        DingTalkSettings,
        DingTalkReplySettings,
        DingTalkRateLimitSettings,
        OpenAIModelSettings,
        EchoModelSettings,
        LocalModelSettings,
        RoutingSettings,
        PipelineSettings,
        ContextSettings,
        LoggingSettings,
        SecuritySettings,
        WordsSettings,
        CategoryAction,
        PIISettings,
        CustomPattern,
        AuditSettings,
        AccessSettings,
        AccessRule,
        RateLimitSettings,
        SecretsSettings,
    ]
    missing = [
        f"{model.__name__}.{name}"
        for model in sections
        for name in model.model_fields
        if f"`{name}`" not in text
    ]
    assert missing == []


# -- ${VAR} references -----------------------------------------------------------------------


def test_parse_settings_reference_whole_value_is_converted() -> None:
    """A whole-value reference is replaced and converted to the key's type."""
    data = minimal(server={"port": "${PORT}", "host": "${HOST}"})
    settings = parse_settings(data, environ={"PORT": "9000", "HOST": "0.0.0.0"})
    assert settings.server.port == 9000
    assert settings.server.host == "0.0.0.0"


def test_parse_settings_reference_embedded_in_text() -> None:
    """References inside a longer string are each replaced."""
    data = minimal()
    data["models"]["default"]["base_url"] = "http://${HOST}:${PORT}/v1"
    settings = parse_settings(data, environ={"HOST": "gpu1", "PORT": "8000"})
    model = settings.models["default"]
    assert isinstance(model, OpenAIModelSettings)
    assert model.base_url == "http://gpu1:8000/v1"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, "fallback"), ({"NAME": ""}, "fallback"), ({"NAME": "given"}, "given")],
)
def test_parse_settings_reference_default(environ: dict[str, str], expected: str) -> None:
    """``${VAR:-default}`` uses the default when the variable is unset or empty."""
    settings = parse_settings(minimal(server={"host": "${NAME:-fallback}"}), environ=environ)
    assert settings.server.host == expected


def test_parse_settings_reference_set_but_empty_without_default_is_empty() -> None:
    """A variable set to an empty string expands to an empty string."""
    settings = parse_settings(minimal(pipeline={"reset_notice": "a${E}b"}), environ={"E": ""})
    assert settings.pipeline.reset_notice == "ab"


def test_parse_settings_reference_escape_is_literal() -> None:
    """``$${`` is a literal ``${`` and is not expanded."""
    settings = parse_settings(minimal(pipeline={"help_text": "use $${HOME} and $$ and $x"}))
    assert settings.pipeline.help_text == "use ${HOME} and $$ and $x"


def test_parse_settings_reference_inside_list_item() -> None:
    """References are expanded in list items too (reported with their index)."""
    lines = error_lines(minimal(extra_list=["ok", "${MISSING}"]))
    assert "config error: extra_list.1: environment variable MISSING is not set" in lines


def test_parse_settings_reference_missing_names_key_and_variable() -> None:
    """An unset variable is reported at the key that refers to it."""
    data = minimal()
    data["platforms"]["dingtalk"]["app_secret"] = "${DINGTALK_APP_SECRET}"
    assert error_lines(data) == [
        "config error: platforms.dingtalk.app_secret: "
        "environment variable DINGTALK_APP_SECRET is not set"
    ]


@pytest.mark.parametrize("text", ["${", "x${NAME", "${1BAD}", "${A B}", "${A:-${B}}", "${}"])
def test_parse_settings_reference_malformed(text: str) -> None:
    """A reference that is not ``${NAME}`` or ``${NAME:-default}`` is reported."""
    lines = error_lines(minimal(server={"host": text}), {"NAME": "n", "B": "b", "A": "a"})
    assert lines == [
        "config error: server.host: malformed environment variable reference; "
        "write ${NAME} or ${NAME:-default}, and $${ for a literal ${"
    ]


# -- IMRELAY_ overrides ----------------------------------------------------------------------


def test_parse_settings_override_nested_typed_values() -> None:
    """Overrides reach nested keys and are converted to the keys' types."""
    env = {
        "IMRELAY_SERVER__PORT": "9000",
        "IMRELAY_PIPELINE__GROUP_REQUIRE_MENTION": "false",
        "IMRELAY_MODELS__DEFAULT__TEMPERATURE": "0.2",
        "IMRELAY_MODELS__DEFAULT__BASE_URL": "http://gpu2:8000/v1",
    }
    settings = parse_settings(minimal(server={"port": 1}), environ=env)
    assert settings.server.port == 9000
    assert settings.pipeline.group_require_mention is False
    model = settings.models["default"]
    assert isinstance(model, OpenAIModelSettings)
    assert model.temperature == 0.2
    assert model.base_url == "http://gpu2:8000/v1"


def test_parse_settings_override_creates_keys() -> None:
    """Overrides create sections, entries and mapping keys that the file lacks."""
    env = {
        "IMRELAY_MODELS__FAST__TYPE": "echo",
        "IMRELAY_ROUTING__BY_KIND__IMAGE": "fast",
        "IMRELAY_LOGGING__LEVEL": "DEBUG",
    }
    settings = parse_settings(minimal(), environ=env)
    assert isinstance(settings.models["fast"], EchoModelSettings)
    assert settings.routing.by_kind == {"image": "fast"}
    assert settings.logging.level == "DEBUG"


def test_parse_settings_override_keeps_strings_exact() -> None:
    """A string value is kept exactly (no YAML 1.1 octal or boolean conversion)."""
    env = {
        "IMRELAY_PLATFORMS__DINGTALK__APP_SECRET": "0123",
        "IMRELAY_PLATFORMS__DINGTALK__APP_KEY": "on",
    }
    platform = parse_settings(minimal(), environ=env).platforms["dingtalk"]
    assert platform.app_secret.get_secret_value() == "0123"
    assert platform.app_key == "on"


def test_parse_settings_override_matches_existing_key_ignoring_case() -> None:
    """A mixed-case name in the file is matched by the upper-case variable."""
    data = minimal()
    data["platforms"] = {"DingTalk": data["platforms"]["dingtalk"]}
    env = {"IMRELAY_PLATFORMS__DINGTALK__APP_KEY": "newkey"}
    settings = parse_settings(data, environ=env)
    assert list(settings.platforms) == ["DingTalk"]
    assert settings.platforms["DingTalk"].app_key == "newkey"


def test_parse_settings_override_replaces_missing_reference() -> None:
    """An overridden key's unset ``${VAR}`` is no longer a problem."""
    data = minimal()
    data["platforms"]["dingtalk"]["app_secret"] = "${UNSET}"
    env = {"IMRELAY_PLATFORMS__DINGTALK__APP_SECRET": SECRET}
    settings = parse_settings(data, environ=env)
    assert settings.platforms["dingtalk"].app_secret.get_secret_value() == SECRET


def test_parse_settings_override_value_is_not_expanded() -> None:
    """An override's own value is literal: ``${`` in it stays."""
    env = {"IMRELAY_PIPELINE__RESET_NOTICE": "${NOT_EXPANDED}"}
    assert parse_settings(minimal(), environ=env).pipeline.reset_notice == "${NOT_EXPANDED}"


def test_parse_settings_override_ignores_non_override_variables() -> None:
    """IMRELAY_CONFIG and IMRELAY_ names without ``__`` are not overrides."""
    env = {"IMRELAY_CONFIG": "/x.yaml", "IMRELAY_TESTS_TIMEOUT_FACTOR": "2", "HOME": "/h"}
    assert parse_settings(minimal(), environ=env) == parse_settings(minimal(), environ={})


def test_parse_settings_override_error_names_variable() -> None:
    """A problem at an overridden key names the variable that set it."""
    lines = error_lines(minimal(), {"IMRELAY_SERVER__PORT": "70000", "IMRELAY_SERVERR__PORT": "1"})
    assert lines == [
        "config error: server.port: input should be less than or equal to 65535 "
        "(set by IMRELAY_SERVER__PORT)",
        "config error: serverr: extra inputs are not permitted (set by IMRELAY_SERVERR__PORT)",
    ]


def test_parse_settings_override_empty_part_is_error() -> None:
    """A variable with an empty key between ``__`` is reported by name."""
    assert error_lines(minimal(), {"IMRELAY_SERVER____PORT": "1"}) == [
        "config error: IMRELAY_SERVER____PORT: malformed override name: an empty key between '__'"
    ]


# -- discovery -------------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """An empty home and an empty working directory."""
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    return home, cwd


def test_discover_config_order(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    """--config, then $IMRELAY_CONFIG, then ./imrelay.yaml|yml|json, then the guide file."""
    home, cwd = dirs
    guide = write(home / ".bot_config" / "config.json", "{}")
    assert discover_config(None, environ={}, home=home, cwd=cwd) == guide
    local_json = write(cwd / "imrelay.json", "{}")
    assert discover_config(None, environ={}, home=home, cwd=cwd) == local_json
    local_yml = write(cwd / "imrelay.yml", "{}")
    assert discover_config(None, environ={}, home=home, cwd=cwd) == local_yml
    local_yaml = write(cwd / "imrelay.yaml", "{}")
    assert discover_config(None, environ={}, home=home, cwd=cwd) == local_yaml
    from_env = write(cwd / "env.yaml", "{}")
    env = {"IMRELAY_CONFIG": str(from_env)}
    assert discover_config(None, environ=env, home=home, cwd=cwd) == from_env
    given_path = write(cwd / "given.yaml", "{}")
    assert discover_config(given_path, environ=env, home=home, cwd=cwd) == given_path


def test_discover_config_relative_and_home_paths(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    """Relative paths are taken from cwd and ``~/`` from home."""
    home, cwd = dirs
    in_cwd = write(cwd / "conf" / "a.yaml", "{}")
    in_home = write(home / "b.yaml", "{}")
    assert discover_config("conf/a.yaml", environ={}, home=home, cwd=cwd) == in_cwd
    env = {"IMRELAY_CONFIG": "~/b.yaml"}
    assert discover_config(None, environ=env, home=home, cwd=cwd) == in_home


def test_discover_config_empty_variable_is_unset(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    """An empty IMRELAY_CONFIG falls through to the next location."""
    home, cwd = dirs
    local = write(cwd / "imrelay.yaml", "{}")
    assert discover_config("", environ={"IMRELAY_CONFIG": ""}, home=home, cwd=cwd) == local


def test_discover_config_nothing_found_lists_places(
    dirs: tuple[pathlib.Path, pathlib.Path],
) -> None:
    """With no file anywhere, the error lists every place looked in."""
    home, cwd = dirs
    with pytest.raises(ConfigError) as info:
        discover_config(None, environ={}, home=home, cwd=cwd)
    assert info.value.key == "config"
    assert format_config_error(info.value) == (
        f"config error: config: no configuration file found; looked in: {cwd}/imrelay.yaml, "
        f"{cwd}/imrelay.yml, {cwd}/imrelay.json, {home}/.bot_config/config.json; "
        "pass --config or set IMRELAY_CONFIG"
    )


def test_discover_config_named_file_must_exist(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    """A missing --config or $IMRELAY_CONFIG file is an error, not a fall-through."""
    home, cwd = dirs
    write(cwd / "imrelay.yaml", "{}")
    with pytest.raises(ConfigError) as given_missing:
        discover_config("nope.yaml", environ={}, home=home, cwd=cwd)
    assert format_config_error(given_missing.value) == (
        f"config error: {cwd}/nope.yaml: no such file"
    )
    with pytest.raises(ConfigError) as env_missing:
        discover_config(
            None, environ={"IMRELAY_CONFIG": "/nonexistent/x.yaml"}, home=home, cwd=cwd
        )
    assert format_config_error(env_missing.value) == (
        "config error: /nonexistent/x.yaml: no such file (from $IMRELAY_CONFIG)"
    )


def test_load_settings_discovers_from_environment(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    """load_settings uses the injected environment for discovery and references alike."""
    home, cwd = dirs
    file = write(home / "elsewhere.yaml", MINIMAL_YAML)
    env = {"IMRELAY_CONFIG": str(file), "DINGTALK_APP_SECRET": SECRET}
    settings, source = load_settings(environ=env, home=home, cwd=cwd)
    assert source == file
    assert settings.platforms["dingtalk"].app_secret.get_secret_value() == SECRET


# -- the integration guide's layout ----------------------------------------------------------

GUIDE = {
    "endpoints": {
        "dingtalk": {
            "app_key": "dingkey",
            "app_secret": "${DINGTALK_APP_SECRET}",
            "stream_url": "wss://wss-open-connection.dingtalk.com:443/connect",
            "message_format": "text",
        }
    },
    "ai_engine": {
        "model_path": "/models/qwen2.5-7b/",
        "base_url": "http://127.0.0.1:8000/v1",
        "max_tokens": 1024,
        "temperature": 0.3,
    },
}


def test_load_settings_guide_file_in_home(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    """~/.bot_config/config.json in the guide's layout maps to a platform and a model."""
    home, cwd = dirs
    write(home / ".bot_config" / "config.json", json.dumps(GUIDE))
    settings, _ = load_settings(environ={"DINGTALK_APP_SECRET": SECRET}, home=home, cwd=cwd)
    platform = settings.platforms["dingtalk"]
    assert (platform.type, platform.mode, platform.app_key) == ("dingtalk", "stream", "dingkey")
    assert platform.app_secret.get_secret_value() == SECRET
    assert platform.reply_format == "text"
    model = settings.models["default"]
    assert isinstance(model, OpenAIModelSettings)
    assert (model.base_url, model.model) == ("http://127.0.0.1:8000/v1", "qwen2.5-7b")
    assert (model.max_tokens, model.temperature) == (1024, 0.3)
    assert settings.routing.default == "default"


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ({"model": "served-name", "model_path": "/m/qwen"}, "served-name"),
        ({"model_path": "C:\\models\\glm4"}, "glm4"),
        ({}, "default"),
    ],
)
def test_parse_settings_guide_model_name(engine: dict[str, str], expected: str) -> None:
    """The model name is ai_engine.model, else model_path's last part, else "default"."""
    data = {"ai_engine": {"base_url": "http://h/v1", **engine}}
    model = parse_settings(data, environ={}).models["default"]
    assert isinstance(model, OpenAIModelSettings)
    assert model.model == expected


def test_parse_settings_guide_overrides_use_native_names() -> None:
    """Overrides apply to the mapped layout under the native names."""
    env = {"DINGTALK_APP_SECRET": "s", "IMRELAY_MODELS__DEFAULT__BASE_URL": "http://gpu9/v1"}
    model = parse_settings(GUIDE, environ=env).models["default"]
    assert isinstance(model, OpenAIModelSettings)
    assert model.base_url == "http://gpu9/v1"


def test_parse_settings_guide_model_path_only_is_local(tmp_path: pathlib.Path) -> None:
    """An ai_engine with a model directory and no base_url is a local model."""
    write(tmp_path / "qwen" / "config.json", "{}")
    engine = {"model_path": str(tmp_path / "qwen"), "model": "qwen", "max_tokens": 64}
    data = {"endpoints": GUIDE["endpoints"], "ai_engine": engine}
    model = parse_settings(data, environ={"DINGTALK_APP_SECRET": "s"}).models["default"]
    assert isinstance(model, LocalModelSettings)
    assert (model.model_path, model.max_tokens) == (str(tmp_path / "qwen"), 64)


def test_parse_settings_guide_model_path_only_must_exist(tmp_path: pathlib.Path) -> None:
    """A local ai_engine.model_path that is not a directory is reported under the guide's key."""
    data = {"endpoints": GUIDE["endpoints"], "ai_engine": {"model_path": str(tmp_path / "no")}}
    assert error_lines(data, {"DINGTALK_APP_SECRET": "s"}) == [
        "config error: ai_engine.model_path: no such directory; give a model directory in "
        "hugging face layout (with config.json)"
    ]


def test_parse_settings_local_model_needs_config_json(tmp_path: pathlib.Path) -> None:
    """A local model directory without config.json is refused, naming the key, not the path."""
    (tmp_path / "empty").mkdir()
    data = {"models": {"m": {"type": "local", "model_path": str(tmp_path / "empty")}}}
    data["routing"] = {"default": "m"}
    lines = error_lines(data)
    assert lines == [
        "config error: models.m.model_path: the directory has no config.json; give a model "
        "directory in hugging face layout (as save_pretrained writes it)"
    ]
    assert str(tmp_path) not in lines[0]


def test_parse_settings_local_model_defaults(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local model has documented defaults, and ~ in model_path means the home directory."""
    write(tmp_path / "m" / "config.json", "{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    data = {
        "models": {"m": {"type": "local", "model_path": "~/m"}},
        "routing": {"default": "m"},
    }
    model = parse_settings(data, environ={}).models["m"]
    assert isinstance(model, LocalModelSettings)
    assert model.model_path == str(tmp_path / "m")
    assert (model.max_tokens, model.temperature, model.timeout_s) == (512, 0.7, 120.0)
    assert (model.threads, model.system_prompt) == (1, None)


def test_parse_settings_guide_errors_name_guide_keys() -> None:
    """Every problem in a guide-layout file is reported under the guide's own keys."""
    data = {
        "endpoints": {
            "dingtalk": {"app_key": "k", "message_format": "html", "colour": "red"},
            "feishu": {"app_id": "x"},
        },
        "ai_engine": {"base_url": "http://h/v1", "max_tokens": 0},
    }
    assert error_lines(data) == [
        "config error: endpoints.feishu: platform type 'feishu' is not supported yet",
        "config error: endpoints.dingtalk.app_secret: field required",
        "config error: endpoints.dingtalk.message_format: input should be 'text' or 'markdown'",
        "config error: endpoints.dingtalk.colour: extra inputs are not permitted",
        "config error: ai_engine.max_tokens: input should be greater than or equal to 1",
    ]


def test_parse_settings_guide_without_ai_engine_is_error() -> None:
    """Endpoints without an ai_engine ask for the ai_engine."""
    data = {"endpoints": {"dingtalk": {"app_key": "k", "app_secret": "s"}}}
    assert error_lines(data) == ["config error: ai_engine: field required"]


def test_parse_settings_guide_sections_must_be_mappings() -> None:
    """Non-mapping endpoints, endpoint entries and ai_engine are reported."""
    assert error_lines({"endpoints": {"dingtalk": "x"}, "ai_engine": [1]}) == [
        "config error: endpoints.dingtalk: input should be a valid dictionary",
        "config error: ai_engine: input should be a valid dictionary",
    ]


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].pop("app_secret"),
            ["config error: platforms.dingtalk.app_secret: field required"],
            id="missing-field",
        ),
        pytest.param(
            lambda d: d.update(server={"port": "eighty"}),
            [
                "config error: server.port: input should be a valid integer, "
                "unable to parse string as an integer"
            ],
            id="wrong-type",
        ),
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].update(app_sercet="x"),
            ["config error: platforms.dingtalk.app_sercet: extra inputs are not permitted"],
            id="extra-key",
        ),
        pytest.param(
            lambda d: d.update(colour="red"),
            ["config error: colour: extra inputs are not permitted"],
            id="extra-section",
        ),
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].update(mode="foo"),
            ["config error: platforms.dingtalk.mode: input should be 'stream' or 'webhook'"],
            id="bad-literal",
        ),
        pytest.param(
            lambda d: d["models"]["default"].update(temperature=3, timeout_s=0),
            [
                "config error: models.default.temperature: input should be less than or "
                "equal to 2",
                "config error: models.default.timeout_s: input should be greater than 0",
            ],
            id="union-member-constraints",
        ),
        pytest.param(
            lambda d: d["models"]["default"].update(type="gpt"),
            ["config error: models.default.type: input should be 'openai', 'echo' or 'local'"],
            id="unknown-model-type",
        ),
        pytest.param(
            lambda d: d["models"]["default"].pop("type"),
            ["config error: models.default.type: field required"],
            id="missing-model-type",
        ),
        pytest.param(
            lambda d: d.update(routing={"default": "qwen"}),
            ["config error: routing.default: unknown model 'qwen'"],
            id="unknown-route-model",
        ),
        pytest.param(
            lambda d: d.update(routing={"by_kind": {"image": "vision"}}),
            ["config error: routing.by_kind.image: unknown model 'vision'"],
            id="unknown-by-kind-model",
        ),
        pytest.param(
            lambda d: d.update(routing={"by_kind": {"picture": "default"}}),
            [
                "config error: routing.by_kind.picture: invalid key: input should be 'text', "
                "'image', 'audio', 'video', 'file', 'rich' or 'code'"
            ],
            id="bad-dict-key",
        ),
        pytest.param(
            lambda d: d.update(models={}),
            ["config error: models: at least one model is required"],
            id="no-models",
        ),
        pytest.param(
            lambda d: d.update(platforms=[]),
            ["config error: platforms: input should be a valid dictionary"],
            id="section-not-mapping",
        ),
    ],
)
def test_parse_settings_error_lines(change: Any, expected: list[str]) -> None:
    """Each kind of problem renders as ``config error: <key path>: <message>``."""
    data = minimal()
    change(data)
    assert error_lines(data) == expected


def test_parse_settings_error_collects_all_problems() -> None:
    """Problems of several keys, and unset references, are reported together."""
    data = minimal(server={"port": -1, "host": "${HOST}"}, logging={"level": "loud"})
    del data["platforms"]["dingtalk"]["app_key"]
    assert error_lines(data) == [
        "config error: server.host: environment variable HOST is not set",
        "config error: server.port: input should be greater than or equal to 0",
        "config error: platforms.dingtalk.app_key: field required",
        "config error: logging.level: input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
    ]


def test_parse_settings_error_unset_reference_reported_once() -> None:
    """An unset reference is not reported a second time as the value's type error."""
    assert error_lines(minimal(server={"port": "${PORT}"})) == [
        "config error: server.port: environment variable PORT is not set"
    ]


def test_parse_settings_error_problems_are_pairs() -> None:
    """ConfigError.problems holds (key path, message) pairs and .key the first path."""
    with pytest.raises(ConfigError) as info:
        parse_settings(minimal(server={"port": "x"}), environ={})
    assert info.value.key == "server.port"
    assert info.value.problems[0][0] == "server.port"


def test_parse_settings_error_non_mapping_names_source() -> None:
    """Data that is not a mapping is reported under its source name."""
    with pytest.raises(ConfigError) as info:
        parse_settings([1, 2], environ={}, source="conf.yaml")  # type: ignore[arg-type]
    assert format_config_error(info.value) == (
        "config error: conf.yaml: the top level must be a mapping of sections, not a list"
    )


def test_parse_settings_error_quotes_odd_keys() -> None:
    """Keys that are empty, hold a dot or a control character are quoted in key paths."""
    data = minimal()
    data["platforms"]["a.b"] = {"type": "dingtalk", "app_key": "k"}
    data.update({"": 1, "x\ny": 2})
    assert error_lines(data) == [
        'config error: platforms."a.b".app_secret: field required',
        'config error: "": extra inputs are not permitted',
        'config error: "x\\ny": extra inputs are not permitted',
    ]


def test_format_config_error_without_key() -> None:
    """A problem without a key renders without the key part."""
    assert format_config_error(ConfigError("broken")) == "config error: broken"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "a.yaml",
            "server:\n  port: 1\n  host: [x\n",
            "invalid yaml at line 4, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "b.yaml",
            "models: {}\nserver: {}\nmodels: {}\n",
            "invalid yaml at line 3, column 1: duplicate key 'models'",
        ),
        (
            "c.json",
            '{"server": {},\n "models": }',
            "invalid json at line 2, column 12: expecting value",
        ),
        ("d.json", '{"server": {}, "server": {}}', "invalid json: duplicate key 'server'"),
        (
            "e.yaml",
            "",
            "the file is empty; it must hold a mapping of sections (server, platforms, models…)",
        ),
        (
            "f.yaml",
            "- server\n- models\n",
            "the top level must be a mapping of sections, not a list",
        ),
        ("g.json", '"text"', "the top level must be a mapping of sections, not a str"),
        (
            "h.yaml",
            "server: {port: !!int eighty}\n",
            "invalid yaml: a value does not match its tag",
        ),
        (
            "i.yaml",
            "server: {host: !!python/name:os.system }\n",
            "invalid yaml at line 1, column 16: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/name:os.system'",
        ),
    ],
)
def test_load_settings_file_errors(
    tmp_path: pathlib.Path, name: str, text: str, expected: str
) -> None:
    """Unparsable files are reported with the file name and, where known, line and column."""
    file = write(tmp_path / name, text)
    assert file_error_lines(file) == [f"config error: {file}: {expected}"]


def test_load_settings_file_not_utf8(tmp_path: pathlib.Path) -> None:
    """A file that is not UTF-8 text is reported with the byte offset."""
    file = tmp_path / "imrelay.yaml"
    file.write_bytes("server: {host: 主机}".encode("gbk"))
    assert file_error_lines(file) == [
        f"config error: {file}: the file is not utf-8 text (byte 15)"
    ]


def test_load_settings_file_unreadable(tmp_path: pathlib.Path) -> None:
    """A path that cannot be read (here a directory) is reported, not raised as OSError."""
    folder = tmp_path / "imrelay.yaml"
    folder.mkdir()
    assert file_error_lines(folder) == [
        f"config error: {folder}: cannot read the file: is a directory"
    ]


def test_load_settings_file_missing(tmp_path: pathlib.Path) -> None:
    """A missing --config file is reported by path."""
    assert file_error_lines(tmp_path / "gone.yaml") == [
        f"config error: {tmp_path / 'gone.yaml'}: no such file"
    ]


# -- secrets ---------------------------------------------------------------------------------


def secret_texts(err: ConfigError) -> str:
    """Every text an error could show: message, rendering, problems, cause and context."""
    parts = [str(err), repr(err), format_config_error(err), repr(err.problems)]
    for linked in (err.__cause__, err.__context__):
        if linked is not None:
            parts += [str(linked), repr(linked)]
    return "\n".join(parts)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].update(app_secret=[SECRET]),
            id="secret-wrong-type",
        ),
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].update(mode=SECRET), id="secret-in-literal"
        ),
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].update(app_key=SECRET, robot_code=7),
            id="secret-nearby",
        ),
        pytest.param(
            lambda d: d["models"]["default"].update(api_key=SECRET, temperature=SECRET),
            id="secret-as-number",
        ),
        pytest.param(lambda d: d["models"]["default"].update(type=SECRET), id="secret-as-tag"),
        pytest.param(lambda d: d.update(server={"port": SECRET}), id="secret-as-port"),
        pytest.param(lambda d: d.update(unknown={"token": SECRET}), id="secret-in-extra-section"),
        pytest.param(
            lambda d: d["platforms"]["dingtalk"].update(app_secret=SECRET + "${"),
            id="secret-malformed-ref",
        ),
    ],
)
def test_parse_settings_error_never_contains_secret(change: Any) -> None:
    """No error text, nor a chained exception, contains a configured value."""
    data = minimal()
    change(data)
    with pytest.raises(ConfigError) as info:
        parse_settings(data, environ={"IMRELAY_MODELS__DEFAULT__TIMEOUT_S": SECRET})
    assert SECRET not in secret_texts(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_load_settings_syntax_error_never_contains_secret(tmp_path: pathlib.Path) -> None:
    """A YAML syntax error on a line holding a secret does not quote the line."""
    file = write(tmp_path / "imrelay.yaml", f"platforms:\n  d:\n    app_secret: {SECRET}: x\n")
    with pytest.raises(ConfigError) as info:
        load_settings(file, environ={})
    assert SECRET not in secret_texts(info.value)
    assert info.value.__context__ is None
    assert format_config_error(info.value) == (
        f"config error: {file}: invalid yaml at line 3, column 36: mapping values are not "
        "allowed here"
    )


def test_load_settings_bad_tag_never_contains_secret(tmp_path: pathlib.Path) -> None:
    """A tag that cannot convert a secret does not quote it."""
    file = write(tmp_path / "imrelay.yaml", f"x: !!int {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(file, environ={})
    assert SECRET not in secret_texts(info.value)
    assert info.value.__context__ is None


# -- properties ------------------------------------------------------------------------------

KEYS = st.sampled_from(
    [
        "server",
        "storage",
        "platforms",
        "models",
        "routing",
        "pipeline",
        "context",
        "logging",
        "endpoints",
        "ai_engine",
        "dingtalk",
        "default",
        "type",
        "mode",
        "app_key",
        "app_secret",
        "openai",
        "echo",
        "base_url",
        "model",
        "model_path",
        "port",
        "by_kind",
        "image",
        "message_format",
        "stream_url",
        "max_tokens",
        "temperature",
    ]
) | st.text(max_size=6)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.sampled_from(
        ["dingtalk", "openai", "echo", "stream", "markdown", "default", "${X}", "$${"]
    )
    | st.text(max_size=8)
)
JSON_LIKE = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.dictionaries(KEYS, JSON_LIKE, max_size=5),
    env=st.dictionaries(
        st.sampled_from(
            ["X", "IMRELAY_SERVER__PORT", "IMRELAY_MODELS__DEFAULT__TYPE", "IMRELAY___"]
        ),
        st.text(max_size=5),
        max_size=2,
    ),
)
def test_parse_settings_property_parses_or_config_error(
    data: dict[str, Any], env: dict[str, str]
) -> None:
    """Any JSON-like mapping either validates or raises ConfigError, never anything else."""
    result = outcome(lambda: parse_settings(data, environ=env))
    if isinstance(result, ConfigError):
        lines = format_config_error(result).splitlines()
        assert len(lines) == len(result.problems) > 0
        assert all(re.fullmatch(r"config error: .+", line) for line in lines)
    else:
        assert isinstance(result, Settings)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}\"'&*!|>#%@ \n\t,?$0.")), max_size=40))
def test_load_settings_property_any_text_parses_or_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    """Any YAML-ish text either validates or raises ConfigError, never anything else."""
    file = tmp_path_factory.mktemp("prop") / "imrelay.yaml"
    file.write_text(text, encoding="utf-8")
    result = outcome(lambda: load_settings(file, environ={})[0])
    assert isinstance(result, Settings | ConfigError)


def test_parse_settings_dingtalk_webhook_keys_validated() -> None:
    """Bad CIDRs and a malformed EncodingAESKey are named by key; good ones load."""
    bad = minimal()
    bad["platforms"]["dingtalk"].update(allow_cidrs=["10.0.0.0/8", "not-a-net"], aes_key="short")
    with pytest.raises(ConfigError) as info:
        parse_settings(bad, environ={})
    text = format_config_error(info.value)
    assert "platforms.dingtalk.allow_cidrs: not an IP network: 'not-a-net'" in text
    assert "platforms.dingtalk.aes_key:" in text
    assert "short" not in text  # the (bad) secret is not echoed
    good = minimal()
    good["platforms"]["dingtalk"].update(
        allow_cidrs=["10.0.0.0/8", "::1/128"],
        aes_key="1234567890123456789012345678901234567890123",
        reply={"stream": "card", "max_chars": 1000},
    )
    settings = parse_settings(good, environ={})
    dt = settings.platforms["dingtalk"]
    assert dt.reply.stream == "card"
    assert dt.reply.max_chars == 1000
    assert dt.rate_limit.per_conversation_per_minute == 20
