"""fiber-plugins report: the HTML page references only files that exist."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fiber_plugins.cli.main import main


class _Srcs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        self.srcs += [v for k, v in attrs if k in ("src", "href") and v]


def test_sample_writes_report_and_report_command_rewrites_it(pixel_prior_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (extra 'metrics')")
    ref = tmp_path / "ref.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")).save(ref)
    out = tmp_path / "run"
    argv = [
        "sample",
        "--subject",
        "module:tests.conftest:make_subject",
        "--prior",
        str(pixel_prior_dir),
        "--reference",
        str(ref),
        str(ref),
        "-n",
        "3",
        "--steps",
        "3",
        "--inner-steps",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert len(ev["lowpass_median"]) == 9 and len(ev["augmentation_median"]) == 2
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    parser = _Srcs()
    parser.feed((out / "report.html").read_text())
    assert {"grid.png", "trace.png", "lowpass.png", "invariance.png"} <= set(parser.srcs)
    for src in parser.srcs:
        assert (out / src).is_file(), src


def test_report_on_a_folder_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
