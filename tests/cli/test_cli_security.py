"""``imrelay secrets`` and ``imrelay audit``: as a user runs them, and their error paths."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imrelay.cli import secrets as secrets_cli
from imrelay.cli.audit import audit_app
from imrelay.cli.secrets import parse_duration, secrets_app
from imrelay.config import parse_settings
from imrelay.security.audit import AuditLog
from imrelay.security.secrets import SecretStore, generate_key, resolve_secret_refs

VALUE = "dt-app-secret-7f3a9c1e"
NEW_VALUE = "dt-app-secret-rotated-42"
# The sub-apps run in a subprocess exactly as a user runs them.
SECRETS = [sys.executable, "-m", "imrelay", "secrets"]
AUDIT = [sys.executable, "-m", "imrelay", "audit"]


def run(
    command: list[str], *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a CLI to completion with a bounded time; return its result."""
    return subprocess.run(
        [*command, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )


@pytest.fixture
def key() -> str:
    return generate_key().decode()


@pytest.fixture
def env(tmp_path: Path, key: str) -> dict[str, str]:
    return {"IMRELAY_SECRETS_KEY": key, "IMRELAY_SECRETS_FILE": str(tmp_path / "s.enc")}


# -- secrets: subprocess flows ---------------------------------------------------------------


def test_cli_secrets_set_get_rotate_list_never_print_values(
    tmp_path: Path, env: dict[str, str], key: str
) -> None:
    """set/rotate/list in a subprocess never print the value; only get --reveal does."""
    file = tmp_path / "s.enc"
    done = run(SECRETS, "set", "dingtalk_secret", env=env, stdin=VALUE + "\n")
    assert done.returncode == 0, done.stderr
    assert VALUE not in done.stdout + done.stderr
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert VALUE.encode() not in file.read_bytes()

    listed = run(SECRETS, "list", env=env)
    assert listed.returncode == 0
    assert listed.stdout.startswith("dingtalk_secret\t0.0 days\tset ")
    assert VALUE not in listed.stdout + listed.stderr

    refused = run(SECRETS, "get", "dingtalk_secret", env=env)
    assert refused.returncode == 2
    assert "refusing to print a secret without --reveal" in refused.stderr
    assert VALUE not in refused.stdout + refused.stderr

    shown = run(SECRETS, "get", "dingtalk_secret", "--reveal", env=env)
    assert (shown.returncode, shown.stdout) == (0, VALUE + "\n")

    rotated = run(SECRETS, "rotate", "dingtalk_secret", "--grace", "2h", env=env, stdin=NEW_VALUE)
    assert rotated.returncode == 0, rotated.stderr
    assert NEW_VALUE not in rotated.stdout + rotated.stderr
    assert VALUE not in rotated.stdout + rotated.stderr
    store = SecretStore(file, key.encode())
    assert store.candidates("dingtalk_secret") == [NEW_VALUE, VALUE]
    listed = run(SECRETS, "list", env=env)
    assert "previous value valid for 2.0 h" in listed.stdout
    assert VALUE not in listed.stdout
    assert NEW_VALUE not in listed.stdout


def test_cli_secrets_wrong_key_is_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    """A wrong key fails with exit 1 and a message naming the cause, no value, no traceback."""
    assert run(SECRETS, "set", "x", env=env, stdin=VALUE).returncode == 0
    wrong = {**env, "IMRELAY_SECRETS_KEY": generate_key().decode()}
    done = run(SECRETS, "get", "x", "--reveal", env=wrong)
    assert done.returncode == 1
    assert "error: cannot decrypt the secrets file" in done.stderr
    assert "wrong key" in done.stderr
    assert "Traceback" not in done.stderr
    assert VALUE not in done.stdout + done.stderr


def test_cli_secrets_keygen_key_file_and_permissions(tmp_path: Path) -> None:
    """keygen writes a 0600 key file the other commands accept; a wider file is refused."""
    key_file = tmp_path / "secrets.key"
    env = {"IMRELAY_SECRETS_FILE": str(tmp_path / "s.enc"), "IMRELAY_SECRETS_KEY": ""}
    made = run(SECRETS, "keygen", "--key-file", str(key_file), env=env)
    assert made.returncode == 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_text().strip() not in made.stdout + made.stderr
    done = run(SECRETS, "set", "n", "--key-file", str(key_file), env=env, stdin=VALUE)
    assert done.returncode == 0, done.stderr
    key_file.chmod(0o644)
    refused = run(SECRETS, "list", "--key-file", str(key_file), env=env)
    assert refused.returncode == 1
    assert "accessible to other users (mode 0644)" in refused.stderr
    printed = run(SECRETS, "keygen", env=env)
    assert printed.returncode == 0
    assert len(printed.stdout.strip()) == 44


def test_cli_secret_set_by_cli_is_used_by_config(tmp_path: Path, env: dict[str, str]) -> None:
    """A secret set with the CLI resolves ``secret:NAME`` into validated settings."""
    assert run(SECRETS, "set", "dt", env=env, stdin=VALUE).returncode == 0
    store = SecretStore(env["IMRELAY_SECRETS_FILE"], env["IMRELAY_SECRETS_KEY"].encode())
    data: dict[str, Any] = {
        "platforms": {"dingtalk": {"type": "dingtalk", "app_key": "k", "app_secret": "secret:dt"}},
        "models": {"default": {"type": "echo"}},
    }
    settings = parse_settings(resolve_secret_refs(data, store), environ={})
    assert settings.platforms["dingtalk"].app_secret.get_secret_value() == VALUE
    assert VALUE not in repr(settings)


# -- secrets: error paths in process ---------------------------------------------------------


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def test_cli_secrets_usage_errors(cli: CliRunner, env: dict[str, str]) -> None:
    """No key, bad grace, empty value, unknown names and bad names each fail cleanly."""
    no_key = {**env, "IMRELAY_SECRETS_KEY": ""}
    result = cli.invoke(secrets_app, ["list"], env=no_key)
    assert result.exit_code == 1
    assert "no secrets key: set $IMRELAY_SECRETS_KEY" in result.output
    result = cli.invoke(secrets_app, ["rotate", "x", "--grace", "soon"], env=env)
    assert result.exit_code == 2
    assert "--grace: expected a number" in result.output
    result = cli.invoke(secrets_app, ["rotate", "x"], env=env, input=VALUE)
    assert result.exit_code == 1
    assert "'x' is not set" in result.output
    result = cli.invoke(secrets_app, ["set", "x", "--value-stdin"], env=env, input="")
    assert result.exit_code == 2
    assert "cannot be empty" in result.output
    result = cli.invoke(secrets_app, ["set", "bad name"], env=env, input=VALUE)
    assert result.exit_code == 1
    assert "a secret name is" in result.output
    assert VALUE not in result.output
    result = cli.invoke(secrets_app, ["get", "missing", "--reveal"], env=env)
    assert result.exit_code == 1
    assert "'missing' is not set" in result.output
    result = cli.invoke(secrets_app, ["delete", "missing"], env=env)
    assert result.exit_code == 1


def test_cli_secrets_delete_stale_list_and_crlf(cli: CliRunner, env: dict[str, str]) -> None:
    """A CRLF-terminated value is trimmed; stale secrets are flagged; delete removes."""
    assert cli.invoke(secrets_app, ["set", "a"], env=env, input=VALUE + "\r\n").exit_code == 0
    shown = cli.invoke(secrets_app, ["get", "a", "--reveal"], env=env)
    assert shown.output == VALUE + "\n"
    listed = cli.invoke(secrets_app, ["list", "--max-age-days", "0"], env=env)
    assert "STALE: rotate it" in listed.output
    deleted = cli.invoke(secrets_app, ["delete", "a"], env=env)
    assert deleted.exit_code == 0
    assert cli.invoke(secrets_app, ["list"], env=env).output == ""


def test_cli_secrets_keygen_refuses_existing_file(cli: CliRunner, tmp_path: Path) -> None:
    """keygen never overwrites a key file."""
    key_file = tmp_path / "k"
    key_file.write_text("old")
    result = cli.invoke(secrets_app, ["keygen", "--key-file", str(key_file)])
    assert result.exit_code == 1
    assert "refusing to overwrite" in result.output
    assert key_file.read_text() == "old"


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cli_secrets_prompt_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the value is prompted twice without echo; a mismatch is refused."""
    monkeypatch.setattr(sys, "stdin", _TTY())
    answers = iter([VALUE, VALUE, VALUE, "typo"])
    prompts: list[str] = []

    def prompt(text: str) -> str:
        prompts.append(text)
        return next(answers)

    assert secrets_cli._read_value(False, prompt) == VALUE
    assert prompts == ["value (hidden): ", "again: "]
    with pytest.raises(secrets_cli.typer.Exit) as info:
        secrets_cli._read_value(False, prompt)
    assert info.value.exit_code == 2


def test_cli_secrets_parse_duration() -> None:
    """Durations are seconds or a number with s, m, h or d."""
    assert [parse_duration(t) for t in ("90", "90s", "1.5m", "12h", "7D")] == [
        90.0,
        90.0,
        90.0,
        43200.0,
        604800.0,
    ]
    for bad in ("", "1w", "h", "-1s"):
        with pytest.raises(ValueError, match="expected a number"):
            parse_duration(bad)


# -- audit -----------------------------------------------------------------------------------


def _audit_db(path: Path, n: int = 5, key: bytes | None = None) -> Path:
    async def fill() -> None:
        async with AuditLog(path, hmac_key=key, commit_interval_ms=0) as log:
            for i in range(n):
                await log.record_admin(
                    platform="dingtalk",
                    message_id=f"m{i}",
                    conversation_id="c",
                    sender_id="boss",
                    action="status",
                    args="",
                    outcome="ok",
                )

    asyncio.run(fill())
    return path


def _tamper(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute(sql)
    conn.close()


def test_cli_audit_verify_names_the_first_bad_record(tmp_path: Path) -> None:
    """verify exits 0 on an intact chain (printing the head) and 1 naming the bad record."""
    db = _audit_db(tmp_path / "a.db")
    ok = run(AUDIT, "verify", "--db", str(db), env={})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(
        "ok: 5 record(s), chain intact, hmac not checked (no key); head 5:"
    )
    head = ok.stdout.strip().rsplit(" ", 1)[1]
    assert (
        run(AUDIT, "verify", "--db", f"sqlite:///{db}", "--anchor", head, env={}).returncode == 0
    )
    _tamper(db, 'UPDATE audit SET fields = \'{"action":"reload"}\' WHERE seq = 3')
    bad = run(AUDIT, "verify", "--db", str(db), env={})
    assert bad.returncode == 1
    assert bad.stdout.startswith("TAMPERED: record 3 altered: record 3 does not match its hash")
    other = _audit_db(tmp_path / "b.db")
    _tamper(other, "DELETE FROM audit WHERE seq >= 4")
    truncated = run(AUDIT, "verify", "--db", str(other), "--anchor", head, env={})
    assert truncated.returncode == 1
    assert "TAMPERED: record 4 removed" in truncated.stdout


def test_cli_audit_verify_with_key_and_jsonl_export(tmp_path: Path, cli: CliRunner) -> None:
    """With --key-env records must be signed; an export verifies on its own."""
    db = _audit_db(tmp_path / "a.db", key=b"audit-key-123")
    env = {"AUDIT_KEY": "audit-key-123", "WRONG": "nope"}
    result = cli.invoke(audit_app, ["verify", "--db", str(db), "--key-env", "AUDIT_KEY"], env=env)
    assert result.exit_code == 0
    assert "hmac checked" in result.output
    result = cli.invoke(audit_app, ["verify", "--db", str(db), "--key-env", "WRONG"], env=env)
    assert result.exit_code == 1
    assert "record 1 forged" in result.output
    out = tmp_path / "audit.jsonl"
    exported = run(AUDIT, "export", "--db", str(db), "--out", str(out), env={})
    assert exported.returncode == 0
    assert "exported 5 record(s)" in exported.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5]
    result = cli.invoke(
        audit_app, ["verify", "--jsonl", str(out), "--key-env", "AUDIT_KEY"], env=env
    )
    assert result.exit_code == 0
    out.write_text("\n".join([lines[0], *lines[2:]]) + "\n", encoding="utf-8")
    result = cli.invoke(audit_app, ["verify", "--jsonl", str(out)])
    assert result.exit_code == 1
    assert "record 2 removed" in result.output
    to_stdout = cli.invoke(audit_app, ["export", "--db", str(db), "--out", "-", "--since", "3"])
    assert to_stdout.exit_code == 0
    assert [json.loads(line)["seq"] for line in to_stdout.stdout.splitlines()] == [4, 5]


def test_cli_audit_usage_errors(tmp_path: Path, cli: CliRunner) -> None:
    """A missing database, key variable or malformed anchor or URL exits 2."""
    db = _audit_db(tmp_path / "a.db", n=1)
    cases = [
        (["verify", "--db", str(tmp_path / "none.db")], "no audit database"),
        (["verify", "--db", str(db), "--key-env", "UNSET_VAR_X"], "UNSET_VAR_X is not set"),
        (["verify", "--db", str(db), "--anchor", "3:abc"], "expected SEQ:HASH"),
        (["verify", "--db", "redis://x/0"], "only sqlite"),
        (["verify", "--jsonl", str(tmp_path / "none.jsonl")], "error:"),
        (["export", "--db", str(tmp_path / "none.db"), "--out", "-"], "no audit database"),
        (["export", "--db", str(db), "--out", str(tmp_path / "no" / "x.jsonl")], "error:"),
    ]
    for args, message in cases:
        result = cli.invoke(audit_app, args)
        assert result.exit_code == 2, args
        assert message in result.output, args


async def test_cli_secret_is_used_by_the_gateway_and_never_printed(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A secret set with `imrelay secrets` reaches DingTalk, never output, logs or /metrics."""
    import aiohttp

    from imrelay.sim.dingtalk import DingTalkSimulator
    from imrelay.sim.model import ModelSimulator

    secret = "sim-secret-from-store-5b2e"
    async with (
        DingTalkSimulator(app_secret=secret) as dt,
        ModelSimulator() as model,
    ):
        assert (
            run(SECRETS, "set", "dingtalk_app", "--value-stdin", env=env, stdin=secret).returncode
            == 0
        )
        port = _free_port()
        config = tmp_path / "imrelay.json"
        config.write_text(json.dumps({
            "server": {"host": "127.0.0.1", "port": port},
            "storage": {"url": f"sqlite:///{tmp_path / 'g.db'}"},
            "platforms": {"dingtalk": {
                "type": "dingtalk", "app_key": dt.app_key, "app_secret": "secret:dingtalk_app",
                "api_base": dt.base_url,
            }},
            "models": {"default": {
                "type": "openai", "base_url": model.base_url, "model": "sim-model",
            }},
            "security": {
                "secrets": {"path": env["IMRELAY_SECRETS_FILE"]},
                "audit": {"url": f"sqlite:///{tmp_path / 'audit.db'}"},
            },
            "logging": {"level": "DEBUG"},
        }))  # fmt: skip
        full_env = {**os.environ, **env}
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imrelay", "check", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
        )  # fmt: skip
        check_out, check_err = await asyncio.wait_for(check.communicate(), 60)
        assert check.returncode == 0, check_out.decode() + check_err.decode()
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imrelay", "run", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
        )  # fmt: skip
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while dt.active_connections() < 1:  # the stored secret opened the connection
                assert asyncio.get_running_loop().time() < deadline, "gateway never connected"
                assert gateway.returncode is None
                await asyncio.sleep(0.05)
            ids = await dt.send_message("hello")
            while not dt.replies(ids["msg_id"]):
                assert asyncio.get_running_loop().time() < deadline, "no reply"
                await asyncio.sleep(0.05)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}/metrics") as resp,
            ):
                metrics = await resp.text()
            gateway.terminate()
            out, err = await asyncio.wait_for(gateway.communicate(), 30)
        finally:
            if gateway.returncode is None:
                gateway.kill()
                await gateway.wait()
    printed = b"".join((check_out, check_err, out, err)).decode()
    assert 'imrelay_secret_age_seconds{name="dingtalk_app"}' in metrics
    assert secret not in metrics
    assert secret not in printed
    assert "message-handled" in printed  # the logs were really read


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
