"""Self-contained HTML (+ Markdown) report: tables, embedded PNG plots, reproducibility header."""

from __future__ import annotations

import base64
import html
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import pandas as pd
import torch

from safesteer import __version__
from safesteer.io import atomic_path

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;\
padding:0 1em;color:#1d2430;line-height:1.45}
h1{border-bottom:3px solid #2b6cb0;padding-bottom:.3em}\
h2{margin-top:2em;border-bottom:1px solid #d8dee9;padding-bottom:.2em;color:#2b4c7e}
table{border-collapse:collapse;margin:.8em 0;font-size:.86em}\
th,td{border:1px solid #d8dee9;padding:.3em .6em;text-align:right}
th{background:#eef2f8}td:first-child,th:first-child{text-align:left}\
tr:nth-child(even){background:#fafbfd}
.note{color:#4a5568;font-size:.92em}.fig{margin:1em 0}.fig img{max-width:100%;border:1px solid #e2e8f0}
.repro{background:#f7fafc;border:1px solid #e2e8f0;padding:.6em 1em;font-size:.85em}
.card{border:1px solid #d8dee9;border-radius:6px;padding:.6em 1em;margin:.6em 0;background:#fcfdff}
.tw{overflow-x:auto;max-width:100%}.bad{color:#b7312c;font-weight:600}.good{color:#276749;font-weight:600}\
code{background:#edf2f7;padding:0 .2em}
"""


@dataclass
class Section:
    title: str
    parts: list[tuple[str, Any]] = field(default_factory=list)  # ("text"|"table"|"image"|"html", payload)

    def text(self, s: str) -> "Section":
        self.parts.append(("text", s))
        return self

    def table(self, df: pd.DataFrame, caption: str = "", floatfmt: str = "{:.4g}") -> "Section":
        self.parts.append(("table", (df, caption, floatfmt)))
        return self

    def image(self, path: str | Path, caption: str = "") -> "Section":
        if Path(path).is_file():
            self.parts.append(("image", (Path(path), caption)))
        return self

    def html(self, raw: str) -> "Section":
        self.parts.append(("html", raw))
        return self


def _table_html(df: pd.DataFrame, floatfmt: str) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if v != v else floatfmt.format(v)
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False)
    )
    return f"<div class='tw'><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"


def _table_md(df: pd.DataFrame, floatfmt: str) -> str:
    def fmt(v: Any) -> str:
        return (
            ("" if v != v else floatfmt.format(v))
            if isinstance(v, float)
            else str(v).replace("|", "\\|").replace("\n", " ")
        )

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import sklearn  # sklearn, transformers: heavy, only their versions
    import transformers

    return {
        "safesteer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def hardware() -> str:

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, GPU {gpu}"


def render(
    title: str, sections: list[Section], repro: dict[str, Any], out_dir: str | Path
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained, images embedded) and ``report.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    body, md = [f"<h1>{html.escape(title)}</h1>"], [f"# {title}", ""]
    rep_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in repro.items()
    )
    body.append(f"<div class='repro'><b>Reproducibility</b><table>{rep_rows}</table></div>")
    md += ["## Reproducibility", ""] + [f"- **{k}**: {v}" for k, v in repro.items()] + [""]
    toc = "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections))
    body.append(f"<ol>{toc}</ol>")
    for i, s in enumerate(sections):
        body.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        md += [f"## {s.title}", ""]
        for kind, payload in s.parts:
            if kind == "text":
                body.append(f"<p>{html.escape(payload)}</p>")
                md += [payload, ""]
            elif kind == "html":
                body.append(payload)
            elif kind == "table":
                df, caption, floatfmt = payload
                if caption:
                    body.append(f"<p class='note'>{html.escape(caption)}</p>")
                    md += [f"*{caption}*", ""]
                body.append(_table_html(df, floatfmt))
                md += [_table_md(df, floatfmt), ""]
            elif kind == "image":
                path, caption = payload
                data = base64.b64encode(path.read_bytes()).decode()
                body.append(
                    f"<div class='fig'><img alt='{html.escape(caption)}' "
                    f"src='data:image/png;base64,{data}'/><div "
                    f"class='note'>{html.escape(caption)}</div></div>"
                )
                try:
                    rel = path.resolve().relative_to(out_dir.resolve())
                except ValueError:
                    rel = path
                md += [f"![{caption}]({rel})", ""]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page)
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(md))
    return html_path, md_path
