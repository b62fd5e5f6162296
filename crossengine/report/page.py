"""The scaffolding every report page shares: one self-contained HTML file, its style, sortable tables, figures.

Why self-contained: a report is mailed and opened offline, so plotly's JS is inlined once per page
and nothing is fetched.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from crossengine.compare.summary import SPLITS, pooled_rows

MAX_SAMPLES = 20  # per-sample charts and rows drawn at most (the worst ones first)
_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f4f4f4;cursor:pointer}td:first-child,th:first-child{text-align:left}
.note{color:#666;font-size:13px}.bad{color:#b00}.ctx{font-family:monospace;text-align:left;white-space:pre}
"""


# Errors are counted on the page itself, so a headless browser (and a test) can read them.
_ERRORS = "<script>document.documentElement.dataset.jsErrors='0';window.addEventListener('error',function(){var d=document.documentElement.dataset;d.jsErrors=String(+d.jsErrors+1)});</script>"


_SORT = """<script>
function sortTable(th){var t=th.closest('table'),i=[...th.parentNode.children].indexOf(th),b=t.tBodies[0],asc=th.dataset.asc!=='1';
var rows=[...b.rows].sort(function(x,y){var p=x.cells[i].dataset.v??x.cells[i].innerText,q=y.cells[i].dataset.v??y.cells[i].innerText,a=parseFloat(p),c=parseFloat(q);
var r=(isNaN(a)||isNaN(c))?p.localeCompare(q):a-c;return asc?r:-r});rows.forEach(function(r){b.appendChild(r)});th.dataset.asc=asc?'1':'0'}
</script>"""


def page(title: str, sections: list[tuple[str, str]]) -> str:
    import plotly.offline

    body = "".join(f'<section id="{slug(h)}"><h2>{html.escape(h)}</h2>{content}</section>' for h, content in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_ERRORS}<style>{_STYLE}</style>"
        f"<script>{plotly.offline.get_plotlyjs()}</script>{_SORT}</head><body><h1>{html.escape(title)}</h1>{body}"
        "<script>document.documentElement.dataset.rendered='1'</script></body></html>"
    )


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def figure(fig, div_id: str) -> str:
    fig.update_layout(margin=dict(l=50, r=20, t=40, b=40), template="plotly_white")
    return f'<div class="chart" id="{div_id}">' + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{div_id}-plot") + "</div>"


def fmt_cell(v: Any) -> tuple[str, str]:
    """(shown text, sort value) of one cell."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-", ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v)), str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v)), str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}", repr(float(v))
    return html.escape(str(v)), html.escape(str(v))


def html_table(df: pd.DataFrame, cls: str = "", row_class=None) -> str:
    if df.empty:
        return "<p class='note'>none</p>"
    head = "".join(f"<th onclick='sortTable(this)'>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in df.columns:
            shown, key = fmt_cell(r[c])
            cells.append(f"<td data-v='{key}'>{shown}</td>" if key != shown else f"<td>{shown}</td>")
        klass = f" class='{row_class(r)}'" if row_class and row_class(r) else ""
        rows.append(f"<tr{klass}>{''.join(cells)}</tr>")
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def pooled_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's pooled rows with its categories as plain strings (for tables and charts)."""
    df = summary.copy()
    for c in ("cand_engine", "variant", *SPLITS):
        df[c] = df[c].astype(str)
    return pooled_rows(df)
