"""The report's first screen: the claims' verdicts across families, each linking to its family's
section, rendered from a small hand-made claims table (unit), and through Snakemake's own report
of a tiny workflow that includes the real merge_claims rule and report description (slow)."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from classlab.cli import main
from classlab.report.verdicts import family_link, read_claims, report_metadata, verdicts_html

ROOT = Path(__file__).resolve().parents[1]

SUPERVISED = [
    {"family": "supervised", "paper": "P0", "claim": "erm beats the probe", "dataset": "digits", "backbone": "convnet",
     "setting": "", "metric": "top1", "treatment": "erm", "baseline": "linear_probe", "treatment_mean": 0.92,
     "baseline_mean": 0.90, "effect": 0.02, "ci_low": 0.01, "ci_high": 0.03, "n_seeds": 3, "verdict": "holds",
     "treatment_steps": 120, "baseline_steps": 120, "treatment_batch_size": 64, "baseline_batch_size": 64,
     "git_commit": "aaa111"},
]
INCREMENTAL = [
    {"family": "incremental", "paper": "P1", "claim": "iCaRL beats <LwF> & co", "dataset": "fmnist",
     "backbone": "convnet", "setting": "b0inc2", "metric": "last_accuracy", "treatment": "icarl", "baseline": "lwf",
     "treatment_mean": 0.58, "baseline_mean": 0.16, "effect": 0.42, "ci_low": 0.327, "ci_high": 0.513,
     "n_seeds": 3, "verdict": "holds", "treatment_steps": 36, "baseline_steps": "", "treatment_batch_size": 32,
     "baseline_batch_size": "", "git_commit": "aaa111,bbb222-dirty"},
    {"family": "incremental", "paper": "P2", "claim": "DER beats LwF", "dataset": "fmnist", "backbone": "convnet",
     "setting": "b0inc2", "metric": "last_accuracy", "treatment": "der", "baseline": "lwf", "treatment_mean": 0.147,
     "baseline_mean": 0.159, "effect": -0.013, "ci_low": -0.177, "ci_high": 0.151, "n_seeds": 3,
     "verdict": "does not hold", "treatment_steps": "", "baseline_steps": "", "treatment_batch_size": "",
     "baseline_batch_size": "", "git_commit": ""},
    {"family": "incremental", "paper": "P3", "claim": "TEEN raises novel accuracy", "dataset": "fmnist",
     "backbone": "convnet", "setting": "fscil", "metric": "novel_accuracy", "treatment": "teen",
     "baseline": "simplecil", "treatment_mean": 0.5, "baseline_mean": 0.49, "effect": 0.01, "ci_low": "",
     "ci_high": "", "n_seeds": 1, "verdict": "inconclusive", "treatment_steps": "", "baseline_steps": "",
     "treatment_batch_size": "", "baseline_batch_size": "", "git_commit": ""},
]


class _Outline(HTMLParser):
    """The fragment's element sequence, table rows with their cells' text and links."""

    def __init__(self):
        super().__init__()
        self.tags, self.rows, self.links = [], [], []
        self._row = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "tr":
            self._row = {"class": attrs.get("class"), "family": attrs.get("data-family"), "cells": [], "links": []}
        elif tag in ("td", "th") and self._row is not None:
            self._row["cells"].append("")
        elif tag == "a":
            self.links.append(attrs.get("href"))
            if self._row is not None:
                self._row["links"].append(attrs.get("href"))

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._row["cells"]:
            self._row["cells"][-1] += data


def _outline(html: str) -> _Outline:
    parser = _Outline()
    parser.feed(html)
    return parser


@pytest.fixture()
def merged(tmp_path):
    """merge-claims run by hand on two hand-made family tables."""
    inputs = []
    for family, rows in (("supervised", SUPERVISED), ("incremental", INCREMENTAL)):
        path = tmp_path / "tables" / family / "claims.csv"
        path.parent.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(path, index=False)
        inputs.append(str(path))
    out = tmp_path / "claims.csv"
    assert main(["merge-claims", "--inputs", *inputs, "--out", str(out), "--verdicts-html",
                 str(tmp_path / "claims_verdicts.html"), "--report-metadata", str(tmp_path / "meta.yaml")]) == 0
    return tmp_path


def test_merge_keeps_every_row_and_cell_as_written(merged):
    claims = read_claims(merged / "claims.csv")
    assert claims.claim.tolist() == [r["claim"] for r in SUPERVISED + INCREMENTAL]
    # text passes through: no 36 -> 36.0 float round trip, empty budget cells stay empty
    assert claims.treatment_steps.tolist() == ["120", "36", "", ""]
    assert claims.git_commit.tolist()[1] == "aaa111,bbb222-dirty"


def test_verdict_rows_come_first_grouped_by_family_with_links(merged):
    html = (merged / "claims_verdicts.html").read_text()
    outline = _outline(html)
    assert outline.tags.index("table") < outline.tags.index("tr")
    assert outline.tags.count("table") == 1
    kinds = [(r["class"], r["family"]) for r in outline.rows[1:]]  # [0] is the header row
    assert kinds == [("family", "supervised"), ("claim", "supervised"), ("family", "incremental"),
                     ("claim", "incremental"), ("claim", "incremental"), ("claim", "incremental")]
    claim_rows = [r for r in outline.rows if r["class"] == "claim"]
    assert [r["cells"][0] for r in claim_rows] == [r["claim"] for r in SUPERVISED + INCREMENTAL]  # unescaped text
    assert [r["cells"][3] for r in claim_rows] == ["holds", "holds", "does not hold", "inconclusive"]
    assert claim_rows[1]["cells"][1] == "fmnist · convnet · b0inc2"
    assert claim_rows[1]["cells"][2] == "+0.420 [+0.327, +0.513]"
    assert claim_rows[3]["cells"][2] == "+0.010 (1 seed, no interval)"
    for row in outline.rows[1:]:  # every family header and claim links to its own family's section
        assert row["links"] == [family_link(row["family"])]
    assert "<LwF>" not in html and "&lt;LwF&gt;" in html
    assert "aaa111, bbb222-dirty" in html  # the commits behind the rows


def test_metadata_counts_the_verdicts(merged):
    meta = yaml.safe_load((merged / "meta.yaml").read_text())
    assert meta == {"claim rows that hold": 2, "inconclusive": 1, "do not hold": 1}
    assert all(isinstance(v, int) for v in meta.values())  # Snakemake renders strings as docutils parts


def test_an_empty_claims_table_still_renders():
    empty = pd.DataFrame(columns=["family", "claim", "verdict"])
    assert "No claim" in verdicts_html(empty)
    assert report_metadata(empty) == {"claim rows that hold": 0, "inconclusive": 0, "do not hold": 0}


def test_make_run_builds_the_report_that_opens_on_the_verdicts():
    lines = (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0].splitlines()
    report = [line for line in lines if "--report " in line]
    assert len(report) == 1 and "--report-metadata results/report_metadata.yaml" in report[0]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # writer_name, as Snakemake calls it
def test_report_description_opens_with_the_verdicts(merged, monkeypatch):
    """workflow/report/workflow.rst as Snakemake renders it (Jinja, then docutils), from the
    directory that holds results/: the verdict table is the first thing after the title."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    (merged / "results").mkdir()
    (merged / "results" / "claims_verdicts.html").write_text((merged / "claims_verdicts.html").read_text())
    monkeypatch.chdir(merged)

    class Snakemake:
        config = {"datasets": ["digits"], "backbones": ["convnet"], "seeds": [0, 1],
                  "pretrain": {"method": "supervised"}}

    text = Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        (ROOT / "workflow/report/workflow.rst").read_text()).render(snakemake=Snakemake)
    body = publish_parts(text, writer_name="html")["html_body"]
    outline = _outline(body)
    assert outline.tags[:4] == ["div", "h1", "div", "p"]  # document, title, the fragment, its summary
    assert outline.tags.index("table") < outline.tags.index("p", 4)  # the table before the description
    assert body.index('id="claims-verdicts"') < body.index("classlab run over datasets")


