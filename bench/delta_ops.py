#!/usr/bin/env python
"""Benchmark the streaming delta operations against the I/O floor and mergekit (bench/README.md).

    python bench/delta_ops.py --params 1e9 --models 2 --shard-gb 1 --workdir /tmp/bench --keep

1. Generates (or reuses) a random Llama-shaped checkpoint set: a base and ``--models`` fine-tuned
   models (base + small Gaussian noise), bfloat16, vocabulary 32000, untied LM head, sharded
   into files of at most ``--shard-gb`` GB with safetensors' ``save_file`` and a transformers
   index, plus a transformers ``config.json`` that mergekit understands.
2. Runs every operation in a fresh subprocess, one at a time, after ``sync`` and dropping the
   page cache (root only), so each reads its inputs from disk and its peak RSS is its own
   (``os.wait4``'s rusage of that child). Wall time runs from the start of the process to the
   end of a ``sync`` after it exits, so output still in the page cache is not free.
3. Prints a Markdown table: wall time, peak RSS, ratio to the I/O floor with the same inputs
   and ratio to mergekit's corresponding method, and writes it with the raw numbers to
   ``<workdir>/results-<params>.json``.

Operations: ``floor-1`` / ``floor-N`` read base + 1 / base + N models with safetensors
(``safe_open(...).get_tensor`` for every tensor of every input) and write one model with
``save_file`` per shard, nothing else; ``floor-ours-N`` does the same with our reader and writer
(methods/io/streaming.py); ``dare`` = our DARE of one model (p = 0.9, rescale 1/(1−p));
``ta`` = our task arithmetic of N models; ``ties`` / ``ties-tensor`` = our TIES (paper
semantics, density 0.2) with the official model-level trim / per-tensor trim; ``dq`` = our
streamed delta quantization of one model (RTN, 4 bits, asymmetric, groups of 128, the block
Linears; the rest passes through into the artifact); ``mk-dare``,
``mk-ta``, ``mk-ties`` = ``mergekit-yaml`` with ``dare_linear`` (1 model, density 1 − p),
``task_arithmetic`` and ``ties`` (density 0.2, weights 1, normalize true).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VOCAB = 32000
HIDDEN_SIZES = (512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192)
OURS = ("floor-1", "floor-N", "floor-ours-N", "dare", "ta", "ties", "ties-tensor", "dq")
MERGEKIT = ("mk-dare", "mk-ta", "mk-ties")
DEFAULT_OPS = ("floor-1", "floor-N", "dare", "ta", "ties", "ties-tensor", "mk-dare", "mk-ta", "mk-ties")
FLOOR_OF = {"dare": "floor-1", "mk-dare": "floor-1", "dq": "floor-1"}  # everything else: floor-N
MERGEKIT_OF = {"dare": "mk-dare", "ta": "mk-ta", "ties": "mk-ties", "ties-tensor": "mk-ties"}
GPU_PEAK = "peak GPU memory GB: "


# --- the checkpoint set ------------------------------------------------------------------------

def llama_shape(params: float, hidden: int | None = None, layers: int | None = None) -> dict:
    """Hidden size, MLP size and depth of a Llama (multi-head attention, untied head, vocab 32000)
    with about ``params`` parameters: the hidden size whose depth is closest to hidden/100 (the
    depth-to-width ratio of the Llama family), unless given."""
    def build(h: int, n_layers: int | None) -> dict:
        inter = 256 * math.ceil(8 * h / 3 / 256)
        per_layer = 4 * h * h + 3 * h * inter + 2 * h
        fixed = 2 * VOCAB * h + h
        n_layers = n_layers or max(1, round((params - fixed) / per_layer))
        return {"hidden_size": h, "intermediate_size": inter, "num_hidden_layers": n_layers,
                "num_attention_heads": max(1, h // 64), "parameters": fixed + n_layers * per_layer}
    if hidden:
        return build(hidden, layers)
    candidates = [build(h, layers) for h in HIDDEN_SIZES]
    return min(candidates, key=lambda s: (abs(s["num_hidden_layers"] - s["hidden_size"] / 100)
                                          + (1e9 if s["num_hidden_layers"] < 2 else 0)
                                          + 10 * abs(math.log(s["parameters"] / params))))


def tensor_list(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    names = [("model.embed_tokens.weight", (VOCAB, h))]
    for layer in range(n):
        p = f"model.layers.{layer}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
    return names


def config_json(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
            "num_hidden_layers": shape["num_hidden_layers"], "num_attention_heads": shape["num_attention_heads"],
            "num_key_value_heads": shape["num_attention_heads"], "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def generate(root: Path, shape: dict, n_models: int, shard_bytes: int, sigma: float, seed: int,
             device: str = "cpu") -> None:
    """base ~ N(0, 0.02²) (norm weights 1), model_t = base + N(0, sigma²), all bfloat16, each tensor
    drawn from a generator seeded by (seed, model, tensor), on ``device`` (a GPU draws a 7B set in
    seconds, where one CPU core takes minutes; its numbers differ from the CPU's)."""
    import torch
    from safetensors.torch import save_file

    from methods.seeding import derive_seed

    def generator(*parts):
        return torch.Generator(device=device).manual_seed(derive_seed(*parts))

    def randn(shape, g):
        return torch.randn(shape, generator=g, device=device)

    models = ["base"] + [f"ft_{t}" for t in range(n_models)]
    tensors = tensor_list(shape)
    groups, current, size = [], [], 0   # the same shard layout for every model
    for name, s in tensors:
        nbytes = 2 * math.prod(s)
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))] \
        if len(groups) > 1 else ["model.safetensors"]
    shapes = dict(tensors)
    for model in models:
        (root / model).mkdir(parents=True, exist_ok=True)
        (root / model / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    for group, file in zip(groups, files):
        shard = {m: {} for m in models}
        for name in group:
            g = generator("bench-base", seed, name)
            if name.endswith("norm.weight"):
                base = 1 + 0.01 * randn(shapes[name], g)
            else:
                base = 0.02 * randn(shapes[name], g)
            shard["base"][name] = base.to(torch.bfloat16).cpu()
            for model in models[1:]:
                noise = randn(shapes[name], generator("bench-delta", seed, model, name))
                shard[model][name] = (base + sigma * noise).to(torch.bfloat16).cpu()
            del base
        for model in models:
            save_file(shard[model], root / model / file, metadata={"format": "pt"})
        del shard
    if len(groups) > 1:
        weight_map = {name: file for group, file in zip(groups, files) for name in group}
        total = sum(2 * math.prod(s) for _, s in tensors)
        for model in models:
            (root / model / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def ensure_set(args) -> tuple[Path, dict]:
    shape = llama_shape(args.params, args.hidden, args.layers)
    spec = {"shape": shape, "models": args.models, "shard_bytes": int(args.shard_gb * 1e9), "sigma": args.sigma,
            "seed": args.seed, "dtype": "bfloat16", "vocab": VOCAB}
    if args.device != "cpu":  # drawn there: other numbers than the CPU's
        spec["generated_on"] = args.device
    root = Path(args.workdir) / f"set-{shape['parameters'] / 1e9:.3f}B-{args.models}m"
    if (root / "spec.json").exists() and json.loads((root / "spec.json").read_text()) == spec:
        print(f"reusing the checkpoint set in {root}", flush=True)
        return root, spec
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    print(f"generating {shape['parameters'] / 1e9:.3f}B parameters x {args.models + 1} models in {root} ...",
          flush=True)
    # in a subprocess: this process must stay small, since a child's peak RSS as reported by
    # wait4 includes the RSS of the parent it was forked from
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "generate", "--root", str(root),
                    "--spec", json.dumps(spec)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    (root / "spec.json").write_text(json.dumps(spec, indent=2))
    print(f"generated in {time.perf_counter() - start:.0f} s", flush=True)
    return root, spec


# --- operations (each runs in its own process: ``delta_ops.py op NAME ...``) ---------------------

def _models(root: Path, n: int) -> list[Path]:
    return [root / f"ft_{t}" for t in range(n)]


def op_floor(root: Path, out: Path, n: int, shard_bytes: int) -> None:
    """Read base + n models with safe_open (every tensor of every input), write the base's
    tensors as one model with save_file per shard: safetensors and nothing else."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def handles(path: Path):
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        return [safe_open(str(path / f), "pt") for f in files]

    inputs = [handles(p) for p in [root / "base"] + _models(root, n)]
    out.mkdir(parents=True)
    shard, size, count, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, count
        count += 1
        name = f"model-{count:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for base_file, *model_files in zip(*inputs):
        for name in base_file.keys():
            tensor = base_file.get_tensor(name)
            for f in model_files:
                f.get_tensor(name)
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:
                flush()
            shard[name] = tensor
            size += nbytes
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def op_floor_ours(root: Path, out: Path, n: int, shard_bytes: int, chunk: int | None) -> None:
    """The floor with our reader and writer: every chunk of every input read, the base's written
    (``chunk`` elements at a time; None: the streamed operations' CPU default)."""
    from methods.io.streaming import LazyCheckpoint, ShardedWriter, chunk_ranges
    from methods.stream import DEFAULT_CHUNK_ELEMENTS, _prefetch

    chunk = chunk or DEFAULT_CHUNK_ELEMENTS

    inputs = [LazyCheckpoint(p) for p in [root / "base"] + _models(root, n)]
    base = inputs[0]
    jobs = [(name, a, b) for name in base.names for a, b in chunk_ranges(base.numel(name), chunk)]
    with ShardedWriter(out, shard_bytes, template_dir=root / "base", check_finite=False) as writer:
        sink = None
        def read(job, buffers):
            name, a, b = job
            return [buffers.read(c, str(i), name, a, b) for i, c in enumerate(inputs)]

        for (name, a, b), chunks in _prefetch(jobs, read, 2):
            if a == 0:
                sink = writer.tensor(name, base.dtype(name), base.shape(name))
            sink.write(chunks[0])
            if b == base.numel(name):
                sink.close()


COMPARE = (("ta", "mk-ta"), ("ties-tensor", "mk-ties"), ("ties", "mk-ties"), ("dare", "mk-dare"))


def op_compare(root: Path, work: Path, pairs: list[tuple[str, str]]) -> dict:
    """How far our outputs are from mergekit's: share of differing elements, max |difference|, and
    ‖ours − theirs‖ / ‖theirs − base‖ (relative to mergekit's merged delta), tensor by tensor."""
    import torch

    from methods.io.streaming import LazyCheckpoint, chunk_ranges

    base = LazyCheckpoint(root / "base")
    report = {}
    for ours_name, theirs_name in pairs:
        ours, theirs = LazyCheckpoint(work / f"out-{ours_name}"), LazyCheckpoint(work / f"out-{theirs_name}")
        differ = total = 0
        max_abs = diff_sq = delta_sq = 0.0
        for name in base.names:
            for a, b in chunk_ranges(base.numel(name), 1 << 22):
                x = ours.read(name, a, b).float()
                y = theirs.read(name, a, b).float()
                z = base.read(name, a, b).float()
                d = x - y
                differ += int(torch.count_nonzero(d))
                total += d.numel()
                max_abs = max(max_abs, float(d.abs().max()))
                diff_sq += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
                delta_sq += float(torch.linalg.vector_norm(y - z, dtype=torch.float64)) ** 2
        report[f"{ours_name} vs {theirs_name}"] = {"differing_fraction": differ / total, "max_abs_difference": max_abs,
                                                  "relative_difference": math.sqrt(diff_sq / max(delta_sq, 1e-300))}
    return report


def run_op(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root, out, n = Path(args.set), Path(args.out), args.models
    shard_bytes = int(args.shard_gb * 1e9)
    if args.name == "compare":
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
        Path(args.out).write_text(json.dumps(op_compare(root, Path(args.work), pairs), indent=2))
        return
    if args.name == "floor-1":
        op_floor(root, out, 1, shard_bytes)
    elif args.name == "floor-N":
        op_floor(root, out, n, shard_bytes)
    elif args.name == "floor-ours-N":
        op_floor_ours(root, out, n, shard_bytes, args.chunk)
    elif args.name == "dare":
        from methods.stream import stream_prune
        stream_prune(root / "base", root / "ft_0", out, "dare",
                     {"drop_rate": args.drop_rate, "rescale": True, "rescale_rule": "inverse-keep"}, args.seed,
                     max_shard_bytes=shard_bytes, chunk_elements=args.chunk, device=args.device)
    elif args.name == "dq":
        from methods.quantize.apply import quantizable_names
        from methods.stream import stream_quantize
        stream_quantize(root / "ft_0", out, "rtn", {"bits": 4, "scheme": "asym", "group_size": 128},
                        quantizable_names(root / "ft_0"), base=root / "base", seed=args.seed, device=args.device)
    else:
        from methods.stream import stream_merge
        models = {f"ft_{t}": root / f"ft_{t}" for t in range(n)}
        method, params = {
            "ta": ("task-arithmetic", {"scale": args.scale}),
            "ties": ("ties", {"density": args.density, "scale": args.scale, "granularity": "model"}),
            "ties-tensor": ("ties", {"density": args.density, "scale": args.scale, "granularity": "tensor"}),
        }[args.name]
        stream_merge(method, root / "base", models, out, params, seed=args.seed, max_shard_bytes=shard_bytes,
                     chunk_elements=args.chunk, device=args.device)
    if args.device != "cpu" and not args.name.startswith("floor"):  # read back by measure()
        print(f"{GPU_PEAK}{torch.cuda.max_memory_allocated() / 1e9:.3f}", flush=True)


def mergekit_config(name: str, root: Path, n: int, args) -> str:
    """mergekit 0.1.5 YAML with our parameters: weights 1, density 1 − p for DARE, λ = scale."""
    import yaml

    if name == "mk-dare":
        models = [{"model": str(root / "ft_0"), "parameters": {"weight": 1.0, "density": 1.0 - args.drop_rate}}]
        method, params = "dare_linear", {"normalize": False}
    elif name == "mk-ta":
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in _models(root, n)]
        method, params = "task_arithmetic", {"normalize": False}
    else:
        models = [{"model": str(p), "parameters": {"weight": 1.0, "density": args.density}} for p in _models(root, n)]
        method, params = "ties", {"normalize": True}
    if args.scale != 1.0:
        params["lambda"] = args.scale
    config = {"merge_method": method, "base_model": str(root / "base"), "models": models, "parameters": params,
              "dtype": args.mergekit_dtype, "out_dtype": "bfloat16"}
    return yaml.safe_dump(config, sort_keys=False)


def mergekit_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("mergekit") is not None


def mergekit_command(config: Path, out: Path, args) -> list[str]:
    if not mergekit_installed():
        raise FileNotFoundError("mergekit is not installed for this Python (pip install mergekit==0.1.5, as the "
                                "test extra does)")
    # its `mergekit-yaml` entry point, run by this Python (wheels unpacked with --target have no scripts)
    return [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(out),
            "--cuda" if args.device != "cpu" else "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer",
            "--no-write-model-card", "--out-shard-size", str(int(args.shard_gb * 1e9)), "-j", str(args.threads),
            "--random-seed", str(args.seed), "--quiet"]


# --- measurement -------------------------------------------------------------------------------

def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class OutOfTime(Exception):
    """An operation still ran at the benchmark's hard time limit and was stopped."""


def measure(command: list[str], log: Path, env: dict | None = None, deadline: float | None = None) -> dict:
    """Run one operation; ``deadline`` (a ``time.perf_counter`` value): stop it there (OutOfTime)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:   # wait4 with a deadline: poll, so that a run past it can be stopped
            pid, status, usage = os.wait4(process.pid, os.WNOHANG if deadline is not None else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise OutOfTime(f"{' '.join(command)} was stopped at the time limit after "
                                f"{time.perf_counter() - start:.0f} s")
            time.sleep(0.05)
    ran = time.perf_counter() - start
    os.sync()
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    gpu = [line for line in log.read_text().splitlines() if line.startswith(GPU_PEAK)]
    return {"wall_s": wall, "process_s": ran, "sync_s": wall - ran, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_gpu_gb": float(gpu[-1][len(GPU_PEAK):]) if gpu else None}


def run(args) -> None:
    started = time.perf_counter()
    root, spec = ensure_set(args)
    work = Path(args.workdir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(OURS) - set(MERGEKIT)
    if unknown:
        raise SystemExit(f"unknown operations {sorted(unknown)}; known: {list(OURS + MERGEKIT)}")
    results: dict[str, dict] = {}
    skipped: list[str] = []
    cold = None
    deadline = started + args.time_limit if args.time_limit else None
    for name in ops:
        if args.time_budget and time.perf_counter() - started > args.time_budget:
            skipped.append(name)
            print(f"{name}: skipped, the time budget of {args.time_budget:.0f} s is spent", flush=True)
            continue
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        if name in MERGEKIT:
            config = work / f"{name}.yaml"
            config.write_text(mergekit_config(name, root, args.models, args))
            command = mergekit_command(config, out, args)
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "op", name, "--set", str(root), "--out", str(out),
                       "--models", str(args.models), "--shard-gb", str(args.shard_gb), "--threads", str(args.threads),
                       "--drop-rate", str(args.drop_rate), "--density", str(args.density), "--scale",
                       str(args.scale), "--seed", str(args.seed), "--device", args.device] + \
                      (["--chunk", str(args.chunk)] if args.chunk else [])
        print(f"{name}: {' '.join(command)}", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        runs = []
        try:
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                if args.drop_caches:
                    cold = drop_caches()
                load = os.getloadavg()[0]
                runs.append({**measure(command, logs / f"{name}.log", env, deadline), "load_before": load})
        except OutOfTime as stopped:
            print(f"  {stopped}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            if not runs:
                skipped.append(name)
                continue
        # the fastest run (the others were slowed by other work on the machine), the largest RSS
        results[name] = {**min(runs, key=lambda r: r["wall_s"]), "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                         "runs": runs}
        results[name]["output_gb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        print(f"  {walls} s, peak RSS {results[name]['peak_rss_gb']:.2f} GB", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    comparison = None
    pairs = [(a, b) for a, b in COMPARE if a in results and b in results]
    if args.compare and args.keep_outputs and pairs:
        target = work / "compare.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "op", "compare", "--set", str(root),
                        "--out", str(target), "--work", str(work), "--pairs", ",".join(f"{a}:{b}" for a, b in pairs)],
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        comparison = json.loads(target.read_text())
    table = render(results, {**spec, "repeat": args.repeat, "device": args.device}, cold)
    if skipped:
        table += f"\n\nskipped or stopped (time budget {args.time_budget} s, limit {args.time_limit} s): " \
                 f"{', '.join(skipped)}"
    if comparison:
        table += "\n\n| ours vs mergekit | differing elements | max abs difference | ‖ours − mk‖ / ‖mk − base‖ |\n" \
                 "|---|---|---|---|\n" + "\n".join(
                     f"| {k} | {v['differing_fraction']:.2%} | {v['max_abs_difference']:.3g} | "
                     f"{v['relative_difference']:.3g} |" for k, v in comparison.items())
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(table)
    target = work / f"results-{spec['shape']['parameters'] / 1e9:.3f}B.json"
    target.write_text(json.dumps({"spec": spec, "args": vars(args), "page_cache_dropped": cold, "skipped": skipped,
                                  "total_s": time.perf_counter() - started,
                                  "parent_peak_rss_gb": parent, "comparison": comparison,
                                  "results": results, "table": table}, indent=2))
    print(f"raw numbers: {target}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def render(results: dict, spec: dict, cold: bool | None) -> str:
    n = spec["models"]
    shape = spec["shape"]
    lines = [f"{shape['parameters'] / 1e9:.3f}B parameters (hidden {shape['hidden_size']}, MLP "
             f"{shape['intermediate_size']}, {shape['num_hidden_layers']} layers, vocab {VOCAB}), bf16, base + {n} "
             f"models, shards ≤ {spec['shard_bytes'] / 1e9:g} GB; page cache "
             f"{'dropped before each run' if cold else 'NOT dropped'}; fastest of {spec.get('repeat', 1)} run(s); "
             f"computing on {spec.get('device', 'cpu')}",
             "",
             "| operation | inputs | wall s | CPU s | peak RSS GB | peak GPU GB | × I/O floor | × mergekit |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        floor = results.get(FLOOR_OF.get(name, "floor-N"))
        mk = results.get(MERGEKIT_OF.get(name, ""))
        inputs = "base + 1" if FLOOR_OF.get(name) == "floor-1" or name == "floor-1" else f"base + {n}"
        ratio_floor = f"{r['wall_s'] / floor['wall_s']:.2f}" if floor and not name.startswith("floor") else "–"
        ratio_mk = f"{r['wall_s'] / mk['wall_s']:.2f}" if mk else "–"
        gpu = f"{r['peak_gpu_gb']:.2f}" if r.get("peak_gpu_gb") is not None else "–"
        lines.append(f"| {name} | {inputs} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_gb']:.2f} | {gpu} | "
                     f"{ratio_floor} | {ratio_mk} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    op = sub.add_parser("op", help="run one operation (used by the benchmark in a subprocess)")
    op.add_argument("name", choices=OURS + ("compare",))
    op.add_argument("--work", help="compare: the benchmark's workdir (outputs out-<op>)")
    op.add_argument("--pairs", help="compare: ours:theirs,...")
    op.add_argument("--set", required=True)
    op.add_argument("--out", required=True)
    for p in (parser, op):
        p.add_argument("--models", type=int, default=2, help="fine-tuned models (merges); DARE uses the first")
        p.add_argument("--shard-gb", type=float, default=1.0, help="max shard size of inputs and outputs, GB")
        p.add_argument("--chunk", type=int, default=None,
                       help="elements per streamed chunk (ours; default: the device's, 2^18 on the CPU)")
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                       help="where ours and mergekit compute (mergekit --cuda); cuda also draws the set there")
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads, ours and mergekit (-j); 1: on 2 cores our reader thread uses the other")
        p.add_argument("--drop-rate", type=float, default=0.9, help="DARE drop rate p (mergekit density 1 − p)")
        p.add_argument("--density", type=float, default=0.2, help="TIES density (fraction kept)")
        p.add_argument("--scale", type=float, default=1.0, help="λ of task arithmetic and TIES")
        p.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=float, default=1e9, help="parameters per model (default 1e9)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: chosen from --params)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: chosen from --params)")
    parser.add_argument("--sigma", type=float, default=1e-3, help="std of the fine-tuning noise")
    parser.add_argument("--workdir", default="/tmp/dcbench-bench")
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS), help=f"comma-separated, from {list(OURS + MERGEKIT)}")
    parser.add_argument("--mergekit-dtype", default="bfloat16", help="mergekit's computation dtype (its `dtype`)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per operation; the table shows the fastest (and the largest peak RSS)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint set for later runs")
    parser.add_argument("--keep-outputs", action="store_true", help="keep every operation's output")
    parser.add_argument("--compare", action="store_true",
                        help="with --keep-outputs: compare our outputs with mergekit's (ta/mk-ta, ties/mk-ties, ...)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds (set generation included) after which no further operation is started")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds (set generation included) at which a running operation is stopped")
    parser.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                        help="do not drop the page cache before each operation")
    gen = sub.add_parser("generate", help="generate a checkpoint set (used by the benchmark in a subprocess)")
    gen.add_argument("--root", required=True)
    gen.add_argument("--spec", required=True, help="the set's spec.json content")
    args = parser.parse_args(argv)
    if args.command == "op":
        run_op(args)
    elif args.command == "generate":
        spec = json.loads(args.spec)
        generate(Path(args.root), spec["shape"], spec["models"], spec["shard_bytes"], spec["sigma"], spec["seed"],
                 spec.get("generated_on", "cpu"))
    else:
        run(args)


if __name__ == "__main__":
    main()
