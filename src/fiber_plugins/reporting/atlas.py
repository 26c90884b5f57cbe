"""The atlas of a store: one static HTML page with a row per sampled unit.

Each row shows the unit's first reference, a strip of its fiber samples (failed ones crossed
out), the median fiber loss against the median nearest-neighbour baseline and their ratio, the
share of samples that keep the reference's label, the invariance map (per-pixel std of the
samples, see :func:`.atlas_images.unit_map`) and the counts of ok and failed samples.

The store is read directly (``store.json``, ``index/*.parquet``, the chunks' safetensors files),
so only committed chunks are shown. The page is plain HTML and JavaScript with the rows embedded
as JSON: sortable by every numeric column, filterable, paginated, rendering only the current page
with lazily loaded images, so 10,000 units stay quick. Opened with ``?eager`` it loads the page's
images at once and records, in ``#atlas-status``, how many decoded and any script errors.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ..errors import MissingFileError, UserValueError
from ..samplers.store import INDEX_DIR, STORE_FILE
from . import atlas_images as ai

# the index columns the atlas reads, with their types (absent columns are read as nulls)
COLUMNS = {
    "unit_index": pa.int64(), "unit": pa.string(), "reference": pa.string(),
    "reference_row": pa.int64(), "sample": pa.int64(), "chunk": pa.int64(), "file": pa.string(),
    "slot": pa.int64(), "fiber_loss": pa.float64(), "nearest_neighbour": pa.float64(),
    "label_kept": pa.bool_(), "status": pa.string(), "reason": pa.string(),
}  # fmt: skip


def read_store(store_dir: str | Path) -> tuple[dict, pa.Table | None]:
    """The store's manifest and the lines of its committed chunks (None when there is none).

    Parameters
    ----------
    store_dir: a store folder (holding ``store.json``).

    Returns
    -------
    (manifest, table) with the columns of :data:`COLUMNS`.
    """
    store = Path(store_dir)
    if not (store / STORE_FILE).is_file():
        raise MissingFileError(f"{str(store)!r} is not a fiber store (no {STORE_FILE})")
    meta = json.loads((store / STORE_FILE).read_text())
    if meta.get("kind") != "fiber-store":
        raise UserValueError(f"{str(store / STORE_FILE)!r} does not describe a fiber store")
    tables = [
        _conform(pq.read_table(p)) for p in sorted((store / INDEX_DIR).glob("[0-9]*.parquet"))
    ]
    return meta, (pa.concat_tables(tables) if tables else None)


def _conform(table: pa.Table) -> pa.Table:
    """The :data:`COLUMNS` of ``table``, cast to their types; nulls for those it lacks."""
    n = len(table)
    return pa.table(
        [
            table[c].cast(t) if c in table.column_names else pa.nulls(n, t)
            for c, t in COLUMNS.items()
        ],
        names=list(COLUMNS),
    )


def _number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(f"{x:.5g}")


def _median(x: np.ndarray) -> float | None:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else None


def _units(table: pa.Table, labels: list[str]) -> list[tuple[dict, slice]]:
    """(summary row, its lines in the sorted table) per unit; the table must be sorted."""
    col = {c: table[c] for c in COLUMNS}
    unit = col["unit_index"].to_numpy()
    ref_key = np.stack([unit, col["chunk"].to_numpy(), col["reference_row"].to_numpy()])
    new_ref = np.r_[True, (np.diff(ref_key, axis=1) != 0).any(0)]
    ok = pc.fill_null(pc.equal(col["status"], "ok"), False).to_numpy(zero_copy_only=False)
    loss = pc.fill_null(col["fiber_loss"], math.nan).to_numpy()
    nn = pc.fill_null(col["nearest_neighbour"], math.nan).to_numpy()
    kept = pc.fill_null(pc.cast(col["label_kept"], pa.float64()), math.nan).to_numpy()
    names, refs = col["unit"].to_pylist(), col["reference"].to_pylist()
    reasons = col["reason"].to_pylist()
    starts = np.flatnonzero(np.r_[True, unit[1:] != unit[:-1]])
    out = []
    for s, e in zip(starts.tolist(), np.r_[starts[1:], len(unit)].tolist()):
        i, good = int(unit[s]), ok[s:e]
        fl, base = _median(loss[s:e][good]), _median(nn[s:e][new_ref[s:e]])
        k = kept[s:e][np.isfinite(kept[s:e])]
        why = Counter(r or "unknown" for r, g in zip(reasons[s:e], good) if not g)
        row = {
            "i": i,
            "u": labels[i] if 0 <= i < len(labels) else (names[s] or str(i)),
            "ref": refs[s] or "",
            "nref": int(new_ref[s:e].sum()),
            "ok": int(good.sum()),
            "failed": int(e - s - good.sum()),
            "loss": _number(fl),
            "nn": _number(base),
            "ratio": _number(fl / base) if fl is not None and base else None,
            "kept": _number(float(k.mean())) if k.size else None,
            "why": "; ".join(f"{r} ({n})" for r, n in why.most_common(3)),
        }
        out.append((row, slice(s, e)))
    return out


def _sort(table: pa.Table) -> pa.Table:
    return table.sort_by(
        [(c, "ascending") for c in ("unit_index", "chunk", "reference_row", "sample")]
    )


def summarise(table: pa.Table, labels: list[str] | None = None) -> list[dict]:
    """One summary row per unit (without images), in unit order.

    Parameters
    ----------
    table: index lines, as :func:`read_store` returns them.
    labels: the store's unit labels (``store.json`` ``units``); default the ``unit`` column.

    Returns
    -------
    Rows with ``i`` (unit index), ``u`` (label), ``ref`` (first reference), ``nref``, ``ok``,
    ``failed``, ``loss`` (median fiber loss), ``nn`` (median nearest-neighbour baseline),
    ``ratio`` (their ratio), ``kept`` (share keeping the label) and ``why`` (failure reasons).
    """
    return [row for row, _ in _units(_sort(_conform(table)), labels or [])]


def write_atlas(
    store_dir: str | Path,
    out_dir: str | Path | None = None,
    page_size: int = 100,
    *,
    tile: int = 48,
    strip: int = 8,
    progress: bool | None = None,
) -> Path:
    """Write the atlas of a store: ``index.html`` and its PNG files.

    Parameters
    ----------
    store_dir: the store folder.
    out_dir: where to write (default ``STORE/atlas``).
    page_size: units per page.
    tile: pixel size of every thumbnail.
    strip: how many samples each unit's strip shows (its first ones).
    progress: show a tqdm bar (default: when there are more than 100 units).

    Returns
    -------
    The path of ``index.html``. A unit's PNGs are named by a hash of what they show, so writing
    the atlas again redraws only the units whose lines changed; unused PNGs are removed.
    """
    if page_size < 1:
        raise UserValueError(f"page_size must be at least 1, not {page_size}")
    store = Path(store_dir)
    meta, table = read_store(store)
    out = Path(out_dir) if out_dir is not None else store / "atlas"
    rows = []
    if table is not None:
        table = _sort(table)
        units = _units(table, list(meta.get("units") or []))
        images = ai.UnitImages(store, out / "img", table, tile=tile, strip=strip)
        show = progress if progress is not None else len(units) > 100
        for row, lines in tqdm(units, desc="atlas", unit="unit", disable=not show):
            row.update(images.draw(row["i"], lines))
            rows.append(row)
        images.finish()
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text(build_page(meta, rows, page_size, tile=tile, store=str(store)))
    return page


def build_page(
    meta: dict, rows: list[dict], page_size: int = 100, *, tile: int = 48, store: str = ""
) -> str:
    """The atlas's HTML: the rows embedded as JSON, drawn page by page by the script.

    Parameters
    ----------
    meta: the store's manifest (``store.json``).
    rows: the unit rows (:func:`summarise`'s, plus the image paths ``ref_png``,
        ``samples_png``, ``map_png``, ``inv`` and ``ns``: see :meth:`.UnitImages.draw`).
    page_size: units per page.
    tile: the thumbnails' pixel size.
    store: the store's path, shown in the header.
    """
    n_ok = sum(r["ok"] for r in rows)
    n_failed = sum(r["failed"] for r in rows)
    total = int(meta.get("num_units") or len(meta.get("units") or []))
    facts = [
        f"{len(rows)} of {total} units sampled",
        f"{n_ok} samples ok, {n_failed} failed",
        f"plan {str(meta.get('plan_hash', '?'))[:12]}",
        f"version {meta.get('version', '?')}",
        f"created {meta.get('created', '?')}",
    ] + ([f"labeller {meta['labeller']}"] if meta.get("labeller") else [])
    data = {"page_size": int(page_size), "tile": tile, "rows": rows}
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    plan = html.escape(json.dumps(meta.get("plan", {}), indent=2, default=str))
    body = (
        _TABLE
        if rows
        else '<p class="empty" id="empty-store">No committed chunk yet: nothing to show.</p>'
    )
    parts = {
        "TITLE": html.escape(f"Fiber atlas: {Path(store).name or 'store'}"),
        "STORE": html.escape(store),
        "FACTS": html.escape(" · ".join(facts)),
        "PLAN": plan,
        "BODY": body,
        "SCRIPT": _SCRIPT if rows else _EMPTY_SCRIPT,
        "DATA": text,
    }
    return re.sub(r"%([A-Z]+)%", lambda m: parts[m.group(1)], _PAGE)  # one pass: no rescan


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<script>window.atlasErrors=[];(function(){var E=window.atlasErrors,ce=console.error;
function note(m){E.push(String(m));var s=document.getElementById("atlas-status");
document.documentElement.setAttribute("data-errors",E.length);if(s)s.setAttribute("data-errors",JSON.stringify(E));}
window.addEventListener("error",function(e){var t=e.target;note(e.message||"cannot load "+(t&&(t.currentSrc||t.src)));},true);
console.error=function(){note(Array.prototype.join.call(arguments," "));ce.apply(console,arguments);};})();</script>
<style>
body{font:14px/1.35 system-ui,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
header{padding:14px 20px 8px;background:#fff;border-bottom:1px solid #e2e5ea}
h1{font-size:20px;margin:0 0 4px} .facts{color:#5b6472;font-size:13px}
details{font-size:12px;color:#5b6472;margin-top:4px} pre{max-height:240px;overflow:auto;background:#f4f5f7;padding:6px}
.bar{position:sticky;top:0;z-index:2;display:flex;gap:14px;align-items:center;flex-wrap:wrap;padding:8px 20px;background:#fff;border-bottom:1px solid #e2e5ea}
.bar input[type=search]{width:260px;padding:4px 8px;border:1px solid #c5cad3;border-radius:4px}
.bar input[type=number]{width:56px} .bar button{padding:3px 10px} #count{color:#5b6472}
main{padding:8px 20px 40px} table{border-collapse:collapse;background:#fff}
th,td{padding:4px 8px;border-bottom:1px solid #e8eaee;vertical-align:middle}
th{position:sticky;top:45px;background:#eef0f4;font-weight:600;text-align:left;white-space:nowrap;font-size:13px}
th[data-key]{cursor:pointer;user-select:none} th[data-key]:hover{background:#e1e5ec}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px} th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums} tr:hover td{background:#f6f8fb}
.unit{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;word-break:break-all;max-width:240px}
.sub{display:block;color:#7a8291;font:11px system-ui,sans-serif;word-break:break-all}
img{display:block;image-rendering:pixelated;background:#eee} .miss{color:#9aa1ad}
.good{color:#1a7f37;font-weight:600} .bad{color:#b42318} .failed{color:#b42318;font-weight:600}
.empty{padding:30px;font-size:16px;color:#5b6472}
</style></head><body>
<header><h1>%TITLE%</h1><div class="facts">%FACTS%</div><div class="facts">%STORE%</div>
<div class="facts">Ratio = median fiber loss / median nearest-neighbour baseline: <span class="good">below 1</span>,
the samples match the unit better than the closest pool image. Invariance map: per-pixel std of the samples
(bright = free pixels), each scaled to its maximum. Crossed-out samples failed. Click a column to sort.</div>
<details><summary>plan</summary><pre>%PLAN%</pre></details></header>
%BODY%
<div id="atlas-status" hidden data-state="loading"></div>
<script id="atlas-data" type="application/json">%DATA%</script>
<script>%SCRIPT%</script>
</body></html>
"""
_TABLE = """<div class="bar"><input id="q" type="search" placeholder="filter units (words, all must match)">
<label><input id="only-failed" type="checkbox"> only units with failed samples</label>
<span id="count"></span><span><button id="prev">&lsaquo; prev</button>
page <input id="page" type="number" min="1" value="1"> of <span id="pages">1</span>
<button id="next">next &rsaquo;</button></span></div>
<main><table><thead><tr>
<th class="num" data-key="i">#</th><th data-key="u">unit</th><th>reference</th><th>fiber samples</th>
<th class="num" data-key="loss" title="median fiber loss of the successful samples">fiber loss</th>
<th class="num" data-key="nn" title="median fiber loss of the nearest pool image">NN baseline</th>
<th class="num" data-key="ratio" title="fiber loss / NN baseline (below 1: closer than any pool image)">ratio</th>
<th class="num" data-key="kept" title="share of samples the labeller gives the reference's label">label kept</th>
<th class="num" data-key="inv" title="mean per-pixel std of the samples; the map is scaled to its maximum">invariance</th>
<th class="num" data-key="ok">ok</th><th class="num" data-key="failed">failed</th>
</tr></thead><tbody id="rows"></tbody></table><p id="none" class="empty" hidden>No unit matches.</p></main>"""
_EMPTY_SCRIPT = """document.getElementById("atlas-status").dataset.state="ready";"""
_SCRIPT = r"""(function(){"use strict";
var D=JSON.parse(document.getElementById("atlas-data").textContent),R=D.rows,T=D.tile;
var EAGER=/[?&]eager\b/.test(location.search),$=function(id){return document.getElementById(id);};
var coll=new Intl.Collator(undefined,{numeric:true,sensitivity:"base"});
var S={q:"",failed:false,key:"i",dir:1,page:1},view=R,token=0;
R.forEach(function(r){r._l=r.u.toLowerCase();});
try{var h=new URLSearchParams(location.hash.slice(1));S.q=h.get("q")||"";S.failed=h.get("failed")==="1";
if(h.get("sort"))S.key=h.get("sort");if(h.get("dir")==="-1")S.dir=-1;S.page=parseInt(h.get("page")||"1",10)||1;}catch(e){}
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=text;return e;}
function fmt(v,pct){if(v==null)return"\u2014";if(pct)return(100*v).toFixed(0)+"%";
if(Number.isInteger(v))return String(v);var a=Math.abs(v);return a<1e-3||a>=1e5?v.toExponential(2):String(+v.toPrecision(3));}
function pic(src,w,alt){if(!src)return el("span","miss","\u2014");var i=el("img");i.loading=EAGER?"eager":"lazy";
i.decoding="async";i.width=w;i.height=T;i.alt=alt;i.src=src;return i;}
function num(v,pct,cls){var c=el("td","num"+(cls?" "+cls:""),fmt(v,pct));return c;}
function cmp(a,b){var x=a[S.key],y=b[S.key];if(x==null||y==null)return(x==null)-(y==null)||a.i-b.i;
var c=typeof x==="string"?coll.compare(x,y):x-y;return c*S.dir||a.i-b.i;}
function refilter(){var t=S.q.toLowerCase().split(/\s+/).filter(Boolean);
view=R.filter(function(r){return(!S.failed||r.failed>0)&&t.every(function(w){return r._l.indexOf(w)>=0;});});
view.sort(cmp);}
function row(r){var tr=el("tr"),u=el("td","unit",r.u);u.appendChild(el("span","sub",r.ref+(r.nref>1?" (+"+(r.nref-1)+" more)":"")));
tr.appendChild(num(r.i));tr.appendChild(u);
var a=el("td");a.appendChild(pic(r.ref_png,T,"reference"));tr.appendChild(a);
var s=el("td");s.appendChild(pic(r.samples_png,r.ns*(T+2)-2,"fiber samples"));tr.appendChild(s);
tr.appendChild(num(r.loss));tr.appendChild(num(r.nn));
tr.appendChild(num(r.ratio,false,r.ratio==null?"":r.ratio<1?"good":"bad"));tr.appendChild(num(r.kept,true));
var m=el("td","num",r.map_png?null:"\u2014");if(r.map_png){m.appendChild(pic(r.map_png,T,"invariance map"));
m.firstChild.style.marginLeft="auto";m.appendChild(el("span","sub",fmt(r.inv)));}else m.title="no successful sample";tr.appendChild(m);tr.appendChild(num(r.ok));
var f=num(r.failed,false,r.failed?"failed":"");if(r.why)f.title=r.why;tr.appendChild(f);return tr;}
function status(imgs){var st=$("atlas-status");st.dataset.rows=String(view.length);st.dataset.page=String(S.page);
st.dataset.images=String(imgs.length);st.dataset.decoded=String(imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length);
st.dataset.errors=JSON.stringify(window.atlasErrors);st.dataset.first=view.length?view[0].u:"";st.dataset.state="ready";}
function render(){var n=Math.max(1,Math.ceil(view.length/D.page_size));S.page=Math.min(Math.max(1,S.page),n);
var body=$("rows"),frag=document.createDocumentFragment(),lo=(S.page-1)*D.page_size;
view.slice(lo,lo+D.page_size).forEach(function(r){frag.appendChild(row(r));});
body.textContent="";body.appendChild(frag);$("none").hidden=view.length>0;
$("pages").textContent=String(n);$("page").value=String(S.page);$("page").max=String(n);
$("prev").disabled=S.page<=1;$("next").disabled=S.page>=n;
$("count").textContent=view.length+" of "+R.length+" units";
document.querySelectorAll("th[data-key]").forEach(function(th){th.removeAttribute("aria-sort");
if(th.dataset.key===S.key)th.setAttribute("aria-sort",S.dir>0?"ascending":"descending");});
try{var p=new URLSearchParams({q:S.q,failed:S.failed?"1":"0",sort:S.key,dir:String(S.dir),page:String(S.page)});
location.replace("#"+p.toString());}catch(e){}
var imgs=Array.prototype.slice.call(body.querySelectorAll("img")),mine=++token;$("atlas-status").dataset.state="loading";
if(!EAGER){status(imgs);return;}
Promise.all(imgs.map(function(i){return i.complete?0:new Promise(function(ok){i.addEventListener("load",ok);i.addEventListener("error",ok);});}))
.then(function(){if(mine===token)status(imgs);});}
function go(p){S.page=p;render();window.scrollTo(0,0);}
$("q").value=S.q;$("only-failed").checked=S.failed;
$("q").addEventListener("input",function(){S.q=this.value;S.page=1;refilter();render();});
$("only-failed").addEventListener("change",function(){S.failed=this.checked;S.page=1;refilter();render();});
$("prev").addEventListener("click",function(){go(S.page-1);});$("next").addEventListener("click",function(){go(S.page+1);});
$("page").addEventListener("change",function(){go(parseInt(this.value,10)||1);});
document.querySelectorAll("th[data-key]").forEach(function(th){th.addEventListener("click",function(){
var k=th.dataset.key;if(S.key===k)S.dir=-S.dir;else{S.key=k;S.dir=k==="i"||k==="u"?1:-1;}S.page=1;refilter();render();});});
document.addEventListener("keydown",function(e){if(e.target.tagName==="INPUT")return;
if(e.key==="ArrowRight")$("next").click();if(e.key==="ArrowLeft")$("prev").click();});
refilter();render();})();"""
