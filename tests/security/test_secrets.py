"""The encrypted secrets store: keys, set/rotate/grace, file safety, config references, ages."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from imrelay.errors import ConfigError
from imrelay.security.secrets import (
    DEFAULT_KEY_ENV,
    SecretAgeCollector,
    SecretEntry,
    SecretsSettings,
    SecretStore,
    find_secret_refs,
    generate_key,
    has_secret_refs,
    load_key,
    resolve_secret_refs,
    secret_ages,
    stale_secrets,
    write_key_file,
)

DAY = 86400.0
VALUE = "s3cr3t-app-secret-value"


class Clock:
    """An epoch clock moved by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> bytes:
    return generate_key()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, key: bytes, clock: Clock) -> SecretStore:
    return SecretStore(tmp_path / "secrets.enc", key, clock=clock)


# -- keys ------------------------------------------------------------------------------------


def test_secrets_key_from_env_or_private_file(tmp_path: Path, key: bytes) -> None:
    """A key comes from the environment variable or from a 0600 key file."""
    assert load_key(environ={DEFAULT_KEY_ENV: key.decode() + "\n"}) == key
    assert load_key(environ={"OTHER": key.decode()}, key_env="OTHER") == key
    file = tmp_path / "key"
    write_key_file(file, key)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert load_key(environ={}, key_file=file) == key


def test_secrets_key_file_with_wide_permissions_is_refused(tmp_path: Path, key: bytes) -> None:
    """A key file readable by the group or others is refused, naming the mode."""
    file = tmp_path / "key"
    write_key_file(file, key)
    file.chmod(0o640)
    with pytest.raises(ConfigError, match=r"mode 0640\); run chmod 600"):
        load_key(environ={}, key_file=file)
    file.chmod(0o400)
    assert load_key(environ={}, key_file=file) == key


def test_secrets_key_problems_are_clear(tmp_path: Path, key: bytes) -> None:
    """No key, a missing key file, an unreadable one or a malformed key each say so."""
    with pytest.raises(ConfigError, match=r"no secrets key: set \$IMRELAY_SECRETS_KEY"):
        load_key(environ={})
    with pytest.raises(ConfigError, match="cannot read the key file"):
        load_key(environ={}, key_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a valid fernet key"):
        load_key(environ={DEFAULT_KEY_ENV: "short"})
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="cannot read the key file"):
        load_key(environ={}, key_file=directory)
    with pytest.raises(ConfigError, match="not a valid fernet key"):
        SecretStore(tmp_path / "s.enc", b"not a key")


def test_secrets_write_key_file_refuses_to_overwrite(tmp_path: Path, key: bytes) -> None:
    """keygen never replaces an existing key file, and reports an uncreatable one."""
    file = tmp_path / "key"
    write_key_file(file, key)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_key_file(file, generate_key())
    assert load_key(environ={}, key_file=file) == key
    with pytest.raises(ConfigError, match="cannot create the key file"):
        write_key_file(tmp_path / "missing" / "key", key)


# -- the store -------------------------------------------------------------------------------


def test_secrets_set_get_persist_encrypted_and_private(
    store: SecretStore, tmp_path: Path, key: bytes
) -> None:
    """A set secret reads back, survives reopening, and the file is 0600 ciphertext."""
    store.set("dingtalk_secret", VALUE)
    assert store.get("dingtalk_secret") == VALUE
    raw = store.path.read_bytes()
    assert VALUE.encode() not in raw
    assert b"dingtalk_secret" not in raw  # names are encrypted too
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    again = SecretStore(store.path, key)
    assert again.get("dingtalk_secret") == VALUE
    assert again.names() == ["dingtalk_secret"]
    assert VALUE not in repr(again)
    assert VALUE not in repr(again.entry("dingtalk_secret"))
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    stale = tmp_path / f".secrets.enc.{os.getpid()}.tmp"
    stale.write_text("left by a crash")
    again.set("other", "value-2")
    assert not stale.exists()
    assert SecretStore(store.path, key).names() == ["dingtalk_secret", "other"]


def test_secrets_wrong_key_is_a_clear_error(store: SecretStore) -> None:
    """Opening the file with another key fails with a message naming the cause, not a value."""
    store.set("api", VALUE)
    with pytest.raises(ConfigError, match="wrong key, or damaged") as info:
        SecretStore(store.path, generate_key())
    assert VALUE not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_secrets_unknown_layout_is_refused(tmp_path: Path, key: bytes) -> None:
    """A file that decrypts but is not a secrets document is refused."""
    from cryptography.fernet import Fernet

    file = tmp_path / "s.enc"
    file.write_bytes(Fernet(key).encrypt(b'{"version": 1}'))
    with pytest.raises(ConfigError, match="unknown layout") as info:
        SecretStore(file, key)
    assert info.value.__context__ is None
    file.write_bytes(Fernet(key).encrypt(b"not json " + VALUE.encode()))
    with pytest.raises(ConfigError, match="unknown layout") as info:
        SecretStore(file, key)
    assert info.value.__context__ is None


