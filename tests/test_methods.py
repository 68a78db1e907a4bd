from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.policy import LayerView, create_method
from methods.confidence import confidence_score


class _NoFeatures(LayerView):
    def _compute(self, name):
        raise AssertionError("crafted test: no features needed")


def _logits_for(predictions: list[int], num_classes: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float() * 5


def test_pabee_counter_and_exit_layer_on_crafted_predictions(monkeypatch):
    # per sample, the top class after blocks 1..6
    sequences = {
        "steady": [1, 1, 1, 1, 1, 1],     # counter 0,1,2 -> exits after block 3
        "late": [1, 2, 2, 3, 3, 3],       # counter 0,0,1,0,1,2 -> exits after block 6
        "flipping": [0, 1, 0, 1, 0, 1],   # never agrees -> never exits
    }
    policy = create_method("pabee", patience=2, exit_layers=tuple(range(1, 7)))
    crafted = {layer: _logits_for([seq[layer - 1] for seq in sequences.values()]) for layer in range(1, 7)}
    monkeypatch.setattr(policy, "layer_logits", lambda layer, view: crafted[layer][torch.from_numpy(view.rows)])
    policy.start_batch(3)
    active = np.arange(3)
    exits = {}
    for layer in range(1, 7):
        decision = policy.decide(layer, _NoFeatures(layer, active))
        leaving = decision.exit.numpy()
        for row in active[leaving]:
            exits[int(row)] = layer
            assert decision.logits[list(active).index(row)].argmax() == crafted[layer][row].argmax()
        active = active[~leaving]  # exited samples leave, as in the drivers
    assert exits == {0: 3, 1: 6}


def test_pabee_weights_deeper_heads_more():
    policy = create_method("pabee")
    assert policy.loss_weights([2, 5, 9]) == {2: 1.0, 5: 2.0, 9: 3.0}


def test_confidence_scores_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    logits = probs.log()
    torch.testing.assert_close(confidence_score(logits, "maxprob"), torch.tensor([0.5, 1 / 3]))
    torch.testing.assert_close(confidence_score(logits, "margin"), torch.tensor([0.2, 0.0]))
    entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    torch.testing.assert_close(confidence_score(logits, "entropy"),
                               torch.tensor([1 - entropy / math.log(3), 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="score must be one of"):
        confidence_score(logits, "vibes")


def test_head_feature_must_exist():
    with pytest.raises(ValueError, match="feature='attention': must be one of 'cls', 'patch_mean'"):
        create_method("confidence", feature="attention")


def test_methods_with_one_head_recipe_train_the_heads_once(tmp_path, count_calls):
    import methods._heads as heads_module  # trains through harness.heads.train_heads, imported there
    from harness.config import HarnessConfig
    from harness.session import Session

    trained = count_calls(heads_module, "train_heads")
    ctx = Session(HarnessConfig(limit=64, batch_size=32, cache_dir=str(tmp_path)), progress=False)
    cls_ee = create_method("cls-ee", epochs=1)
    cls_ee.fit(ctx.fit_context())
    confidence = create_method("confidence", epochs=1, score="entropy", threshold=0.5)
    confidence.fit(ctx.fit_context())
    assert trained["n"] == 1  # same feature, layers, recipe and seed: cached
    for (name, a), (_, b) in zip(cls_ee.heads.state_dict().items(), confidence.heads.state_dict().items()):
        assert torch.equal(a, b), name
    create_method("pabee", epochs=1).fit(ctx.fit_context())  # other loss weights
    create_method("cls-ee", epochs=1).fit(ctx.fit_context(seed=1))  # another seed
    create_method("cls-ee", epochs=2).fit(ctx.fit_context())  # another recipe
    assert trained["n"] == 4
