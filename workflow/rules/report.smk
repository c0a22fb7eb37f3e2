# One claims table from every family's, and the report's first screen (the verdicts across
# families, included by workflow/report/workflow.rst); `snakemake --report results/report.html
# --report-metadata results/report_metadata.yaml` renders the rest (see the Makefile's `run`).


rule merge_claims:
    input:
        expand("results/tables/{family}/claims.csv", family=list(FAMILIES)),
    output:
        claims=report("results/claims.csv", caption="../report/claims.rst", category="claims"),
        verdicts="results/claims_verdicts.html",
        metadata="results/report_metadata.yaml",
    log:
        "logs/merge_claims.log",
    conda:
        ENV
    shell:
        "classlab merge-claims --inputs {input} --out {output.claims} --verdicts-html {output.verdicts} "
        "--report-metadata {output.metadata} > {log} 2>&1"
