"""Aggregate every metric into one tidy table and render the experiment's report."""


rule aggregate:
    input:
        evaluation_targets(),
    output:
        RESULTS + "/metrics.csv",
    log:
        RESULTS + "/logs/aggregate.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


rule report:
    input:
        metrics=RESULTS + "/metrics.csv",
        diagnostics=diagnostics_targets(),
    output:
        table=report(REPORT + "/README.md", category="Tables", caption="../../report/captions/experiment_report.rst"),
        plot=report(REPORT + "/score_vs_drop_rate.png", category="Plots",
                    caption="../../report/captions/score_vs_drop_rate.rst"),
    params:
        experiment=EXP,
    log:
        RESULTS + "/logs/report.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report.py"
