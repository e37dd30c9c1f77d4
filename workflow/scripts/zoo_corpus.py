from methods.io.checkpoint import atomic_file
from methods.io.job import job
from methods.zoo.tasks import generate_corpus

with job(snakemake.log[0]) as log:
    lines = generate_corpus(snakemake.params.seed, snakemake.params.sentences)
    with atomic_file(snakemake.output[0]) as f:
        f.write("\n".join(lines) + "\n")
    log.info("wrote %d sentences to %s", len(lines), snakemake.output[0])
