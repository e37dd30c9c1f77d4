from pathlib import Path

import pandas as pd

from methods.io.job import job
from methods.report.experiment import write_report

with job(snakemake.log[0]) as log:
    table, plot = Path(snakemake.output.table), Path(snakemake.output.plot)
    metrics = pd.read_csv(snakemake.input.metrics)
    write_report(metrics, snakemake.params.experiment, table, plot, list(snakemake.input.diagnostics))
    log.info("report written to %s", table.parent)
