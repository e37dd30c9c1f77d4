from methods.io.checkpoint import atomic_file
from methods.io.job import job
from methods.report.aggregate import records_to_frame

with job(snakemake.log[0]) as log:
    frame = records_to_frame(list(snakemake.input))
    with atomic_file(snakemake.output[0]) as f:
        frame.to_csv(f, index=False)
    log.info("%d metric rows from %d evaluations", len(frame), len(snakemake.input))
