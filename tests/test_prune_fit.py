"""The data-driven step of pruning (methods/prune/fit.py) on a tiny encoder: every q rule gives a
usable q, the scans never do worse than DARE's q on their own objective, importance gets norms."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from methods.data.jsonl import write_jsonl
from methods.io.checkpoint import load_state_dict
from methods.prune.apply import DEFAULT_EXCLUDE, prune_state_dict
from methods.prune.fit import PruneFitter, TaskData
from methods.tasks import get_task
from methods.zoo.models import build_encoder, build_encoder_tokenizer
from methods.zoo.tasks import generate_task

P = 0.9


@pytest.fixture(scope="module")
def fitter(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    tokenizer = build_encoder_tokenizer(32)
    torch.manual_seed(0)
    build_encoder(tokenizer, 32, 1, 2, 64, 32).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=2)
    with torch.no_grad():  # a "fine-tuned" model: the base plus a small random delta
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(root / "ft")
    tokenizer.save_pretrained(root / "ft")
    splits = generate_task("zoo-sentiment", 0, {"train": 64, "validation": 40, "test": 10})
    write_jsonl(splits["validation"], root / "validation.jsonl")
    write_jsonl(splits["train"], root / "train.jsonl")
    data = TaskData(get_task("zoo-sentiment"), root / "ft", root / "validation.jsonl", root / "train.jsonl",
                    batch_size=16, max_length=32, calibration_examples=32)
    return PruneFitter(data, load_state_dict(root / "base"), load_state_dict(root / "ft"),
                       DEFAULT_EXCLUDE["encoder"], mask_seed=0)


def test_fixed_q_per_drop_rate_and_a_clear_error(fitter):
    params, pruner, record = fitter.fit("darex-q", {"drop_rate": P}, {"rule": "fixed", "q": {0.5: 0.6, 0.9: 0.3}}, P)
    assert params["q"] == 0.3 and pruner is None and record["q_rule"] == "fixed"
    with pytest.raises(ValueError, match="no q for drop rate 0.9"):
        fitter.fit("darex-q", {"drop_rate": P}, {"rule": "fixed", "q": {0.5: 0.6}}, P)


def test_validation_scan_is_never_worse_than_dare_on_validation(fitter):
    params, _, record = fitter.fit("darex-q", {"drop_rate": P}, {"rule": "validation"}, P)
    scan = {float(q): s for q, s in record["scan"].items()}
    assert math.isclose(min(scan), 1 - P) and 1 - P <= params["q"] <= 1.0
    assert scan[round(params["q"], 10)] >= scan[min(scan)]  # the best seen >= DARE's q = 1 - p


def test_label_free_scan_minimises_the_output_change(fitter):
    params, _, record = fitter.fit("darex-q", {"drop_rate": P}, {"rule": "output-change", "examples": 16}, P)
    scan = {float(q): s for q, s in record["scan"].items()}
    assert scan[round(params["q"], 10)] == min(scan.values())
    assert params["q"] > 1 - P  # at p = 0.9, 1/(1-p) over-amplifies: a larger q moves outputs less


def test_per_layer_rules_give_q_per_tensor(fitter):
    analytic, _, record = fitter.fit("darex-q", {"drop_rate": P}, {"rule": "analytic", "eta_step": 0.7}, P)
    assert analytic["q_per_tensor"] and "eta" in record
    learned, _, record = fitter.fit("darex-q", {"drop_rate": P}, {"rule": "learned", "steps": 4}, P)
    assert all(q >= 1 - P for q in learned["q_per_tensor"].values()) and len(learned["q_per_tensor"]) > 0


def test_mse_optimal_q_per_neuron_prunes_through_its_own_pruner(fitter):
    params, pruner, record = fitter.fit("darex-q", {"drop_rate": P}, {"rule": "mse-optimal"}, P)
    assert pruner is not None and record["neurons"] > 0 and record["mean_finite_q"] >= 1 - P
    state, stats = prune_state_dict(fitter.base, fitter.finetuned, "darex-q", params, 0, fitter.exclude, pruner)
    assert all(torch.isfinite(t).all() for t in state.values())
    assert any(s["pruned"] for s in stats.values())


def test_importance_gets_calibration_norms_for_every_linear(fitter):
    params, _, record = fitter.fit("importance", {"drop_rate": P}, None, P)
    linears = [n for n, m in fitter.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(params["norms"]) == {f"{n}.weight" for n in linears} and record["calibrated_linears"] == len(linears)
    state, _ = prune_state_dict(fitter.base, fitter.finetuned, "importance", params, 0, fitter.exclude)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    delta = state[name] - fitter.base[name]
    assert int((delta != 0).sum(1).max()) == delta.shape[1] - int(P * delta.shape[1])  # exact count per row


def test_q_rule_on_a_method_without_q_is_refused(fitter):
    with pytest.raises(ValueError, match="q_rule applies to"):
        fitter.fit("magnitude", {"drop_rate": P}, {"rule": "validation"}, P)


def test_calibration_seeds_draw_different_samples_and_seed_zero_is_unchanged(tmp_path):
    from methods.data.splits import subsample
    from methods.prune.fit import calibration_rows

    path = tmp_path / "train.jsonl"
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    draws = [calibration_rows(path, 20, seed) for seed in range(3)]
    assert draws[0] == subsample(rows, 20, "prune-calibration", "train.jsonl")  # the draw before seeds existed
    assert all(len(d) == 20 for d in draws) and draws[0] != draws[1] != draws[2]
    assert calibration_rows(path, 20, 1) == draws[1]
