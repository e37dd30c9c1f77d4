from methods.device import cache_key, compute_device
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.io.store import reuse_or_make
from methods.zoo.pretrain import pretrain_decoder, pretrain_encoder

model = snakemake.params.model
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    corpus = open(snakemake.input.corpus).read().splitlines()
    settings = {**model["architecture"], **model["pretrain"], "max_length": model["max_length"]}
    manifest = Manifest("pretrain", "mlm" if model["arch"] == "encoder" else "causal-lm", settings,
                        seeds={"init_and_data": snakemake.params.seed})

    def make(out):
        if model["arch"] == "encoder":
            losses = pretrain_encoder(corpus, out, seed=snakemake.params.seed, mlm_probability=0.15, device=device,
                                      **settings)
        else:
            losses = pretrain_decoder(corpus, out, seed=snakemake.params.seed, device=device, **settings)
        manifest.write(out, first_loss=losses[0], final_loss=sum(losses[-50:]) / len(losses[-50:]))
        log.info("pre-trained %s: loss %.3f -> %.3f", snakemake.wildcards.model, losses[0], losses[-1])

    # written atomically; with --cache, reused from an identical earlier pre-training (methods/io/store.py)
    reuse_or_make(snakemake.output[0], "pretrain", {"model": model, "seed": snakemake.params.seed, **cache_key(device)},
                  {"corpus": snakemake.input.corpus}, make)
