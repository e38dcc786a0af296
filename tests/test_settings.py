"""Package settings live in Prefect's settings tree: env (today's names), profile, prefect.toml.

Prefect's test mode ignores profiles, so the profile cases run in a fresh interpreter with its own
``PREFECT_HOME`` (and ``profiles.toml``), configured only by the environment given here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prefect_gptimage.settings import GptImageSettings, get_settings

PRINT_SETTINGS = (
    "import json; from prefect_gptimage.settings import get_settings; "
    "print(json.dumps(get_settings().model_dump()))"
)


def settings_in_subprocess(
    tmp_path: Path, profile: dict[str, str], env: dict[str, str] | None = None
) -> dict[str, object]:
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    lines = ['active = "team"', "", "[profiles.team]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in profile.items()]
    (home / "profiles.toml").write_text("\n".join(lines) + "\n")
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "PYTEST")) and k != "PYTHONPATH"
    }
    work = tmp_path / "cwd"  # no prefect.toml, pyproject.toml or .env here
    work.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS],
        env={**clean, "PREFECT_HOME": str(home), **(env or {})},
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_defaults_and_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PREFECT_GPTIMAGE_"):
            monkeypatch.delenv(name)
    settings = get_settings()
    assert settings.allowed_media_hosts == ["fal.media", "*.fal.media"]
    assert settings.max_download_bytes == 64 * 1024 * 1024
    assert settings.concurrency_limit_name == "fal-gpt-image"
    assert settings.local_concurrency == 16
    assert settings.output_dir == "gptimage-output"
    monkeypatch.setenv("PREFECT_GPTIMAGE_LOCAL_CONCURRENCY", "3")
    monkeypatch.setenv("PREFECT_GPTIMAGE_OUTPUT_DIR", "elsewhere")
    assert (get_settings().local_concurrency, get_settings().output_dir) == (3, "elsewhere")


def test_comma_separated_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS", " Example.com, *.cdn.example.com ,,")
    assert get_settings().allowed_media_hosts == ["example.com", "*.cdn.example.com"]
    assert GptImageSettings(allowed_media_hosts="a.io,b.io").allowed_media_hosts == ["a.io", "b.io"]


def test_prefect_toml_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_GPTIMAGE_MAX_DOWNLOAD_BYTES", raising=False)
    monkeypatch.delenv("PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS", raising=False)
    (tmp_path / "prefect.toml").write_text(
        '[gptimage]\nmax_download_bytes = 1234\nallowed_media_hosts = "x.io, y.io"\n'
    )
    monkeypatch.chdir(tmp_path)
    settings = get_settings()
    assert settings.max_download_bytes == 1234
    assert settings.allowed_media_hosts == ["x.io", "y.io"]
    monkeypatch.setenv("PREFECT_GPTIMAGE_MAX_DOWNLOAD_BYTES", "99")
    assert get_settings().max_download_bytes == 99  # the environment wins over prefect.toml


def test_profile_value_is_read_and_env_beats_profile(tmp_path: Path) -> None:
    profile = {
        "PREFECT_GPTIMAGE_MAX_DOWNLOAD_BYTES": "4321",
        "PREFECT_GPTIMAGE_ALLOWED_MEDIA_HOSTS": "media.example.com, *.Example.net",
        "PREFECT_GPTIMAGE_OUTPUT_DIR": "from-profile",
    }
    from_profile = settings_in_subprocess(tmp_path, profile)
    assert from_profile["max_download_bytes"] == 4321
    assert from_profile["allowed_media_hosts"] == ["media.example.com", "*.example.net"]
    assert from_profile["output_dir"] == "from-profile"

    env_wins = settings_in_subprocess(
        tmp_path, profile, env={"PREFECT_GPTIMAGE_MAX_DOWNLOAD_BYTES": "7"}
    )
    assert env_wins["max_download_bytes"] == 7
    assert env_wins["output_dir"] == "from-profile"  # the rest still comes from the profile


def test_the_readme_and_the_settings_page_name_every_setting() -> None:
    """The README's settings table is complete, and so is docs/settings.md: a setting added to
    the model without a row is a documentation bug a user would meet."""
    root = Path(__file__).resolve().parents[1]
    names = {f"PREFECT_GPTIMAGE_{field.upper()}" for field in GptImageSettings.model_fields}
    for doc in (root / "README.md", root / "docs" / "settings.md"):
        rows = [line for line in doc.read_text().splitlines() if line.startswith("| `PREFECT_")]
        listed = {row.split("`")[1] for row in rows}
        assert names - listed == set(), f"{doc.name} misses {sorted(names - listed)}"
