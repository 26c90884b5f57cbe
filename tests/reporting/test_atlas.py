"""The atlas of a store: one row per unit, PNGs that decode, a page that works in a browser.

The store is fabricated here, file by file, in the documented format (``store.json``,
``index/NNNNNN.parquet``, ``chunks/NNNNNN/{samples,inputs}.safetensors``), without the store
module, as a reader that only knows the format would see it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fiber_plugins.errors import MissingFileError
from fiber_plugins.reporting.atlas import build_page, read_store, summarise, write_atlas

ROOT = Path(__file__).resolve().parents[2]
SIZE, M = 32, 3


def _pattern(rng: np.random.Generator) -> torch.Tensor:
    """A smooth colourful (3, SIZE, SIZE) image in [0, 1]."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    f, p = rng.uniform(0.3, 1.6, (3, 2)), rng.uniform(0, 6.3, 3)
    img = [0.5 + 0.35 * np.sin(2 * np.pi * (f[c, 0] * x + f[c, 1] * y) + p[c]) for c in range(3)]
    return torch.tensor(np.stack(img), dtype=torch.float32)


def _samples(ref: torch.Tensor, rng: np.random.Generator, centre) -> torch.Tensor:
    """M samples: the reference, changed freely inside a disc around ``centre`` (the unit's
    invariance), so the invariance map is a bright disc."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    disc = torch.tensor(((y - centre[0]) ** 2 + (x - centre[1]) ** 2) < 64, dtype=torch.float32)
    noise = torch.tensor(rng.random((M, 3, SIZE, SIZE)), dtype=torch.float32)
    return (ref * (1 - disc) + noise * disc).clamp(0, 1)


def make_store(root: Path, n_units: int = 12, refs: int = 2, per_chunk: int = 6) -> dict:
    """A store of ``n_units`` units x ``refs`` references x M samples in chunks of ``per_chunk``
    units, one more unit in a failed chunk (no files) and one planned unit never sampled.

    Unit 1 has one failed sample (its image kept, as run folders do); unit 3 has only failed
    samples. Returns what the atlas should report per unit label.
    """
    rng = np.random.default_rng(0)
    labels = [f"layer:features.8:{k}" for k in range(n_units + 2)]
    (root / "index").mkdir(parents=True)
    expect: dict[str, dict] = {}
    chunk = 0
    for chunk, first in enumerate(range(0, n_units, per_chunk)):
        units = list(range(first, min(first + per_chunk, n_units)))
        folder = root / "chunks" / f"{chunk:06d}"
        folder.mkdir(parents=True)
        lines, references, images = [], [], []
        for u in units:
            centre = rng.integers(8, SIZE - 8, 2)
            losses, nns, kept = [], [], []
            for r in range(refs):
                ref = _pattern(rng)
                row = len(references)
                references.append(ref)
                nn = float(rng.uniform(0.5, 2.0))
                nns.append(nn)
                for s, img in enumerate(_samples(ref, rng, centre)):
                    failed = u == 3 or (u == 1 and r == 0 and s == 2)
                    loss = None if failed else float(rng.uniform(0.01, 1.5))
                    keep = None if failed else bool(rng.random() < 0.7)
                    losses += [loss] if loss is not None else []
                    kept += [keep] if keep is not None else []
                    lines.append(
                        dict(unit=labels[u], unit_index=u, reference=f"color-mnist:test:{10 * u + r}",
                             reference_row=row, sample=s, seed=1000 * u + 10 * r + s, chunk=chunk,
                             file=f"chunks/{chunk:06d}/samples.safetensors", slot=len(images),
                             fiber_loss=loss, nearest_neighbour=nn, label_kept=keep,
                             status="failed" if failed else "ok",
                             reason="non-finite value during sampling" if failed else None,
                             seconds=0.5, device="cpu", version="0.1.0", plan_hash="abc123")
                    )  # fmt: skip
                    images.append(torch.zeros_like(img) if failed else img)
            expect[labels[u]] = dict(
                ok=len(losses), failed=refs * M - len(losses),
                loss=float(np.median(losses)) if losses else None,
                nn=float(np.median(nns)), kept=float(np.mean(kept)) if kept else None,
            )  # fmt: skip
        save_file(
            {"images": torch.stack(images), "loss_trace": torch.rand(len(images), 5)},
            str(folder / "samples.safetensors"),
        )
        save_file({"references": torch.stack(references)}, str(folder / "inputs.safetensors"))
        (folder / "run.json").write_text(json.dumps({"format": 1, "status": "complete"}))
        pq.write_table(pa.Table.from_pylist(lines), folder / "index.parquet")
        pq.write_table(pa.Table.from_pylist(lines), root / "index" / f"{chunk:06d}.parquet")
    # a failed chunk: its unit's lines name no file
    u, chunk = n_units, chunk + 1
    failed = [
        dict(unit=labels[u], unit_index=u, reference=f"color-mnist:test:{10 * u + r}",
             reference_row=r, sample=s, seed=s, chunk=chunk, file="", slot=-1, fiber_loss=None,
             nearest_neighbour=None, label_kept=None, status="failed", reason="CUDA out of memory",
             seconds=0.0, device="cuda:0", version="0.1.0", plan_hash="abc123")
        for r in range(refs) for s in range(M)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(failed), root / "index" / f"{chunk:06d}.parquet")
    expect[labels[u]] = dict(ok=0, failed=refs * M, loss=None, nn=None, kept=None)
    _manifest(root, labels)
    return expect


def _manifest(root: Path, labels: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "store.json").write_text(
        json.dumps(
            {"format": 1, "kind": "fiber-store", "plan": {"subject": "tiny", "n": M},
             "plan_hash": "abc123", "version": "0.1.0", "created": "2025-01-01T00:00:00Z",
             "num_units": len(labels), "units": labels, "labeller": "tiny-classifier"}
        )
    )  # fmt: skip


def page_data(page: Path) -> dict:
    text = page.read_text()
    found = re.search(r'<script id="atlas-data" type="application/json">(.*?)</script>', text, re.S)
    assert found, "no embedded data"
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("atlas") / "store"
    return root, make_store(root)


def _close(a, b) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and math.isclose(a, b, rel_tol=1e-3)
    )


def test_read_store_conforms_the_chunks_columns(store):
    root, expect = store
    meta, table = read_store(root)
    assert meta["num_units"] == 14 and table is not None
    assert len(table) == 13 * 2 * M  # the failed chunk's label_kept (all null) read as bool
    assert table.schema.field("label_kept").type == pa.bool_()
    assert summarise(table, meta["units"])[3]["u"] == "layer:features.8:3"


def test_atlas_has_every_unit_with_its_numbers_and_pngs(store, tmp_path):
    root, expect = store
    page = write_atlas(root, tmp_path / "atlas", page_size=5)
    assert page == tmp_path / "atlas" / "index.html" and page.is_file()
    data = page_data(page)
    assert data["page_size"] == 5
    rows = {r["u"]: r for r in data["rows"]}
    assert list(rows) == list(expect)  # every sampled unit, in plan order; not the pending one
    for label, want in expect.items():
        row = rows[label]
        assert (row["ok"], row["failed"]) == (want["ok"], want["failed"]), label
        for key in ("loss", "nn", "kept"):
            assert _close(row[key], want[key]), (label, key, row[key], want[key])
        ratio = want["loss"] / want["nn"] if want["loss"] is not None and want["nn"] else None
        assert _close(row["ratio"], ratio), label
        for kind in ("ref_png", "samples_png", "map_png"):
            if row[kind] is None:
                continue
            with Image.open(page.parent / row[kind]) as im:
                im.load()
                assert im.format == "PNG" and im.height == data["tile"]
    # the all-failed units: a strip of crossed-out tiles, no invariance map
    for label in ("layer:features.8:3", "layer:features.8:12"):
        assert rows[label]["map_png"] is None and rows[label]["inv"] is None
        assert rows[label]["samples_png"] is not None
    assert rows["layer:features.8:12"]["ref_png"] is None  # its chunk wrote no files
    assert "CUDA out of memory (6)" in rows["layer:features.8:12"]["why"]
    sampled = [r for r in rows.values() if r["ok"]]
    assert all(r["ref_png"] and r["map_png"] and r["inv"] > 0 for r in sampled)
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing from the network
    assert "13 of 14 units sampled" in html


def test_atlas_default_folder_and_second_write_reuses_pngs(store, tmp_path):
    root, _ = store
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    page = write_atlas(copy)
    assert page == copy / "atlas" / "index.html"
    pngs = sorted((copy / "atlas" / "img").rglob("*.png"))
    assert len(pngs) == 13 * 3 - 3  # no map for 2 all-failed units, no reference for one
    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    first = page_data(page)
    time.sleep(0.01)
    assert page_data(write_atlas(copy)) == first
    assert {
        p: p.stat().st_mtime_ns for p in sorted((copy / "atlas" / "img").rglob("*.png"))
    } == stamps
    # a unit whose lines change is redrawn; its old PNGs are removed
    index = copy / "index" / "000000.parquet"
    lines = pq.read_table(index).to_pylist()
    lines[0].update(status="failed", fiber_loss=None, reason="late failure")
    pq.write_table(pa.Table.from_pylist(lines), index)
    data = page_data(write_atlas(copy))
    assert data["rows"][0]["samples_png"] != first["rows"][0]["samples_png"]
    assert len(sorted((copy / "atlas" / "img").rglob("*.png"))) == len(pngs)


def test_empty_store_gets_a_page_that_says_so(tmp_path):
    _manifest(tmp_path / "s", ["a", "b"])
    (tmp_path / "s" / "index").mkdir()
    page = write_atlas(tmp_path / "s")
    text = page.read_text()
    assert "No committed chunk yet" in text and "0 of 2 units sampled" in text
    assert page_data(page)["rows"] == []
    with pytest.raises(MissingFileError, match="no store.json"):
        write_atlas(tmp_path / "nothing")


def _big_page(n: int, images: bool = True) -> tuple[str, list[dict], int, float]:
    """The page of ``n`` synthetic units x 4 samples, about 5% failed, built from an index
    table without any image: (html, rows, failed samples, seconds to summarise and build)."""
    per = 4
    rng = np.random.default_rng(1)
    unit = np.repeat(np.arange(n), per)
    ok = rng.random(n * per) > 0.05
    table = pa.table(
        {"unit_index": unit, "unit": [f"sae:blocks.6:{u}" for u in unit],
         "reference": [f"imagenet:val:{u}" for u in unit], "reference_row": unit % 50,
         "sample": np.tile(np.arange(per), n), "chunk": unit // 50,
         "file": [f"chunks/{c:06d}/samples.safetensors" for c in unit // 50],
         "slot": np.arange(n * per) % 200,
         "fiber_loss": pa.array(np.where(ok, rng.random(n * per), np.nan), from_pandas=True),
         "nearest_neighbour": np.repeat(rng.random(n) + 0.5, per),
         "label_kept": pa.array([bool(k) if o else None for k, o in zip(rng.random(n * per) > 0.5, ok)]),
         "status": np.where(ok, "ok", "failed")}
    )  # fmt: skip
    start = time.perf_counter()
    rows = summarise(table)
    for r in rows:
        stem = f"{r['i']:06d}-000000000000"
        paths = {k: f"img/{k}/{stem}.png" if images else None for k in ("ref", "samples", "map")}
        r.update({f"{k}_png": v for k, v in paths.items()}, inv=0.1, ns=per)
    html = build_page({"kind": "fiber-store", "num_units": n}, rows, page_size=100)
    return html, rows, int((~ok).sum()), time.perf_counter() - start


def test_ten_thousand_units_summarise_and_page_quickly():
    n = 10_000
    html, rows, failed, seconds = _big_page(n)
    assert seconds < 8, seconds
    assert len(rows) == n and rows[-1]["u"] == f"sae:blocks.6:{n - 1}"
    assert sum(r["failed"] for r in rows) == failed
    assert html.count("<img") == 0  # rows are drawn by the script, one page at a time
    assert len(html) < 4_000_000


# --------------------------------------------------------------------------------------------
# the page in a browser

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
)

# driven after the page's own script: sort, filter, the failed checkbox, paging; the results
# go into #atlas-status's data-selftest
_SELFTEST = r"""<script>(function(){
var st=document.getElementById("atlas-status"),res={};
function col(k){var i=[].indexOf.call(document.querySelectorAll("thead th"),document.querySelector('th[data-key="'+k+'"]'));
return [].map.call(document.querySelectorAll("#rows tr"),function(tr){var c=tr.children[i].firstChild;return c?c.textContent:"";});}
function nums(k){return col(k).map(function(t){return t==="\u2014"?null:parseFloat(t);});}
function sorted(v,d){var x=v.filter(function(a){return a!==null;});for(var i=1;i<x.length;i++)if((x[i]-x[i-1])*d<0)return false;
return v.indexOf(null)<0||v.slice(v.indexOf(null)).every(function(a){return a===null;});}
res.first=col("u")[0];
document.querySelector('th[data-key="ratio"]').click();res.ratio_desc=sorted(nums("ratio"),-1);
document.querySelector('th[data-key="ratio"]').click();res.ratio_asc=sorted(nums("ratio"),1);
document.querySelector('th[data-key="failed"]').click();res.failed_top=nums("failed")[0]===6;
var q=document.getElementById("q");q.value="features.8:1";q.dispatchEvent(new Event("input"));
res.filter=col("u").every(function(u){return u.indexOf("features.8:1")>=0;})&&document.getElementById("count").textContent.indexOf("4 of 13")===0;
q.value="";q.dispatchEvent(new Event("input"));
var f=document.getElementById("only-failed");f.checked=true;f.dispatchEvent(new Event("change"));
res.only_failed=nums("failed").every(function(n){return n>0;})&&document.getElementById("count").textContent.indexOf("3 of 13")===0;
f.checked=false;f.dispatchEvent(new Event("change"));document.querySelector('th[data-key="i"]').click();
if(document.querySelector('th[data-key="i"]').getAttribute("aria-sort")!=="ascending")document.querySelector('th[data-key="i"]').click();
document.getElementById("next").click();res.page2=document.getElementById("page").value==="2"&&col("u")[0]==="layer:features.8:5";
document.getElementById("next").click();document.getElementById("next").click();
res.last_page=document.getElementById("page").value==="3"&&document.getElementById("rows").children.length===3;
st.dataset.selftest=JSON.stringify(res);})();</script>"""


def _chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-extensions", f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars",
        "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", *args, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _status(dom: str) -> dict[str, str]:
    tag = re.search(r'<div id="atlas-status"[^>]*>', dom)
    assert tag, dom[-2000:]
    return {
        k: v.replace("&quot;", '"') for k, v in re.findall(r'data-([\w-]+)="([^"]*)"', tag.group(0))
    }


def _console_errors(stderr: str) -> list[str]:
    return [
        line
        for line in stderr.splitlines()
        if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)
    ]


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (make test-browser installs it)"
)
def test_atlas_in_headless_chromium(store, tmp_path):
    root, _ = store
    page = write_atlas(root, tmp_path / "atlas", page_size=5)
    # the first page, images loaded at once (?eager): all decode, no script error
    run = _chromium(page.as_uri() + "?eager", tmp_path, "--dump-dom")
    assert run.returncode == 0, run.stderr[-3000:]
    status = _status(run.stdout)
    assert status["state"] == "ready", status
    assert json.loads(status["errors"]) == [] and not _console_errors(run.stderr), run.stderr[
        -3000:
    ]
    assert status["rows"] == "13" and status["page"] == "1"
    assert int(status["images"]) == 5 * 3 - 1  # unit 3 has no invariance map
    assert status["decoded"] == status["images"]
    # driving it: sort, filter, paging
    test_page = page.with_name("selftest.html")
    test_page.write_text(page.read_text().replace("</body>", _SELFTEST + "</body>"))
    run = _chromium(test_page.as_uri(), tmp_path, "--dump-dom")
    status = _status(run.stdout)
    assert json.loads(status["errors"]) == [] and not _console_errors(run.stderr), run.stderr[
        -3000:
    ]
    checks = json.loads(status["selftest"])
    assert all(v is True for k, v in checks.items() if k != "first"), checks
    assert checks["first"] == "layer:features.8:0"
    # 10,000 units: quick to open, numbers shown whole (#9999, not 1e+04)
    big = tmp_path / "big" / "index.html"
    big.parent.mkdir()
    big.write_text(_big_page(10_000, images=False)[0])
    start = time.perf_counter()
    run = _chromium(big.as_uri() + "#sort=i&dir=-1&page=1", tmp_path, "--dump-dom")
    seconds = time.perf_counter() - start
    status = _status(run.stdout)
    assert status["state"] == "ready" and status["rows"] == "10000", status
    assert json.loads(status["errors"]) == [] and seconds < 60, (status, seconds)
    first_row = re.search(
        r'<tbody id="rows"><tr><td class="num">(\d+)</td><td class="unit">([^<]+)<', run.stdout
    )
    assert first_row and first_row.groups() == ("9999", "sae:blocks.6:9999"), run.stdout[-3000:]
    # the error channel itself works: a failing script is reported
    broken = page.with_name("broken.html")
    broken.write_text(page.read_text().replace("</body>", "<script>notDefined();</script></body>"))
    status = _status(_chromium(broken.as_uri(), tmp_path, "--dump-dom").stdout)
    assert "notDefined" in status["errors"], status
    # a screenshot to look at (the docs' screenshot is of the example plan's store:
    # tests/jobs/test_atlas_example.py)
    shot_page = write_atlas(root, tmp_path / "shot", page_size=10)
    shot = tmp_path / "atlas.png"
    run = _chromium(
        shot_page.as_uri() + "?eager", tmp_path, f"--screenshot={shot}", "--window-size=1400,1000"
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-3000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
