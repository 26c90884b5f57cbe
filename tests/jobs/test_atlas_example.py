"""The atlas of the example plan's store in headless Chromium: no errors, every image decodes;
the screenshot is docs/images/atlas.png (shown in docs/scaling.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fiber_plugins.cli.main import main
from tests.jobs.test_plans import EXAMPLE
from tests.reporting.test_atlas import CHROMIUM, _chromium, _console_errors, _status

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (make test-browser installs it)"
)
def test_the_example_plans_atlas_in_chromium(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["run", str(EXAMPLE), "--out", str(store)]) == 0
    assert main(["report", str(store)]) == 0
    page = store / "atlas" / "index.html"
    assert f"wrote {page}" in capsys.readouterr().out
    run = _chromium(page.as_uri() + "?eager", tmp_path, "--dump-dom")
    assert run.returncode == 0, run.stderr[-3000:]
    status = _status(run.stdout)
    assert status["state"] == "ready" and status["rows"] == "16", status
    assert json.loads(status["errors"]) == [] and not _console_errors(run.stderr)
    assert int(status["images"]) == 16 * 3 and status["decoded"] == status["images"]
    shot = ROOT / "docs" / "images" / "atlas.png"
    run = _chromium(
        page.as_uri() + "?eager", tmp_path, f"--screenshot={shot}", "--window-size=1400,900"
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-3000:]
