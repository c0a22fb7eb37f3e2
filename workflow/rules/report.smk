# One claims table from every family's; `snakemake --report results/report.html` renders the rest.


rule merge_claims:
    input:
        expand("results/tables/{family}/claims.csv", family=list(FAMILIES)),
    output:
        report("results/claims.csv", caption="../report/claims.rst", category="claims"),
    log:
        "logs/merge_claims.log",
    conda:
        ENV
    shell:
        "classlab merge-claims --inputs {input} --out {output} > {log} 2>&1"
