"""The offline demo writes a report whose every image exists."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from fiber_plugins.cli.main import main


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.srcs.append(v)


def test_demo_report_references_existing_files(tmp_path, capsys):
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    pytest.importorskip("matplotlib", reason="matplotlib not installed (extra 'metrics')")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-n", "2", "--steps", "6", "--device", "cpu"]) == 0
    html = (out / "report.html").read_text()
    parser = _Links()
    parser.feed(html)
    assert {"grid.png", "colours.png"} <= set(parser.srcs)
    for src in parser.srcs:
        assert (out / src).is_file(), src
    assert "nearest neighbour" in html
    printed = capsys.readouterr().out
    assert "report.html" in printed and "median fiber loss" in printed
