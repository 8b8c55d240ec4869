"""The study report as one self-contained HTML file (`robustune report --html`).

One file that opens from disk in any browser, with no server, no JavaScript and no external resource: the
headline, the leaderboard table, the plots (embedded as base64 data URIs), titled notes (evaluation warnings,
training diagnostics), the study definition, the evaluation protocol, and the versions of the software that
produced it. The module is generic: the caller formats every cell and note; this module only escapes and lays
them out. Only the standard library is used.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
from pathlib import Path
from typing import Any

# The packages whose versions decide the numbers; listed at the foot of the report.
VERSIONED_PACKAGES = ("robustune", "torch", "ray", "mlflow", "optuna")

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 2rem auto;
       max-width: 1400px; padding: 0 1.5rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.5rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.25rem; }
.headline { font-weight: bold; font-size: 1.05rem; background: #f6f8fa; border-left: 4px solid #0969da;
            padding: 0.6rem 0.9rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.9rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 0.35rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #eaeef2; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f6f8fa; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; flex: 1 1 480px; max-width: 780px; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-size: 0.85rem; color: #57606a; }
pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85rem;
      background: #f6f8fa; border: 1px solid #d0d7de; padding: 0.75rem; overflow-x: auto; }
.versions { font-size: 0.85rem; color: #57606a; }
"""


def render_html(*, title: str, headline: str, header: list[str], cells: list[list[Any]], notes: list[str],
                sections: list[tuple[str, list[str]]], images: list[Path], definition: str, protocol: str) -> str:
    """The report as HTML text.

    header: the table's column titles; cells: one list per row, in the header's order, each value shown as text
    (None as "-"), so the caller formats numbers and intervals. notes: paragraphs under the table. sections: (title,
    bullet items) pairs, e.g. ("Evaluation warnings", [...]); an empty one is left out. images: picture files,
    embedded in the file. definition: the study definition (YAML); protocol: the evaluation protocol.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_text(title)}</h1>",
        f'<p class="headline">{_text(headline)}</p>',
        _table(header, cells),
        *(f"<p>{_text(note)}</p>" for note in notes),
    ]
    if images:
        parts += ["<h2>Plots</h2>", '<div class="figures">', *(_figure(path) for path in images), "</div>"]
    for section_title, items in sections:
        if items:
            parts += [f"<h2>{_text(section_title)}</h2>", "<ul>", *(f"<li>{_text(item)}</li>" for item in items),
                      "</ul>"]
    parts += ["<h2>Evaluation protocol</h2>", f"<pre>{_text(protocol)}</pre>",
              "<h2>Study definition</h2>", f"<pre>{_text(definition)}</pre>",
              "<h2>Versions</h2>", _versions(), "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_html(path: Path, **report: Any) -> Path:
    """Write render_html(**report) to `path` (a local file: inside storage.staging for an object store)."""
    path = Path(path)
    path.write_text(render_html(**report), encoding="utf-8")
    return path


def package_versions() -> dict[str, str]:
    """The installed version of each of VERSIONED_PACKAGES, "not installed" for a missing one."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _text(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _table(header: list[str], cells: list[list[Any]]) -> str:
    for row in cells:
        if len(row) != len(header):
            raise ValueError(f"a table row has {len(row)} cells for {len(header)} columns: {row!r}")
    titles = "".join(f"<th>{_text(title)}</th>" for title in header)
    body = ["<tr>" + "".join(f"<td>{_text(value)}</td>" for value in row) + "</tr>" for row in cells]
    # The wrapper scrolls a wide table sideways instead of widening the whole page.
    return "\n".join(['<div class="table-wrap"><table>', f"<thead><tr>{titles}</tr></thead>", "<tbody>", *body,
                      "</tbody>", "</table></div>"])


def _figure(path: Path) -> str:
    path = Path(path)
    media_type = IMAGE_TYPES.get(path.suffix.lower())
    if media_type is None:
        raise ValueError(f"{path}: cannot embed a {path.suffix or 'suffix-less'} file; "
                         f"use one of {', '.join(sorted(IMAGE_TYPES))}")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:{media_type};base64,{data}" alt="{_text(path.stem)}">'
            f"<figcaption>{_text(path.name)}</figcaption></figure>")


def _versions() -> str:
    items = "".join(f"<li>{_text(name)} {_text(version)}</li>" for name, version in package_versions().items())
    return f'<ul class="versions">{items}</ul>'
