"""Data-driven settings of a pruning method: the step between a config's variant and the
registered per-tensor function, for the methods whose parameters depend on the model's data.

* ``importance`` needs per-input-feature activation norms: collected on calibration inputs (train
  split, labels unused) with forward hooks (``methods.prune.calibration``).
* ``darex-q`` and ``structural`` rescale survivors by 1/q, and DAREx gives several rules for q
  (``q_rule`` in the config, spec dpp_merge.md §2.2):

  ========================  ==============================================================  ==========
  rule                      q                                                               data
  ========================  ==============================================================  ==========
  ``fixed``                 ``q`` (one value, or ``{drop rate: q}``)                        none
  ``validation``            one global q, coarse-to-fine scan of the task's headline        labelled
                            metric on the validation split (``scan_global_q``; ``examples``
                            caps the rows scored, a seeded subsample)
  ``output-change``         one global q minimising the change of the outputs on            unlabelled
                            validation inputs (encoders: mean |Δ last hidden state|;
                            decoders: top-5 logit MSE), same scan
  ``analytic``              per-layer q from the DAREx bound, η scanned on validation        labelled
  ``learned``               per-layer q by gradient descent on the output change             unlabelled
  ``mse-optimal``           closed-form per-neuron q* = (1−p) + p·S2/S1² at the mean         unlabelled
                            calibration input (spec §2.1), a data-light baseline             (few)
  ========================  ==============================================================  ==========

Scans run on the job's own mask seed (the official label-free objective also averages four
mask seeds; configurable as ``mask_seeds``). Everything chosen is returned as a record for the
manifest, with every score the scan saw.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from methods.data.jsonl import read_jsonl, write_jsonl
from methods.data.splits import subsample
from methods.finetune.batching import batch_to, encode_texts, encoder_batch
from methods.finetune.train import decoder_prompt
from methods.prune.apply import excluded, prune_state_dict
from methods.prune.calibration import collect_input_stats, input_means, input_norms
from methods.prune.darex import (analytic_q, darex_q_delta, darex_q_params, learn_layer_q, mean_abs_change,
                                 mean_without_outlier, mse_optimal_q, scan_global_q, top_k_mse)
from methods.prune.dare import keep_mask
from methods.tasks import TaskSpec

Q_RULES = ("fixed", "validation", "output-change", "analytic", "learned", "mse-optimal")
Q_METHODS = ("darex-q", "structural")   # methods whose survivors are rescaled by 1/q
DATA_DRIVEN = ("importance", *Q_METHODS)  # methods whose parameters PruneFitter chooses from data
CALIBRATION_EXAMPLES = 128                # train rows whose inputs give activation statistics


@dataclass
class TaskData:
    """What a data-driven rule may look at: the fine-tuned model's task and its data files."""
    spec: TaskSpec
    checkpoint: Path                 # the fine-tuned checkpoint (its head, its tokenizer)
    validation: Path                 # labelled validation split (jsonl)
    calibration: Path                # train split: inputs only
    batch_size: int
    max_length: int
    calibration_examples: int = CALIBRATION_EXAMPLES


