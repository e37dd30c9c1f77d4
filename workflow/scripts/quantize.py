from pathlib import Path

from methods import registry
from methods.device import compute_device
from methods.evaluate.run import load_task_model
from methods.io.checkpoint import align_names, atomic_dir, load_state_dict
from methods.io.job import job
from methods.io.manifest import Manifest
from methods.prune.fit import input_batches
from methods.quantize.apply import quantize_model
from methods.quantize.artifact import save_artifact
from methods.tasks import get_task

wc, params, inputs = snakemake.wildcards, snakemake.params, snakemake.input
with job(snakemake.log[0], snakemake.threads) as log:
    device = compute_device()
    log.info("computing on %s", device)
    variant = params.variant
    method = variant["method"]
    method_params = registry.get("quantize", method).resolve({**variant.get("params", {}), "bits": int(wc.bits)},
                                                             "params")
    spec = get_task(wc.task)
    model, tokenizer = load_task_model(inputs.source, spec, device=device)
    base = None
    if variant["target"] == "delta":
        base = align_names(load_state_dict(params.base), model.state_dict(), f"quantize {wc.model}/{wc.task}")
    batches = input_batches(tokenizer, spec, Path(inputs.calibration), variant["calibration_examples"],
                            params.batch_size, params.max_length, sample_seed=int(wc.cseed))
    manifest = Manifest("quantize", method, {**method_params, "target": variant["target"]},
                        {"source": inputs.source}, seeds={"calibration": int(wc.cseed)})
    quantized = quantize_model(model, method, method_params, target=variant["target"], base=base, batches=batches,
                               exclude=variant.get("exclude"), is_encoder=spec.is_encoder, device=device)
    with atomic_dir(snakemake.output.artifact) as out:
        bits = save_artifact(out, quantized, load_state_dict(inputs.source), manifest.record)
        manifest.write(out, bits=bits, tensors={name: q.info for name, q in quantized.items()})
    log.info("%s %s-bit (%s): %d tensors, %.4f bits per quantized parameter, %.4f per model parameter",
             method, wc.bits, variant["target"], len(quantized), bits["quantized_bpp"], bits["model_bpp"])
