"""A self-contained HTML page: plotly.js inline (no CDN), figures as embedded JSON, a
render-status marker that a headless browser (and the tests) can read back."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3b57;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;font-size:13px;opacity:.9}
nav{padding:6px 24px;background:#e9eef3;font-size:13px} nav a{margin-right:14px;color:#1f3b57}
section{background:#fff;margin:14px 24px;padding:10px 16px;border:1px solid #dde3ea;border-radius:6px}
section h2{font-size:16px;margin:4px 0 8px} .note{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #dde3ea;padding:3px 7px;text-align:right}
th{background:#f0f3f6} td.l,th.l{text-align:left} code{font-size:11px;background:#f4f4f4;padding:1px 3px}
.fig{width:100%} .live{background:#c0392b;padding:1px 6px;border-radius:3px}
"""

# Records errors before plotly loads, so a failure anywhere shows in the status marker.
ERROR_HOOK = """
window.__reportErrors=[];
window.addEventListener('error',function(e){window.__reportErrors.push(String(e.message||e));});
window.addEventListener('unhandledrejection',function(e){window.__reportErrors.push(String(e.reason));});
"""

# Plots every <script type=application/json data-figure=DIV>, then sets body[data-report-status]
# to "ok" (all figures drawn, no error) or "error" and fills #report-status.
RENDER = """
(function(){
  var specs=document.querySelectorAll('script[data-figure]');
  var jobs=[];
  specs.forEach(function(s){
    try{
      var fig=JSON.parse(s.textContent);
      var cfg=Object.assign({responsive:true,displaylogo:false},fig.config||{});
      jobs.push(Plotly.newPlot(s.getAttribute('data-figure'),fig.data,fig.layout,cfg));
    }catch(e){window.__reportErrors.push(s.getAttribute('data-figure')+': '+e);}
  });
  function done(){
    if(typeof window.afterRender==='function'){try{window.afterRender();}catch(e){window.__reportErrors.push(String(e));}}
    var drawn=document.querySelectorAll('.js-plotly-plot').length;
    var errs=window.__reportErrors;
    var ok=errs.length===0&&drawn===specs.length;
    document.body.setAttribute('data-report-status',ok?'ok':'error');
    document.body.setAttribute('data-figures-drawn',String(drawn));
    var el=document.getElementById('report-status');
    if(el){el.textContent=(ok?'rendered ':'RENDER ERROR: ')+drawn+'/'+specs.length+' figures'+(errs.length?'; '+errs.join(' | '):'');}
  }
  Promise.all(jobs).then(done,function(e){window.__reportErrors.push(String(e));done();});
})();
"""


def _json(obj: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False, default=_default).replace("</", "<\\/")


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def figure_block(div_id: str, fig: Any, height: int | None = None) -> str:
    """A plotly figure as a <div> plus its JSON spec (drawn by RENDER)."""
    import plotly.io as pio

    spec = fig if isinstance(fig, dict) else json.loads(pio.to_json(fig, validate=False))
    style = f' style="height:{height}px"' if height else ""
    return f'<div id="{div_id}" class="fig"{style}></div>\n<script type="application/json" data-figure="{div_id}">{_json(spec)}</script>'


def data_block(element_id: str, data: Any) -> str:
    """Machine-readable data embedded in the page (for scripts, tests and curious users)."""
    return f'<script type="application/json" id="{element_id}">{_json(data)}</script>'


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, subtitle_html: str, sections: list[tuple[str, str, str]], extra_head: str = "", extra_script: str = "") -> str:
    """The whole document. ``sections``: (anchor, heading, body html)."""
    from plotly.offline import get_plotlyjs

    nav = "".join(f'<a href="#{a}">{esc(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{esc(h)}</h2>{b}</section>\n' for a, h, b in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title>{extra_head}<style>{CSS}</style>"
        f"<script>{ERROR_HOOK}</script><script>{get_plotlyjs()}</script></head>\n"
        f"<body data-report-status=\"pending\"><header><h1>{esc(title)}</h1><p>{subtitle_html}</p>"
        '<p id="report-status" class="note" style="color:#cfd8e3">rendering...</p></header>'
        f"<nav>{nav}</nav>\n{body}<script>{extra_script}</script><script>{RENDER}</script></body></html>\n"
    )


def write_atomic(path: Path, text: str) -> Path:
    """Write via a hidden temporary file and rename, so a browser never reads half a report;
    a failed write removes the temporary file (the run directory's atomic writer)."""
    from evomerge.rundir import write_atomic as write_via_temp

    write_via_temp(path, text, tmp=path.with_name(f".{path.name}.tmp"))
    return path