def test_secrets_get_missing_and_bad_names(store: SecretStore) -> None:
    """Unknown names, malformed names and empty values are refused."""
    with pytest.raises(ConfigError, match="secret 'nope' is not set"):
        store.get("nope")
    for name in ("", "-x", "a b", "x" * 65, "a/b"):
        with pytest.raises(ConfigError, match="a secret name is"):
            store.set(name, VALUE)
    with pytest.raises(ConfigError, match="cannot be empty"):
        store.set("x", "")
    with pytest.raises(ConfigError, match="cannot be empty"):
        store.rotate("x", "", grace_s=1)
    assert store.names() == []


def test_secrets_rotate_keeps_previous_valid_for_grace(store: SecretStore, clock: Clock) -> None:
    """After a rotation both values are candidates until the grace period ends."""
    store.set("app", "old-value-1234")
    clock.now += 10 * DAY
    store.rotate("app", "new-value-5678", grace_s=3600)
    assert store.get("app") == "new-value-5678"
    assert store.candidates("app") == ["new-value-5678", "old-value-1234"]
    entry = store.entry("app")
    assert entry is not None
    assert entry.set_at == clock.now
    clock.now += 3599
    assert store.candidates("app") == ["new-value-5678", "old-value-1234"]
    clock.now += 1
    assert store.candidates("app") == ["new-value-5678"]
    assert sorted(store.values()) == ["new-value-5678", "old-value-1234"]


def test_secrets_rotate_errors(store: SecretStore) -> None:
    """Rotating an unknown secret, or to the same value, is refused."""
    with pytest.raises(ConfigError, match="is not set; use imrelay secrets set"):
        store.rotate("app", VALUE, grace_s=1)
    store.set("app", VALUE)
    with pytest.raises(ConfigError, match="same as the current one"):
        store.rotate("app", VALUE, grace_s=1)


def test_secrets_set_replaces_at_once(store: SecretStore) -> None:
    """``set`` on an existing name replaces the value without a grace period."""
    store.set("app", "first-value")
    store.rotate("app", "second-value", grace_s=3600)
    store.set("app", "third-value")
    assert store.candidates("app") == ["third-value"]


def test_secrets_running_reader_sees_rotation(store: SecretStore, key: bytes) -> None:
    """A second store object (a running gateway) picks up a rotation on its next read."""
    store.set("app", "old-value-1234")
    gateway = SecretStore(store.path, key, clock=store._clock)
    assert gateway.candidates("app") == ["old-value-1234"]
    store.rotate("app", "new-value-5678", grace_s=60)
    assert gateway.candidates("app", refresh=False) == ["old-value-1234"]
    assert gateway.candidates("app") == ["new-value-5678", "old-value-1234"]
    assert not gateway.refresh()


def test_secrets_concurrent_writers_do_not_lose_updates(
    store: SecretStore, key: bytes, tmp_path: Path
) -> None:
    """Two store objects writing in turn both keep each other's secrets (re-read under lock)."""
    other = SecretStore(store.path, key)
    store.set("a", "value-a")
    other.set("b", "value-b")
    store.set("c", "value-c")
    assert SecretStore(store.path, key).names() == ["a", "b", "c"]
    assert (tmp_path / "secrets.enc.lock").exists()


def test_secrets_delete_and_file_removed(store: SecretStore, key: bytes) -> None:
    """Deleting removes a name; a store whose file disappears becomes empty on refresh."""
    store.set("a", "value-a")
    store.set("b", "value-b")
    store.delete("a")
    assert store.names() == ["b"]
    with pytest.raises(ConfigError, match="'a' is not set"):
        store.delete("a")
    store.path.unlink()
    assert store.refresh()
    assert store.names() == []


def test_secrets_unreadable_file_is_reported(tmp_path: Path, key: bytes) -> None:
    """A path that cannot be read (a directory) is a ConfigError, not a traceback."""
    directory = tmp_path / "dir.enc"
    directory.mkdir()
    with pytest.raises(ConfigError, match="cannot read the secrets file"):
        SecretStore(directory, key)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ConfigError, match="cannot read the secrets file"):
        SecretStore(blocked / "s.enc", key)


