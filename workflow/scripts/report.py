from pathlib import Path

import pandas as pd

from methods.io.job import job
from methods.report.experiment import write_report
from methods.report.provenance import write_index

with job(snakemake.log[0]) as log:
    params = snakemake.params
    report_dir = Path(snakemake.output.page).parent
    metrics = pd.read_csv(snakemake.input.metrics)
    write_report(metrics, params.experiment, report_dir, list(snakemake.input.diagnostics),
                 results_dir=Path(params.results), paper_dir=Path(params.paper_numbers))
    write_index(params.experiment, report_dir, params.config, metrics)
    log.info("report written to %s", report_dir)
