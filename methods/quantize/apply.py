"""Quantize a whole task model with a registered quantizer, and rebuild weights from an artifact.

Which tensors are quantized follows the convention of the GPTQ reference, DiscQuant and the
llm-compressor examples (spec quantization.md §1 "Layers"): the weights of every ``nn.Linear`` inside
a transformer block. Embeddings, the LM head / classifier, norms and biases stay in full precision.
A block is recognised by its module path (``….layer.N.…`` in BERT, ``….layers.N.…`` in Llama,
``….h.N.…`` in GPT-2-style models, ``….blocks.N.…``), so no per-architecture code is needed.

``target="delta"`` quantizes δ = θ − θ_base of those weights instead of θ; the model's effective
weight is then θ_base + decode(codes). That is how quantization composes with delta pruning and
merging: a pruned δ quantized on a grid that represents 0 keeps its zeros (RTN, DiscQuant, NUPES,
GPTQ with ``preserve_zeros``), while StatsQ's mid-rise grid has no zero level.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from methods import registry
from methods.quantize.common import QuantizeContext, QuantizedTensor

BLOCK_PATH = re.compile(r"(^|\.)(layer|layers|h|blocks)\.\d+\.")
TARGETS = ("weights", "delta")


def quantizable(model: torch.nn.Module, exclude: list[str] | None = None) -> list[str]:
    """Weight names of the Linear layers inside transformer blocks, in module order."""
    names = [f"{name}.weight" for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and BLOCK_PATH.search(name)]
    names = [n for n in names if not any(re.search(p, n) for p in exclude or [])]
    if not names:
        raise ValueError("no Linear layer inside a transformer block to quantize (module paths like "
                         "'encoder.layer.0.…' or 'model.layers.0.…' expected)")
    return names


def quantizable_names(checkpoint: str | Path, exclude: list[str] | None = None) -> list[str]:
    """``quantizable`` of the model in a checkpoint directory, without reading its weights: the
    transformers class its config names (``architectures``) built on the meta device."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    architectures = list(getattr(config, "architectures", None) or [])
    model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if model_class is None:
        raise ValueError(f"{checkpoint}: its config.json names no transformers model class (architectures: "
                         f"{architectures}), so the quantized layers cannot be told apart")
    with torch.device("meta"):
        model = model_class(config)
    return quantizable(model, exclude)


def quantize_model(model: torch.nn.Module, method: str, params: dict, *, target: str = "weights",
                   base: dict[str, torch.Tensor] | None = None, batches: list[dict] | None = None,
                   exclude: list[str] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                   is_encoder: bool = True) -> dict[str, QuantizedTensor]:
    """Quantize ``model``'s block Linears (or their deltas against ``base``) with ``method``.

    ``params`` are the method's resolved parameters. Everything computes on ``device``: the model is
    moved there (data-driven methods run it on their calibration batches, which they move there
    too), targets are formed there, and the records come back on the CPU. Data-driven methods may
    change the model's weights while they work (GPTQ writes quantized layers back to propagate their
    error); the model is not meant to be reused afterwards."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {list(TARGETS)}")
    model.to(device)
    state = model.state_dict()
    names = quantizable(model, exclude)
    offsets = None
    if target == "delta":
        if base is None:
            raise ValueError("target 'delta' needs the base model's tensors")
        missing = [n for n in names if n not in base]
        if missing:
            raise KeyError(f"the base has no tensors {missing[:3]} to take the delta against")
        offsets = {n: base[n].to(torch.float32) for n in names}
        targets = {n: state[n].to(torch.float32) - offsets[n].to(state[n].device) for n in names}
    else:
        targets = {n: state[n].to(torch.float32).clone() for n in names}
    context = QuantizeContext(model=model, batches=batches, offsets=offsets, seed=seed, device=device,
                              is_encoder=is_encoder)
    quantized = registry.get("quantize", method).fn(targets, context=context, **params)
    missing = sorted(set(names) - set(quantized))
    if missing:
        raise RuntimeError(f"quantize method {method!r} returned no result for {missing[:3]}")
    return {name: record.cpu() for name, record in quantized.items()}


def materialize(quantized: dict[str, QuantizedTensor], base: dict[str, torch.Tensor] | None = None,
                ) -> dict[str, torch.Tensor]:
    """The float32 weights an artifact stands for: decoded codes, plus the base for delta artifacts."""
    weights = {}
    for name, tensor in quantized.items():
        value = tensor.dequantize()
        if base is not None:
            value = base[name].to(torch.float32) + value
        weights[name] = value
    return weights