def test_secrets_from_settings(tmp_path: Path, key: bytes) -> None:
    """The store described by settings opens with the key named there."""
    path = tmp_path / "x.enc"
    settings = SecretsSettings(path=str(path), key_env="MY_KEY")
    store = SecretStore.from_settings(settings, environ={"MY_KEY": key.decode()})
    store.set("n", "value-n")
    assert store.path == path
    assert SecretsSettings().max_age_days == 90
    with pytest.raises(ValidationError):
        SecretsSettings(max_age_days=0)


# -- references ------------------------------------------------------------------------------


def test_secrets_resolve_refs_replaces_whole_values(store: SecretStore) -> None:
    """``secret:NAME`` values are replaced everywhere; other strings are untouched."""
    store.set("dt", VALUE)
    store.set("llm.key", "sk-123456")
    data = {
        "platforms": {"dingtalk": {"app_secret": "secret:dt", "app_key": "k"}},
        "models": {"m": {"api_key": "secret:llm.key", "endpoints": ["secret:dt", 3]}},
        "note": "a secret:dt inside text",
        "n": 1,
    }
    assert has_secret_refs(data)
    assert find_secret_refs(data) == {
        ("platforms", "dingtalk", "app_secret"): "dt",
        ("models", "m", "api_key"): "llm.key",
        ("models", "m", "endpoints", 0): "dt",
    }
    assert not has_secret_refs({"a": ["secret: no", "x"], "b": 1})
    out = resolve_secret_refs(data, store)
    assert out["platforms"]["dingtalk"] == {"app_secret": VALUE, "app_key": "k"}
    assert out["models"]["m"] == {"api_key": "sk-123456", "endpoints": [VALUE, 3]}
    assert out["note"] == "a secret:dt inside text"
    assert data["platforms"]["dingtalk"]["app_secret"] == "secret:dt"  # input unchanged


def test_secrets_resolve_refs_reports_every_missing_name(store: SecretStore) -> None:
    """Each reference to a missing secret is a problem at its key path, naming only the name."""
    store.set("dt", VALUE)
    data = {"a": {"b": "secret:missing"}, "c": ["x", "secret:gone"], "d": "secret:dt"}
    with pytest.raises(ConfigError) as info:
        resolve_secret_refs(data, store)
    assert info.value.problems == [
        ("a.b", "secret 'missing' is not set"),
        ("c.1", "secret 'gone' is not set"),
    ]
    assert VALUE not in str(info.value)


# -- ages ------------------------------------------------------------------------------------


def test_secrets_ages_and_stale_warnings(store: SecretStore, clock: Clock) -> None:
    """Ages count from the last set/rotate; secrets past the period get a warning each."""
    store.set("old", "value-old")
    clock.now += 100 * DAY
    store.set("new", "value-new")
    clock.now += DAY
    ages = secret_ages(store, now=clock.now)
    assert ages == {"new": DAY, "old": 101 * DAY}
    warnings = stale_secrets(store, max_age_days=90, now=clock.now)
    assert len(warnings) == 1
    assert warnings[0].startswith("secret 'old' is 101 days old (rotation period 90 days)")
    assert "imrelay secrets rotate old" in warnings[0]
    assert "value-old" not in warnings[0]
    store.rotate("old", "value-old-2", grace_s=0)
    assert stale_secrets(store, max_age_days=90, now=clock.now) == []
    assert set(secret_ages(store)) == {"new", "old"}


def test_secrets_age_gauge_on_a_registry(store: SecretStore, clock: Clock, key: bytes) -> None:
    """The collector exports one age sample per name, and keeps going on a read error."""
    store.set("dt", VALUE)
    registry = CollectorRegistry()
    collector = SecretAgeCollector(store, clock=clock)
    registry.register(collector)
    clock.now += 5.0
    assert registry.get_sample_value("imrelay_secret_age_seconds", {"name": "dt"}) == 5.0
    store.path.write_bytes(b"garbage")  # unreadable now: the last ages stay
    os.utime(store.path, ns=(1, 1))
    assert registry.get_sample_value("imrelay_secret_age_seconds", {"name": "dt"}) == 5.0
    from prometheus_client import generate_latest

    assert VALUE.encode() not in generate_latest(registry)


def test_secrets_entry_repr_hides_values() -> None:
    """An entry's repr says when, never what."""
    entry = SecretEntry("value-1", 1.0, "value-0", 2.0)
    assert "value" not in repr(entry).replace("previous=", "")
