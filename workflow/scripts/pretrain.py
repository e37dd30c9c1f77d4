from methods.io.checkpoint import atomic_dir
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.zoo.pretrain import pretrain_decoder, pretrain_encoder

model = snakemake.params.model
with job(snakemake.log[0], snakemake.threads) as log:
    corpus = open(snakemake.input.corpus).read().splitlines()
    settings = {**model["architecture"], **model["pretrain"], "max_length": model["max_length"]}
    manifest = Manifest("pretrain", "mlm" if model["arch"] == "encoder" else "causal-lm", settings,
                        seeds={"init_and_data": snakemake.params.seed})
    with atomic_dir(snakemake.output[0]) as out:
        if model["arch"] == "encoder":
            losses = pretrain_encoder(corpus, out, seed=snakemake.params.seed, mlm_probability=0.15, **settings)
        else:
            losses = pretrain_decoder(corpus, out, seed=snakemake.params.seed, **settings)
        manifest.write(out, first_loss=losses[0], final_loss=sum(losses[-50:]) / len(losses[-50:]))
    log.info("pre-trained %s: loss %.3f -> %.3f", snakemake.wildcards.model, losses[0], losses[-1])
