"""Secrets at rest: app secrets and API keys in one Fernet-encrypted file.

Theory of operation: the store is a single file holding one Fernet token (AES-128-CBC +
HMAC-SHA256); the plaintext is JSON::

    {"version": 1, "secrets": {NAME: {"value": …, "set_at": epoch,
                                      "previous": {"value": …, "valid_until": epoch} | null}}}

The key is 32 url-safe base64 bytes (``imrelay secrets keygen``) from ``$IMRELAY_SECRETS_KEY``
or a key file that only its owner may read (mode 0600 or stricter; a wider one is refused).
Every write re-reads the file under an exclusive ``flock`` on ``<file>.lock``, writes a new
file (mode 0600), fsyncs it and renames it over the old one, so concurrent ``imrelay secrets``
commands and a running gateway never see half a file.

Configuration refers to a secret as ``secret:NAME`` (a whole string value):
:func:`resolve_secret_refs` replaces each reference before the configuration is validated.

Rotation: :meth:`SecretStore.rotate` makes a new value current and keeps the old one valid for
a grace period. What a running gateway does with that:

- it keeps the values it resolved at start-up: nothing changes under it mid-request;
- where imrelay *verifies* a secret (inbound webhook signatures, computed with the app
  secret), it accepts any of :meth:`SecretStore.candidates` (current first, then the previous
  value until its grace ends), re-reading the file when it changed;
- where imrelay *presents* a secret (DingTalk token requests), the platform decides which value
  is valid; DingTalk switches at once when the app secret is reset in its console. On an auth
  failure the gateway re-reads the store and tries the current value, so the order is: reset
  the secret in the console, then ``imrelay secrets rotate NAME`` promptly.

Ages: each value records when it was set; :func:`stale_secrets` and the
``imrelay_secret_age_seconds{name}`` gauge (:class:`SecretAgeCollector`) flag secrets older
than the rotation period (``security.secrets.max_age_days``, default 90).

Secret values never appear in an exception message, ``repr`` or log line here; only names do.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.fernet import Fernet, InvalidToken
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field

from imrelay.errors import ConfigError

__all__ = [
    "DEFAULT_KEY_ENV",
    "DEFAULT_SECRETS_FILE",
    "SECRET_REF",
    "SecretAgeCollector",
    "SecretEntry",
    "SecretStore",
    "SecretsSettings",
    "find_secret_refs",
    "generate_key",
    "has_secret_refs",
    "load_key",
    "resolve_secret_refs",
    "secret_ages",
    "stale_secrets",
    "write_key_file",
]

DEFAULT_KEY_ENV: Final = "IMRELAY_SECRETS_KEY"
DEFAULT_SECRETS_FILE: Final = "./imrelay-secrets.enc"
SECRET_REF: Final = re.compile(r"secret:([A-Za-z0-9][A-Za-z0-9_.-]{0,63})")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_PROBLEM: Final = "the secrets key is not a valid fernet key (use `imrelay secrets keygen`)"
_DAY: Final = 86400.0


class SecretsSettings(BaseModel):
    """``security.secrets``: where the encrypted store is and how old a secret may get.

    Attributes:
        path: the encrypted file.
        key_env: the environment variable holding the key.
        key_file: a file holding the key instead (mode 0600 or stricter).
        max_age_days: the rotation period; older secrets are flagged by ``imrelay check``
            and the ``imrelay_secret_age_seconds`` gauge.
        grace_s: how long a rotated-out value stays valid by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = DEFAULT_SECRETS_FILE
    key_env: str = Field(DEFAULT_KEY_ENV, min_length=1)
    key_file: str | None = None
    max_age_days: float = Field(90.0, gt=0)
    grace_s: float = Field(86400.0, ge=0)


@dataclass(frozen=True, slots=True)
class SecretEntry:
    """One stored secret. ``repr`` leaves the values out."""

    value: str
    set_at: float
    previous: str | None = None
    previous_valid_until: float | None = None

    def __repr__(self) -> str:
        return f"SecretEntry(set_at={self.set_at!r}, previous={self.previous is not None})"


# -- keys ------------------------------------------------------------------------------------


def generate_key() -> bytes:
    """A new random Fernet key."""
    return Fernet.generate_key()


