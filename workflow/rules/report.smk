"""Aggregate every metric into one tidy table and render the experiment's report."""


rule aggregate:
    input:
        evaluation_targets(),
    output:
        RESULTS + "/metrics.csv",
    resources:
        **job_resources("light"),
    log:
        RESULTS + "/logs/aggregate.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


def report_outputs() -> dict:
    """The report page, its tables in LaTeX and HTML, and one PNG + PDF per plot; the PNGs and the
    page are also registered for `snakemake --report`."""
    outputs = {
        "page": report(REPORT + "/README.md", category="Tables", caption="../../report/captions/experiment_report.rst"),
        "index": REPORT + "/index.md",
        "tables": directory(REPORT + "/tables"),
    }
    if config.get("paper"):  # a paper reproduction: the paper's own tables (methods/report/paper.py)
        outputs["paper"] = REPORT + "/paper.md"
    plots = report_plots()
    for plot in plots:
        outputs[plot] = report(f"{REPORT}/{plot}.png", category="Plots", caption=f"../../report/captions/{plot}.rst")
        outputs[plot + "_pdf"] = f"{REPORT}/{plot}.pdf"
    return outputs


rule report:
    input:
        metrics=RESULTS + "/metrics.csv",
        diagnostics=diagnostics_targets(),
    output:
        **report_outputs(),
    params:
        experiment=EXP,
        config=dict(config),
        results=RESULTS,
        paper_numbers=str(REPO / "report" / "paper_numbers"),
    resources:
        **job_resources("light"),
    log:
        RESULTS + "/logs/report.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/report.py"
