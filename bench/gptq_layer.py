#!/usr/bin/env python
"""Per-layer GPTQ time: ours (methods/quantize/gptq.py) vs llm-compressor's on the same layer (bench/README.md).

    python bench/gptq_layer.py --shape 1b --workdir /tmp/bench-gptq
    python bench/gptq_layer.py --shape 7b --repeat 1
    python bench/gptq_layer.py --rows 4096 --cols 4096 --actorder

1. Builds Llama-shaped (out, in) float32 weights — ``q_proj`` (h×h), ``up_proj`` (mlp×h), ``down_proj``
   (h×mlp) — drawn from N(0, 0.02²) with a few outlier input columns (×10), and for each input size a
   Hessian ``H = 2XXᵀ/n`` of ``--tokens`` correlated random inputs (a random mixing matrix plus the identity,
   three input features scaled ×15). Building them is not timed.
2. For each layer runs, on identical inputs (fresh clones per run, cloning not timed), our
   ``gptq_layer(W, H, spec, blocksize, percdamp, actorder, static_groups=True)`` and llm-compressor's
   ``quantize_weight(W[None], H[None], scale, zero_point, None, args, blocksize, percdamp)`` with the group
   parameters its min-max weight observer computes (compressed-tensors' ``calculate_qparams`` on the per-group
   min/max of W, computed before the timed call, as llm-compressor does). Their up-front observer groups match
   our ``static_groups=True``; their ``actorder="static"`` is our ``actorder=True``. Scales are float32 on both
   sides (no ``scale_dtype`` rounding), so only the algorithms are compared.
3. Times each one ``--repeat`` times after a warm-up (the fastest run is reported, every run is in the JSON),
   and reports the reconstruction loss ½tr((W−Q)H(W−Q)ᵀ) of both and the fraction of weights that landed
   on different grid points.

Prints a Markdown table and writes it with the raw numbers to
``<workdir>/results-<shape>-<bits>bit-<scheme>-g<group>[-actorder]-t<threads>.json``. Without llm-compressor
(``pip install --no-deps llmcompressor==0.14.0.1`` next to compressed-tensors) only our times are
measured, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from methods.quantize.gptq import gptq_layer  # noqa: E402
from methods.quantize.grids import GridSpec  # noqa: E402

SHAPES = {"1b": (2048, 5632), "7b": (4096, 11008)}   # (hidden, MLP): TinyLlama-1.1B, Llama-2-7B
WARMUP_SHAPE = (256, 512)


# --- the reference (llm-compressor 0.14 / compressed-tensors 0.19) ---------------------------------------

def load_reference():
    """(quantize_weight, compressed_tensors.quantization, versions) or (None, None, reason)."""
    try:
        import compressed_tensors.quantization as ct
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError as error:
        return None, None, f"{type(error).__name__}: {error}"
    from importlib.metadata import version
    return quantize_weight, ct, {"llmcompressor": version("llmcompressor"),
                                 "compressed-tensors": version("compressed-tensors")}


def their_args(ct, bits: int, scheme: str, group_size: int, actorder: bool):
    strategy = "channel" if group_size == -1 else "group"
    return ct.QuantizationArgs(num_bits=bits, type="int", symmetric=(scheme == "sym-full"), strategy=strategy,
                               group_size=None if group_size == -1 else group_size,
                               actorder="static" if actorder else None)


def their_qparams(w: torch.Tensor, args, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What their min-max weight observer computes: per-row or per-group min/max of the original W."""
    from compressed_tensors.quantization.utils import calculate_qparams
    rows, cols = w.shape
    width = cols if group_size == -1 else group_size
    grouped = w.reshape(rows, cols // width, width)
    return calculate_qparams(grouped.amin(dim=2), grouped.amax(dim=2), args)


# --- inputs ------------------------------------------------------------------------------------------------

def sample_weight(rows: int, cols: int, seed: int, outlier_columns: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, torch.randperm(cols, generator=g)[:outlier_columns]] *= 10.0
    return w


def correlated_hessian(n_in: int, tokens: int, seed: int) -> torch.Tensor:
    """H = 2XXᵀ/n of X = (M/√n_in + I)·N(0, 1)^(n_in×tokens), three input features ×15 (tests' inputs)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    x = mixing @ torch.randn(n_in, tokens, generator=g)
    del mixing
    x[torch.randperm(n_in, generator=g)[:3]] *= 15.0
    return 2.0 * (x @ x.t()) / tokens


def reconstruction_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """½tr((W−Q)H(W−Q)ᵀ): D·H in float32 (a float64 product at 7B sizes takes minutes on two cores), the
    final sum in float64."""
    diff = w - q
    return float(0.5 * (diff.matmul(h).double() * diff.double()).sum())


# --- runs ----------------------------------------------------------------------------------------------------

def run_ours(w, h, spec, args):
    W, H = w.clone(), h.clone()
    start = time.perf_counter()
    record, _ = gptq_layer(W, H, spec, blocksize=args.blocksize, percdamp=args.percdamp, actorder=args.actorder,
                           static_groups=True)
    seconds = time.perf_counter() - start
    return seconds, record


def run_theirs(quantize_weight, w, h, scale, zero_point, qargs, args):
    W, H = w.clone()[None], h.clone()[None]   # their working buffers (overwritten in place)
    start = time.perf_counter()
    q, _, fallback = quantize_weight(W, H, scale[None], zero_point[None], None, qargs, blocksize=args.blocksize,
                                     percdamp=args.percdamp)
    seconds = time.perf_counter() - start
    if bool(fallback.any()):
        raise RuntimeError("llm-compressor fell back to RTN (Cholesky failed)")
    return seconds, q[0]


def layers_of(args) -> list[tuple[str, int, int]]:
    if args.rows or args.cols:
        if not (args.rows and args.cols):
            raise SystemExit("--rows and --cols go together")
        return [(f"{args.rows}x{args.cols}", args.rows, args.cols)]
    h, mlp = SHAPES[args.shape]
    return [("q_proj", h, h), ("up_proj", mlp, h), ("down_proj", h, mlp)]


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="Llama size preset (hidden, MLP)")
    p.add_argument("--rows", type=int, help="one (rows × cols) layer instead of the preset's three")
    p.add_argument("--cols", type=int)
    p.add_argument("--layers", help="comma-separated subset of q_proj,up_proj,down_proj")
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind H")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--scheme", choices=("asym", "sym-full"), default="asym")
    p.add_argument("--group-size", type=int, default=128, help="-1 = per channel")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--actorder", action="store_true", help="ours actorder=True, theirs actorder='static'")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per implementation and layer (best of N)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--ours-only", action="store_true", help="skip llm-compressor even if installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/bench-gptq")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    spec = GridSpec(args.bits, args.scheme, args.group_size, "float32")
    quantize_weight, ct, versions = (None, None, "--ours-only") if args.ours_only else load_reference()
    layers = layers_of(args)
    if args.layers:
        wanted = args.layers.split(",")
        layers = [layer for layer in layers if layer[0] in wanted]
    label = f"{args.rows}x{args.cols}" if args.rows else args.shape
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    setting = (f"{args.bits}-bit {args.scheme}, group size {args.group_size}, blocksize {args.blocksize}, "
               f"percdamp {args.percdamp}, actorder {args.actorder}, static groups, float32 scales, "
               f"{args.tokens} tokens, CPU float32, torch {torch.__version__}, {torch.get_num_threads()} threads "
               f"({os.cpu_count()} cores), best of {args.repeat}")
    print(f"# GPTQ per layer, {label}: {setting}", flush=True)
    if quantize_weight is None:
        why = "skipped (--ours-only)" if args.ours_only else f"is not importable ({versions})"
        print(f"**llm-compressor {why}: only our times are measured.**", flush=True)
    else:
        print(f"reference: llmcompressor {versions['llmcompressor']}, compressed-tensors "
              f"{versions['compressed-tensors']}", flush=True)

    def prepare(rows, cols, seed_w, seed_h, hessians):
        if cols not in hessians:
            start = time.perf_counter()
            hessians[cols] = correlated_hessian(cols, args.tokens, args.seed * 1000 + seed_h)
            print(f"  H {cols}×{cols} built in {time.perf_counter() - start:.1f} s (not timed)", flush=True)
        w = sample_weight(rows, cols, args.seed * 1000 + seed_w)
        if quantize_weight is None:
            return w, hessians[cols], None, None, None
        qargs = their_args(ct, args.bits, args.scheme, args.group_size, args.actorder)
        start = time.perf_counter()
        scale, zero_point = their_qparams(w, qargs, args.group_size)
        observer = time.perf_counter() - start
        return w, hessians[cols], qargs, (scale, zero_point), observer

    if not args.no_warmup:   # library loading, thread pools, allocator: one small layer through both
        w, h, qargs, qp, _ = prepare(*WARMUP_SHAPE, 99, 99, {})
        start = time.perf_counter()
        run_ours(w, h, spec, args)
        if quantize_weight is not None:
            run_theirs(quantize_weight, w, h, *qp, qargs, args)
        print(f"warm-up ({WARMUP_SHAPE[0]}×{WARMUP_SHAPE[1]}, both) {time.perf_counter() - start:.1f} s", flush=True)

    hessians: dict[int, torch.Tensor] = {}
    results = []
    for index, (name, rows, cols) in enumerate(layers):
        w, h, qargs, qp, observer = prepare(rows, cols, index, 1000 + cols, hessians)
        entry = {"layer": name, "rows": rows, "cols": cols, "ours_s": [], "theirs_s": [],
                 "their_observer_s": observer}
        ours = theirs = None
        for run in range(args.repeat):
            seconds, record = run_ours(w, h, spec, args)
            entry["ours_s"].append(seconds)
            load = os.getloadavg()[0]
            print(f"  {name} {rows}×{cols} ours   run {run + 1}: {seconds:.2f} s (load {load:.1f})", flush=True)
            if ours is None:
                ours = record.dequantize()
            del record
            if quantize_weight is not None:
                seconds, q = run_theirs(quantize_weight, w, h, *qp, qargs, args)
                entry["theirs_s"].append(seconds)
                load = os.getloadavg()[0]
                print(f"  {name} {rows}×{cols} theirs run {run + 1}: {seconds:.2f} s (load {load:.1f})", flush=True)
                if theirs is None:
                    theirs = q
                del q
        entry["ours_loss"] = reconstruction_loss(w, ours, h)
        entry["ours_best_s"] = min(entry["ours_s"])
        if theirs is not None:
            entry["theirs_loss"] = reconstruction_loss(w, theirs, h)
            entry["theirs_best_s"] = min(entry["theirs_s"])
            entry["ratio"] = entry["ours_best_s"] / entry["theirs_best_s"]
            entry["loss_rel_diff"] = (entry["ours_loss"] - entry["theirs_loss"]) / entry["theirs_loss"]
            entry["differing_fraction"] = float((ours != theirs).float().mean())
        results.append(entry)
        del ours, theirs, w

    print()
    print(f"{label}: {setting}")
    print()
    if quantize_weight is not None:
        lines = ["| layer | shape (out×in) | ours s | llm-compressor s | ours / theirs | loss ours | loss theirs "
                 "| loss (ours − theirs) / theirs | weights on other grid points |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for e in results:
            lines.append(f"| {e['layer']} | {e['rows']}×{e['cols']} | {fmt(e['ours_best_s'])} | "
                         f"{fmt(e['theirs_best_s'])} | {fmt(e['ratio'])} | {e['ours_loss']:.6g} | "
                         f"{e['theirs_loss']:.6g} | {e['loss_rel_diff']:+.1e} | "
                         f"{100 * e['differing_fraction']:.3f}% |")
    else:
        lines = ["| layer | shape (out×in) | ours s | loss ours |", "|---|---|---|---|"]
        for e in results:
            lines.append(f"| {e['layer']} | {e['rows']}×{e['cols']} | {fmt(e['ours_best_s'])} | {e['ours_loss']:.6g} |")
        lines.append("")
        lines.append(f"llm-compressor not measured ({versions}).")
    table = "\n".join(lines)
    print(table)
    out = workdir / (f"results-{label}-{args.bits}bit-{args.scheme}-g{args.group_size}"
                     f"{'-actorder' if args.actorder else ''}-t{torch.get_num_threads()}.json")
    out.write_text(json.dumps({
        "args": vars(args), "setting": setting, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "machine": platform.platform(), "torch": torch.__version__,
        "reference": versions, "results": results, "table": table,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))
    print(f"\nraw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