def write_key_file(path: str | os.PathLike[str], key: bytes) -> None:
    """Write ``key`` to a new file of mode 0600.

    Raises:
        ConfigError: the file exists or cannot be created.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{os.fspath(path)} exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot create the key file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(key + b"\n")


def load_key(
    *,
    environ: Mapping[str, str],
    key_file: str | os.PathLike[str] | None = None,
    key_env: str = DEFAULT_KEY_ENV,
) -> bytes:
    """Read the store key from ``key_file`` or, without one, from ``environ[key_env]``.

    Raises:
        ConfigError: no key, a key file readable by others or unreadable, or a malformed key.
    """
    if key_file is not None:
        file = Path(key_file)
        try:
            mode = file.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {file}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"the key file {file} is accessible to other users (mode "
                f"{stat.S_IMODE(mode):04o}); run chmod 600 on it"
            )
        try:
            key = file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {file}: {exc.strerror or exc}") from None
    else:
        text = environ.get(key_env, "").strip()
        if not text:
            raise ConfigError(f"no secrets key: set ${key_env} or give a key file")
        key = text.encode()
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise ConfigError(_KEY_PROBLEM) from None
    return key


# -- the store -------------------------------------------------------------------------------


def _decode(plain: bytes) -> dict[str, SecretEntry] | None:
    """The entries of a decrypted document, or None if its layout is unknown."""
    try:
        data = json.loads(plain)
        out: dict[str, SecretEntry] = {}
        for name, item in data["secrets"].items():
            previous = item.get("previous")
            out[str(name)] = SecretEntry(
                value=str(item["value"]),
                set_at=float(item["set_at"]),
                previous=None if previous is None else str(previous["value"]),
                previous_valid_until=None if previous is None else float(previous["valid_until"]),
            )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return out


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            "a secret name is 1-64 letters, digits, '_', '.' or '-', starting with a letter "
            "or digit"
        )


class SecretStore:
    """The encrypted secrets file (see the module docstring).

    Args:
        path: the file; it need not exist until the first write.
        key: the Fernet key (:func:`load_key`).
        clock: epoch seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: bytes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError):
            raise ConfigError(_KEY_PROBLEM) from None
        self._clock = clock
        self._entries: dict[str, SecretEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.refresh()

    def __repr__(self) -> str:
        return f"SecretStore({str(self.path)!r}, {len(self._entries)} secret(s))"

    @classmethod
    def from_settings(
        cls,
        settings: SecretsSettings,
        *,
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.time,
    ) -> SecretStore:
        """Open the store ``security.secrets`` describes."""
        key = load_key(environ=environ, key_file=settings.key_file, key_env=settings.key_env)
        return cls(settings.path, key, clock=clock)

    # -- reading -----------------------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read the secrets file: {exc.strerror or exc}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was last read; return whether it did.

        Raises:
            ConfigError: the file cannot be read or decrypted (wrong key, damaged file).
        """
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._entries = {} if stamp is None else self._read()
        self._stamp = stamp
        return True

    def _read(self) -> dict[str, SecretEntry]:
        # Each ConfigError is raised outside the except block that found the problem, so it has
        # no __context__: a JSON error holds the decrypted document, secrets included.
        problem = ""
        entries: dict[str, SecretEntry] | None = None
        try:
            token = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            token, problem = b"", f"cannot read the secrets file: {exc.strerror or exc}"
        if not problem:
            try:
                entries = _decode(self._fernet.decrypt(token.strip()))
            except InvalidToken:
                problem = f"cannot decrypt the secrets file {self.path}: wrong key, or damaged"
        if entries is None:
            raise ConfigError(problem or f"the secrets file {self.path} has an unknown layout")
        return entries

    def names(self) -> list[str]:
        """The stored names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, SecretEntry]]:
        """Every stored secret, sorted by name."""
        return sorted(self._entries.items())

    def entry(self, name: str) -> SecretEntry | None:
        """A stored secret, or None."""
        return self._entries.get(name)

    def get(self, name: str) -> str:
        """The current value of ``name``.

        Raises:
            ConfigError: no such secret.
        """
        entry = self._entries.get(name)
        if entry is None:
            raise ConfigError(f"secret {name!r} is not set (imrelay secrets set {name})")
        return entry.value

    def candidates(self, name: str, *, refresh: bool = True) -> list[str]:
        """Every value that counts as valid now: current first, then the previous one during
        its grace period. Re-reads the file first if it changed (unless ``refresh`` is false).

        Raises:
            ConfigError: no such secret, or the file cannot be read.
        """
        if refresh:
            self.refresh()
        current = self.get(name)
        entry = self._entries[name]
        values = [current]
        if (
            entry.previous is not None
            and entry.previous_valid_until is not None
            and self._clock() < entry.previous_valid_until
            and entry.previous != current
        ):
            values.append(entry.previous)
        return values

    def values(self) -> list[str]:
        """Every stored value, current and previous (for log masking only)."""
        out = [e.value for e in self._entries.values()]
        out += [e.previous for e in self._entries.values() if e.previous is not None]
        return out

    # -- writing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._entries = self._read()  # what another process wrote meanwhile
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self) -> None:
        data: dict[str, Any] = {
            "version": 1,
            "secrets": {
                name: {
                    "value": e.value,
                    "set_at": e.set_at,
                    "previous": (
                        None
                        if e.previous is None
                        else {"value": e.previous, "valid_until": e.previous_valid_until}
                    ),
                }
                for name, e in sorted(self._entries.items())
            },
        }
        token = self._fernet.encrypt(json.dumps(data, ensure_ascii=False).encode())
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):  # left by a crash; we hold the lock
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, token + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._stamp = self._file_stamp()

    def set(self, name: str, value: str) -> None:
        """Store ``value`` as ``name`` (replacing any value at once, with no grace period).

        Raises:
            ConfigError: a bad name, an empty value, or the file cannot be written.
        """
        _check_name(name)
        if not value:
            raise ConfigError("a secret cannot be empty")
        with self._locked():
            self._entries[name] = SecretEntry(value, self._clock())
            self._write()

    def rotate(self, name: str, value: str, *, grace_s: float) -> None:
        """Make ``value`` current and keep the old value valid for ``grace_s`` seconds.

        Raises:
            ConfigError: no such secret, an empty value, or a write failure.
        """
        _check_name(name)
        if not value:
            raise ConfigError("a secret cannot be empty")
        with self._locked():
            old = self._entries.get(name)
            if old is None:
                raise ConfigError(f"secret {name!r} is not set; use imrelay secrets set")
            if old.value == value:
                raise ConfigError(f"the new value of {name!r} is the same as the current one")
            now = self._clock()
            self._entries[name] = SecretEntry(value, now, old.value, now + max(grace_s, 0.0))
            self._write()

    def delete(self, name: str) -> None:
        """Remove ``name``.

        Raises:
            ConfigError: no such secret.
        """
        with self._locked():
            if self._entries.pop(name, None) is None:
                raise ConfigError(f"secret {name!r} is not set")
            self._write()


