"""The report's first screen: every family's claims with their verdicts, before anything else.

``merge-claims`` writes, next to ``results/claims.csv``:

- ``results/claims_verdicts.html``: an HTML fragment, one table of the claims grouped by family
  (claim, setting, effect with its 95% interval, verdict), each family and each claim linking to
  the family's section of the Snakemake report. ``workflow/report/workflow.rst`` (the report's
  description) includes it first, so it opens the report.
- ``results/report_metadata.yaml``: the verdict counts, for ``snakemake --report-metadata``.
  With it the report opens on its description and these counts instead of the workflow DAG,
  which stays one click away under "Workflow".

Links use the report's own navigation (``app.showCategory('<family>')``); a family's tables and
figures are the report category named after the family.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from urllib.parse import quote

import pandas as pd
import yaml

VERDICTS = ("holds", "inconclusive", "does not hold", "not run")
_COLOURS = {"holds": "#15803d", "inconclusive": "#b45309", "does not hold": "#b91c1c", "not run": "#6b7280"}


def read_claims(path: str | Path) -> pd.DataFrame:
    """A claims CSV as text cells (no float round trip: "36" stays "36", empty stays empty)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def merge_claim_tables(paths: list[str | Path]) -> pd.DataFrame:
    """The families' claims tables one after the other, in the order given."""
    frames = [read_claims(p) for p in paths]
    return pd.concat(frames, ignore_index=True).fillna("") if frames else pd.DataFrame()


def family_link(family: str) -> str:
    """The report's link to a category (as Snakemake's own rst links write it)."""
    return f"javascript:app.showCategory('{quote(str(family))}')"


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def effect_text(row) -> str:
    """"+0.190 [-0.005, +0.386]"; one seed has no interval."""
    effect, low, high = (_number(row.get(k)) for k in ("effect", "ci_low", "ci_high"))
    if math.isnan(effect):
        return "-"
    if math.isnan(low) or math.isnan(high):
        return f"{effect:+.3f} ({row.get('n_seeds') or '?'} seed, no interval)"
    return f"{effect:+.3f} [{low:+.3f}, {high:+.3f}]"


def setting_text(row) -> str:
    return " · ".join(str(row.get(k)) for k in ("dataset", "backbone", "setting")
                      if str(row.get(k) or "").strip() and str(row.get(k)) != "nan")


def _counts(claims: pd.DataFrame) -> dict[str, int]:
    verdicts = claims["verdict"].tolist() if "verdict" in claims.columns else []
    return {v: sum(1 for x in verdicts if x == v) for v in VERDICTS}


def verdicts_html(claims: pd.DataFrame) -> str:
    """The first-screen fragment (no <html>/<body>: it is included into the report's description)."""
    esc = html.escape
    counts = _counts(claims)
    families = list(dict.fromkeys(claims["family"])) if len(claims) else []
    out = ['<div id="claims-verdicts">']
    if not families:
        out.append("<p>No claim had both its treatment and its baseline in this run.</p></div>\n")
        return "\n".join(out)
    parts = [f"{counts[v]} {'hold' if v == 'holds' else v.replace('does not', 'do not')}"
             for v in VERDICTS if counts[v]]
    out.append(f"<p>{len(claims)} claim rows from {len(families)} "
               f"famil{'y' if len(families) == 1 else 'ies'}: {esc(', '.join(parts))}. The effect is the "
               "mean paired difference over seeds, positive in the claimed direction, with its 95% "
               "t-interval; click a family or a claim for its tables and figures.</p>")
    out.append('<table class="claims-verdicts">')
    out.append("<thead><tr><th>claim</th><th>setting</th><th>effect [95% CI]</th><th>verdict</th></tr></thead>")
    out.append("<tbody>")
    for family in families:
        rows = claims[claims["family"] == family]
        link = esc(family_link(family), quote=True)
        fam_counts = ", ".join(f"{n} {v}" for v, n in _counts(rows).items() if n)
        out.append(f'<tr class="family" data-family="{esc(family, quote=True)}"><th colspan="4">'
                   f'<a href="{link}">{esc(family)}</a> <small>({esc(fam_counts)})</small></th></tr>')
        for _, row in rows.iterrows():
            verdict = str(row.get("verdict", ""))
            detail = (f"{row.get('treatment', '')} vs {row.get('baseline', '')} on {row.get('metric', '')}: "
                      f"{row.get('treatment_mean', '')} vs {row.get('baseline_mean', '')}, "
                      f"{row.get('n_seeds', '')} seeds; {row.get('paper', '')}")
            out.append(
                f'<tr class="claim" data-family="{esc(family, quote=True)}" data-verdict="{esc(verdict, quote=True)}">'
                f'<td><a href="{link}" title="{esc(detail, quote=True)}">{esc(str(row.get("claim", "")))}</a></td>'
                f"<td>{esc(setting_text(row))}</td><td>{esc(effect_text(row))}</td>"
                f'<td style="color: {_COLOURS.get(verdict, "inherit")}; font-weight: 600">{esc(verdict)}</td></tr>')
    out.append("</tbody></table>")
    commits = sorted({c for cell in claims.get("git_commit", pd.Series(dtype=str)) for c in str(cell).split(",")
                      if c.strip() and c != "nan"})
    if commits:
        out.append(f"<p>Runs behind these rows: git commit {esc(', '.join(commits))}.</p>")
    out.append("</div>\n")
    return "\n".join(out)


def report_metadata(claims: pd.DataFrame) -> dict[str, int]:
    """Verdict counts for ``--report-metadata`` (Snakemake shows numbers as they are)."""
    counts = _counts(claims)
    return {"claim rows that hold": counts["holds"], "inconclusive": counts["inconclusive"],
            "do not hold": counts["does not hold"]}


def write_metadata(path: str | Path, claims: pd.DataFrame) -> None:
    from classlab.io import write_text

    text = ("# verdict counts of results/claims.csv, for `snakemake --report ... --report-metadata` "
            "(written by classlab merge-claims)\n")
    write_text(path, text + yaml.safe_dump(report_metadata(claims), sort_keys=False))
