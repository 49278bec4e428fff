"""scripts/bandit and scripts/audit: findings fail, offline never passes silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_PIP_AUDIT = """\
import json, os, sys
args = sys.argv[1:]
report = os.environ.get("FAKE_REPORT")
if report is None:
    error = "requests.exceptions.ConnectionError: Max retries exceeded"
    print(os.environ.get("FAKE_ERROR", error), file=sys.stderr)
    sys.exit(2)
with open(args[args.index("-o") + 1], "w") as out:
    out.write(report)
with open(os.environ["FAKE_ARGS"], "w") as out:
    json.dump(args, out)
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
"""


def _run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    """A directory bandit finds nothing in."""
    src = tmp_path / "clean"
    src.mkdir()
    (src / "ok.py").write_text("def f(x: int) -> int:\n    return x + 1\n")
    return src


@pytest.fixture
def fake(tmp_path: Path, clean: Path) -> dict[str, str]:
    """Environment for scripts/audit with a fake pip-audit and a reachable probe."""
    exe = tmp_path / "pip-audit"
    exe.write_text(f"#!{sys.executable}\n{FAKE_PIP_AUDIT}")
    exe.chmod(0o755)
    probe = tmp_path / "probe"
    probe.write_text("ok")
    return {
        "IMRELAY_PIP_AUDIT": str(exe),
        "IMRELAY_AUDIT_PROBE_URL": probe.as_uri(),
        "IMRELAY_BANDIT_TARGETS": str(clean),
        "FAKE_ARGS": str(tmp_path / "args.json"),
    }


def _report(*deps: dict[str, Any]) -> str:
    return json.dumps({"dependencies": list(deps), "fixes": []})


def test_audit_scripts_bandit_fails_on_findings_and_bare_nosec(
    tmp_path: Path, clean: Path
) -> None:
    """A finding fails; a nosec without a reason fails; a justified nosec passes."""
    assert _run("bandit", str(clean), env={}).returncode == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.py").write_text("import pickle\n\n\ndef f(b):\n    return pickle.loads(b)\n")
    found = _run("bandit", str(bad), env={})
    assert found.returncode == 1
    assert "B301" in found.stdout
    (bad / "a.py").write_text("x = 1\nassert x  # nosec\n")
    bare = _run("bandit", str(bad), env={})
    assert bare.returncode == 1
    assert "every nosec needs a test id and a reason" in bare.stderr
    (bad / "a.py").write_text("x = 1\nassert x  # nosec B101  # a test fixture\n")
    assert _run("bandit", str(bad), env={}).returncode == 0


def test_audit_scripts_offline_warns_and_exits_zero(fake: dict[str, str], tmp_path: Path) -> None:
    """An unreachable service skips pip-audit with a NOT audited warning, exit 0."""
    env = {**fake, "IMRELAY_AUDIT_PROBE_URL": (tmp_path / "missing").as_uri()}
    done = _run("audit", env=env)
    assert done.returncode == 0
    assert "WARNING: dependencies were NOT audited" in done.stderr
    assert "no known vulnerabilities" not in done.stdout
    assert not Path(fake["FAKE_ARGS"]).exists()  # pip-audit never ran


def test_audit_scripts_network_failure_mid_run_is_not_a_pass(fake: dict[str, str]) -> None:
    """pip-audit failing on the network after the probe is reported as NOT audited."""
    done = _run("audit", env=fake)
    assert done.returncode == 0
    assert "failed during the audit" in done.stderr
    assert "no known vulnerabilities" not in done.stdout


def test_audit_scripts_other_failures_keep_their_status(fake: dict[str, str]) -> None:
    """A pip-audit failure that is not about the network fails with pip-audit's status."""
    done = _run("audit", env={**fake, "FAKE_ERROR": "error: invalid requirement"})
    assert done.returncode == 2
    assert "pip-audit failed (status 2)" in done.stderr
    assert "NOT audited" not in done.stderr


def test_audit_scripts_vulnerabilities_fail(fake: dict[str, str]) -> None:
    """A known vulnerability exits 1 and names the package, id and fix."""
    vuln = {"id": "PYSEC-1", "fix_versions": ["2.0"], "description": "bad"}
    report = _report({"name": "pkg", "version": "1.0", "vulns": [vuln]})
    done = _run("audit", env={**fake, "FAKE_REPORT": report, "FAKE_STATUS": "1"})
    assert done.returncode == 1
    assert "VULNERABLE: pkg 1.0: PYSEC-1 (fixed in: 2.0)" in done.stdout


def test_audit_scripts_clean_and_partly_skipped(fake: dict[str, str]) -> None:
    """All audited: a pass; skipped dependencies are listed as NOT audited; none: a warning."""
    ok = _report({"name": "a", "version": "1", "vulns": []})
    done = _run("audit", env={**fake, "FAKE_REPORT": ok})
    assert done.returncode == 0
    assert "pip-audit: 1 dependencies audited, no known vulnerabilities" in done.stdout
    args = json.loads(Path(fake["FAKE_ARGS"]).read_text())
    assert args[:5] == ["--progress-spinner", "off", "-f", "json", "-o"]
    assert args[6:] == ["--local", "--skip-editable"]
    skip = {"name": "b", "version": "2", "skip_reason": "Dependency not found on PyPI"}
    partial = _run(
        "audit", env={**fake, "FAKE_REPORT": _report(json.loads(ok)["dependencies"][0], skip)}
    )
    assert partial.returncode == 0
    assert "WARNING:   b 2: Dependency not found on PyPI" in partial.stderr
    none = _run("audit", "-r", "x.txt", env={**fake, "FAKE_REPORT": _report(skip)})
    assert none.returncode == 0
    assert "answered for none of the 1 dependencies" in none.stderr
    assert "no known vulnerabilities" not in none.stdout
    assert json.loads(Path(fake["FAKE_ARGS"]).read_text())[-2:] == ["-r", "x.txt"]