# -- configuration references and ages --------------------------------------------------------


def _walk_refs(node: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(node, str):
        match = SECRET_REF.fullmatch(node)
        if match:
            yield path, match.group(1)
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk_refs(v, (*path, k))
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from _walk_refs(v, (*path, i))


def has_secret_refs(data: Any) -> bool:
    """Whether ``data`` (parsed configuration) holds any ``secret:NAME`` value."""
    return next(_walk_refs(data, ()), None) is not None


def find_secret_refs(data: Any) -> dict[tuple[Any, ...], str]:
    """Key path → secret name of every ``secret:NAME`` value in ``data``.

    The gateway keeps this to know which setting came from which secret, e.g. to verify an
    inbound signature against :meth:`SecretStore.candidates` during a rotation's grace period.
    """
    return dict(_walk_refs(data, ()))


def resolve_secret_refs(data: Mapping[str, Any], store: SecretStore) -> dict[str, Any]:
    """A copy of ``data`` with every ``secret:NAME`` string replaced by the secret's value.

    A reference is a whole string value; ``secret:`` inside a longer string is left alone.

    Raises:
        ConfigError: one ``(key path, message)`` per reference to a missing secret; messages
            name the secret, never a value.
    """
    problems: list[tuple[str, str]] = []

    def copy(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, str):
            match = SECRET_REF.fullmatch(node)
            if match is None:
                return node
            entry = store.entry(match.group(1))
            if entry is None:
                where = ".".join(str(p) for p in path)
                problems.append((where, f"secret {match.group(1)!r} is not set"))
                return ""
            return entry.value
        if isinstance(node, Mapping):
            return {k: copy(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [copy(v, (*path, i)) for i, v in enumerate(node)]
        return node

    out = copy(data, ())
    if problems:
        raise ConfigError(problems)
    return dict(out)


def secret_ages(store: SecretStore, *, now: float | None = None) -> dict[str, float]:
    """Seconds since each secret's current value was set."""
    at = time.time() if now is None else now
    return {name: max(at - entry.set_at, 0.0) for name, entry in store.items()}


def stale_secrets(
    store: SecretStore, *, max_age_days: float, now: float | None = None
) -> list[str]:
    """Warnings for secrets older than the rotation period (one sentence each, names only)."""
    return [
        f"secret {name!r} is {age / _DAY:.0f} days old (rotation period {max_age_days:g} days);"
        f" rotate it with: imrelay secrets rotate {name}"
        for name, age in secret_ages(store, now=now).items()
        if age > max_age_days * _DAY
    ]


class SecretAgeCollector(Collector):
    """``imrelay_secret_age_seconds{name}`` for a Prometheus registry.

    Register it with ``registry.register(SecretAgeCollector(store))``; each scrape re-reads the
    store if its file changed.
    """

    def __init__(self, store: SecretStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauge with one sample per stored secret."""
        gauge = GaugeMetricFamily(
            "imrelay_secret_age_seconds",
            "Seconds since each stored secret was last set or rotated.",
            labels=["name"],
        )
        # on a read error keep exporting the last known ages; `imrelay check` says why
        with contextlib.suppress(ConfigError):
            self.store.refresh()
        for name, age in secret_ages(self.store, now=self.clock()).items():
            gauge.add_metric([name], age)
        yield gauge
