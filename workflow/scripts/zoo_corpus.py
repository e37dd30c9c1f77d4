from methods.io.checkpoint import atomic_file
from methods.io.job import job
from methods.zoo.tasks import generate_corpus

with job(snakemake.log[0]) as log:
    # The held-out text (perplexity) is drawn from its own stream, the corpus from the original one.
    purpose = getattr(snakemake.params, "purpose", "corpus")
    lines = generate_corpus(snakemake.params.seed, snakemake.params.sentences, purpose)
    with atomic_file(snakemake.output[0]) as f:
        f.write("\n".join(lines) + "\n")
    log.info("wrote %d %s sentences to %s", len(lines), purpose, snakemake.output[0])