# --- the real thing: Snakemake's report of a tiny workflow ---------------------------------------

TINY_SNAKEFILE = """
configfile: "config.yaml"


FAMILIES = {{"supervised": {{}}, "incremental": {{}}}}
ENV = "../../environment.yml"


include: "{root}/workflow/rules/report.smk"


report: "{root}/workflow/report/workflow.rst"


rule all:
    input:
        "results/claims.csv",


rule copy_family_claims:
    input:
        "given/{{family}}.csv",
    output:
        claims="results/tables/{{family}}/claims.csv",
        table=report("results/tables/{{family}}/table.csv", category="{{family}}", subcategory="tables"),
    log:
        "logs/copy_family_claims/{{family}}.log",
    shell:
        "(cp {{input}} {{output.claims}} && cp {{input}} {{output.table}}) > {{log}} 2>&1"
"""


def _script_value(html: str, name: str):
    match = re.search(rf"^\s*var {name} = (.*);\s*$", html, re.MULTILINE)
    assert match, name
    return json.loads(match.group(1))


@pytest.mark.slow
def test_snakemake_report_opens_on_the_verdicts_and_links_resolve(tmp_path):
    from tests.conftest import snakemake

    work = tmp_path / "tiny"
    (work / "given").mkdir(parents=True)
    for family, rows in (("supervised", SUPERVISED), ("incremental", INCREMENTAL)):
        pd.DataFrame(rows).to_csv(work / "given" / f"{family}.csv", index=False)
    (work / "config.yaml").write_text(yaml.safe_dump({"datasets": ["digits"], "backbones": ["convnet"],
                                                      "seeds": [0, 1], "pretrain": {"method": "supervised"}}))
    (work / "Snakefile").write_text(TINY_SNAKEFILE.format(root=ROOT))
    snakemake(work, "-c1", timeout=300)
    # as the Makefile's `run` target makes it
    snakemake(work, "--report", "report.html", "--report-metadata", "results/report_metadata.yaml", timeout=300)
    html = (work / "report.html").read_text()

    desc = _script_value(html, "workflow_desc")
    outline = _outline(desc)
    assert outline.tags[:3] == ["div", "h1", "div"] and "verdicts across families" in desc[:400]
    claim_rows = [r for r in outline.rows if r["class"] == "claim"]
    assert [r["cells"][0] for r in claim_rows] == [r["claim"] for r in SUPERVISED + INCREMENTAL]
    assert desc.index('id="claims-verdicts"') < desc.index("classlab run over datasets")

    # every link of the first screen opens a category that the report has
    categories = _script_value(html, "categories")
    targets = [re.fullmatch(r"javascript:app\.showCategory\('([^']*)'\)", link) for link in outline.links]
    assert targets and all(targets), outline.links
    assert {t.group(1) for t in targets} == {"supervised", "incremental"} <= set(categories)
    assert "app.showCategory" in html  # the report's navigation that the links call

    # with metadata the report opens on the description (verdicts first), not on the DAG
    assert _script_value(html, "metadata") == {"claim rows that hold": 2, "inconclusive": 1, "do not hold": 1}
    assert 'Object.keys(metadata).length > 0' in html and 'this.content = "metadata"' in html
