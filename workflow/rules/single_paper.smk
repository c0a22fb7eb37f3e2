# Family `single_paper`: each method brings its own protocol (its YAML's scenario_kinds): icl_gd's
# in-context linear regression, mil's bags of images, aspl's pool-based active learning. One job per
# method x seed; then the tables, the figures and the claims.


wildcard_constraints:
    sp_method=_alternatives(SINGLE_PAPER.get("methods") or ["none"]),


rule run_single_paper:
    input:
        unpack(single_paper_inputs),
    output:
        metrics="results/eval/single_paper/{sp_method}/seed{seed}/metrics.json",
    params:
        data=single_paper_data_option,
        overrides=single_paper_overrides,
    log:
        "logs/run_single_paper/{sp_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "classlab single-paper --method {wildcards.sp_method} {params.data} --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/eval/single_paper/{wildcards.sp_method}/seed{wildcards.seed} --no-progress > {log} 2>&1"


rule plot_single_paper:
    input:
        metrics=single_paper_metrics(),
    output:
        figures=report(single_paper_figure_targets(), caption="../report/single_paper_figures.rst",
                       category="single_paper", subcategory="figures"),
    params:
        figure_dir=output_folder,
    log:
        "logs/plot_single_paper.log",
    conda:
        ENV
    shell:
        "classlab plot-single-paper --metrics {input.metrics} --figure-dir {params.figure_dir} > {log} 2>&1"


rule aggregate_single_paper:
    input:
        metrics=single_paper_metrics(),
        claims="config/claims/single_paper.yaml",
    output:
        runs="results/tables/single_paper/runs.csv",
        summary=report("results/tables/single_paper/summary.csv", caption="../report/single_paper_summary.rst",
                       category="single_paper", subcategory="tables"),
        markdown="results/tables/single_paper/summary.md",
        claims="results/tables/single_paper/claims.csv",
    log:
        "logs/aggregate_single_paper.log",
    conda:
        ENV
    shell:
        "classlab aggregate-single-paper --metrics {input.metrics} --runs-csv {output.runs} "
        "--summary-csv {output.summary} --summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"