def _encode_batches(tokenizer, spec: TaskSpec, rows: list[dict], batch_size: int, max_length: int,
                    hidden_states: bool) -> list[dict]:
    """Unlabelled model inputs of a task's rows, batched: the encoder's text fields, or the
    decoder's prompt (what the model sees before it answers)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if spec.is_encoder:
            batch = encoder_batch(encode_texts(tokenizer, spec.text_fields, chunk, max_length), tokenizer.pad_token_id)
            if hidden_states:
                batch["output_hidden_states"] = True
        else:
            batch = dict(tokenizer([decoder_prompt(spec, row) for row in chunk], add_special_tokens=False,
                                   padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        batches.append(batch)
    return batches


def input_batches(tokenizer, spec: TaskSpec, path: Path, limit: int | None, batch_size: int, max_length: int,
                  hidden_states: bool = False, sample_seed: int = 0) -> list[dict]:
    """Batched model inputs of (a seeded subsample of ``limit``) rows of a task split; labels unused."""
    rows = calibration_rows(path, limit, sample_seed)
    return _encode_batches(tokenizer, spec, rows, batch_size, max_length, hidden_states)


def calibration_rows(path: Path, limit: int | None, sample_seed: int = 0) -> list[dict]:
    """``limit`` rows of a split drawn by ``sample_seed``; seed 0 keeps the draw of the releases
    before calibration seeds existed, so their published numbers still reproduce."""
    keys = ("prune-calibration", str(Path(path).name)) + ((sample_seed,) if sample_seed else ())
    return subsample(read_jsonl(path), limit, *keys)


class OutputChange:
    """Label-free objective: how far the pruned model's outputs move from the fine-tuned model's on
    the same inputs (the official ``get_outpuchage``: encoders, mean |Δ| of the last hidden state;
    decoders, ``find_q_decoder.py``: MSE of the top-5 logits)."""

    def __init__(self, model, batches: list[dict], encoder: bool):
        self.model, self.encoder = model, encoder
        # moved once: every candidate q runs the same batches (the reference outputs stay there too)
        device = next(model.parameters()).device
        self.batches = [batch_to(batch, device) for batch in batches]
        self.reference = [self._outputs(b) for b in self.batches]

    @torch.inference_mode()
    def _outputs(self, batch: dict) -> torch.Tensor:
        out = self.model(**batch)
        if self.encoder:
            mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
            return out.hidden_states[-1].to(torch.float32) * mask  # padding positions count as 0 change
        return out.logits.to(torch.float32)

    def __call__(self) -> float:
        changes = []
        for batch, reference in zip(self.batches, self.reference):
            output = self._outputs(batch)
            change = mean_abs_change(output, reference) if self.encoder else top_k_mse(output, reference, 5)
            changes.append(float(change))
        return float(np.mean(changes))


class PruneFitter:
    """Chooses the data-dependent parameters of one pruning job (see the module docstring).

    Computes on ``device``: the task model is loaded there, candidate prunings and deltas are
    computed there, and so are the per-neuron q's of ``mse-optimal`` (its pruner moves them to
    whatever device it prunes on). ``base`` and ``finetuned`` may stay on the CPU."""

    def __init__(self, data: TaskData, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                 exclude: list[str], mask_seed: int, *, device: str | torch.device = "cpu"):
        from methods.evaluate.run import load_task_model

        self.data, self.base, self.finetuned = data, base, finetuned
        self.exclude, self.mask_seed, self.device = exclude, mask_seed, device
        self.model, self.tokenizer = load_task_model(data.checkpoint, data.spec, device=device)
        self._calibration_stats = None
        self._subsets: dict[int, Path] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- data ------------------------------------------------------------------------------
    def _batches(self, path: Path, limit: int | None, hidden_states: bool) -> list[dict]:
        return input_batches(self.tokenizer, self.data.spec, path, limit, self.data.batch_size, self.data.max_length,
                             hidden_states)

    def calibration_stats(self):
        if self._calibration_stats is None:
            batches = self._batches(self.data.calibration, self.data.calibration_examples, hidden_states=False)
            self._calibration_stats = collect_input_stats(self.model, batches)
        return self._calibration_stats

    def pruned_deltas(self) -> dict[str, torch.Tensor]:
        """δ of every tensor the pruning touches (floating, in the base, not excluded), float32 on the
        fitter's device."""
        return {name: weight.to(self.device, torch.float32) - self.base[name].to(self.device, torch.float32)
                for name, weight in self.finetuned.items()
                if weight.is_floating_point() and name in self.base and not excluded(name, self.exclude)}

    # -- scoring ---------------------------------------------------------------------------
    def _load(self, state: dict[str, torch.Tensor]) -> None:
        from methods.evaluate.run import apply_overrides

        apply_overrides(self.model, state, "candidate pruning")

    def validation_file(self, limit: int | None) -> Path:
        """The validation split, or a seeded subsample of ``limit`` rows, written once (a scan scores
        it many times)."""
        if limit is None:
            return self.data.validation
        if limit not in self._subsets:
            rows = read_jsonl(self.data.validation)
            if len(rows) <= limit:
                self._subsets[limit] = self.data.validation
            else:
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="prune-fit-")
                path = Path(self._tmp.name) / f"validation-{limit}.jsonl"
                write_jsonl(subsample(rows, limit, "prune-validation", str(self.data.validation)), path)
                self._subsets[limit] = path
        return self._subsets[limit]

    def validation_score(self, state: dict[str, torch.Tensor], limit: int | None = None) -> float:
        from methods.evaluate.run import evaluate_task

        self._load(state)
        metrics, _, _ = evaluate_task(self.model, self.tokenizer, self.data.spec, self.validation_file(limit),
                                      self.data.batch_size, self.data.max_length)
        return metrics[self.data.spec.primary]

    def restore(self) -> None:
        self._load(self.finetuned)

    # -- the rules -------------------------------------------------------------------------
    def fit(self, method: str, params: dict, q_rule: dict | None, drop_rate: float):
        """(params for the registered method, or a per-tensor pruner replacing it; record)."""
        if method == "importance":
            norms = input_norms(self.calibration_stats())
            return {**params, "norms": norms}, None, {"calibration_examples": self.data.calibration_examples,
                                                      "calibrated_linears": len(norms)}
        if method not in Q_METHODS:
            if q_rule:
                raise ValueError(f"q_rule applies to {list(Q_METHODS)}, not {method}")
            return params, None, {}
        rule = dict(q_rule or {"rule": "fixed"})
        name = rule.pop("rule")
        if name not in Q_RULES:
            raise ValueError(f"q_rule.rule {name!r} is not one of {list(Q_RULES)}")
        keep = 1.0 - drop_rate
        if drop_rate == 0.0 or drop_rate == 1.0:
            return params, None, {"q_rule": name, "note": "p = 0 or 1: q has no effect"}

        def state_for(method_params: dict, seed: int | None = None) -> dict[str, torch.Tensor]:
            return prune_state_dict(self.base, self.finetuned, method, {**params, **method_params},
                                    self.mask_seed if seed is None else seed, self.exclude, device=self.device)[0]

        if name == "fixed":
            q = rule.get("q", params.get("q"))
            if isinstance(q, dict):
                key = next((k for k in q if math.isclose(float(k), drop_rate)), None)
                if key is None:
                    raise ValueError(f"q_rule.q gives no q for drop rate {drop_rate:g}; rates: {list(q)}")
                q = q[key]
            if q is None and method == "darex-q":
                raise ValueError("q_rule fixed needs q (a number, or a mapping drop rate -> q)")
            return {**params, "q": None if q is None else float(q)}, None, {"q_rule": name, "q": q}

        if name in ("validation", "output-change"):
            lower = float(rule.get("lower", keep))
            upper = float(rule.get("upper", min(1.0, 10 * keep)))
            step = float(rule.get("step", (upper - lower) / 4))
            maximize = name == "validation"
            if maximize:
                def objective(q: float) -> float:
                    return self.validation_score(state_for({"q": q}), rule.get("examples"))
            else:
                change = OutputChange(self.model, self._batches(self.data.validation, rule.get("examples", 256),
                                                                hidden_states=self.data.spec.is_encoder),
                                      self.data.spec.is_encoder)
                seeds = rule.get("mask_seeds", [self.mask_seed])

                def objective(q: float) -> float:
                    values = []
                    for seed in seeds:
                        self._load(state_for({"q": q}, seed))
                        values.append(change())
                    return mean_without_outlier(values)
            result = scan_global_q(objective, lower, upper, step, maximize=maximize)
            self.restore()
            return {**params, "q": result.best}, None, {
                "q_rule": name, "q": result.best, "scan": {f"{q:g}": s for q, s in result.scores.items()},
                "objective": "validation " + self.data.spec.primary if maximize else "output change (minimised)",
                "dare_q": keep}

        if name == "analytic":
            means = input_means(self.calibration_stats())
            deltas = self.pruned_deltas()

            def layer_q(eta: float) -> dict:
                return darex_q_params(analytic_q(deltas, means, drop_rate, eta))

            result = scan_global_q(lambda eta: self.validation_score(state_for(layer_q(eta)), rule.get("examples")),
                                   float(rule.get("eta_lower", 0.1)), float(rule.get("eta_upper", 1.5)),
                                   float(rule.get("eta_step", 0.35)))
            self.restore()
            chosen = layer_q(result.best)
            return {**params, **chosen}, None, {"q_rule": name, "eta": result.best,
                                                "scan": {f"{e:g}": s for e, s in result.scores.items()},
                                                "mean_q": chosen["q"]}

        if name == "learned":
            deltas = self.pruned_deltas()
            masks = {n: keep_mask(d.shape, drop_rate, self.mask_seed, n) for n, d in deltas.items()}
            encoder = self.data.spec.is_encoder
            batches = self._batches(self.data.calibration, self.data.calibration_examples, hidden_states=encoder)
            steps = int(rule.get("steps", 50))
            learned = learn_layer_q(self.model, self.base, deltas, masks, batches, drop_rate=drop_rate,
                                    target="last_hidden_state" if encoder else "logits",
                                    loss="mean-abs" if encoder else "top5-mse", lr=float(rule.get("lr", 1e-2)),
                                    t_max=steps, epochs=math.ceil(steps / len(batches)), max_steps=steps)
            self.restore()
            chosen = darex_q_params(learned.layer_q)
            return {**params, **chosen}, None, {"q_rule": name, "mean_q": chosen["q"],
                                                "first_loss": learned.train_losses[0],
                                                "last_loss": learned.train_losses[-1],
                                                "dare_loss": learned.initial_loss}

        # mse-optimal: a q per output neuron at the mean calibration input
        if method != "darex-q":
            raise ValueError("q_rule mse-optimal gives a q per neuron, which only darex-q applies")
        means = input_means(self.calibration_stats())
        deltas = self.pruned_deltas()
        row_q: dict[str, torch.Tensor] = {}
        for weight_name, mean in means.items():
            if weight_name in deltas and deltas[weight_name].dim() == 2:
                bias_name = weight_name[:-len("weight")] + "bias"
                q = mse_optimal_q(deltas[weight_name], mean, drop_rate, deltas.get(bias_name), per_row=True,
                                  tensor_name=weight_name)
                row_q[weight_name] = q.unsqueeze(1)
                if bias_name in deltas:
                    row_q[bias_name] = q
        finite = torch.cat([q.reshape(-1) for q in row_q.values()]) if row_q else torch.tensor([keep])
        finite = finite[torch.isfinite(finite)]
        fallback = float(finite.mean()) if finite.numel() else keep
        pruner = per_tensor_q_pruner(row_q, fallback)
        return params, pruner, {"q_rule": name, "neurons": int(sum(q.numel() for q in row_q.values())),
                                "mean_finite_q": fallback,
                                "dropped_neurons": int(sum((~torch.isfinite(q)).sum() for q in row_q.values()))}


def per_tensor_q_pruner(row_q: dict[str, torch.Tensor], fallback: float) -> Callable:
    """A ``darex-q`` pruner with a q tensor per tensor (broadcast over its rows) and one q for the
    rest (embeddings, LayerNorm): how a per-neuron q reaches the delta."""
    def prune(delta: torch.Tensor, *, drop_rate: float, mask_seed: int, tensor_name: str, **_):
        return darex_q_delta(delta, drop_rate, mask_seed, tensor_name, row_q.get(tensor_name, fallback))
    return prune
