"""The zero-shot classifier: the template ensemble, and bounded memory at ImageNet's 80,000 prompts."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from harness.zeroshot import class_text_embeddings, zero_shot_weights

# A fresh interpreter builds the 1,000-class x 80-template classifier with a
# tiny text tower and reports how much its peak resident memory grew. In one
# batch, the 80,000 prompts need several GB even for this tower.
_IMAGENET_CLASSIFIER = """
import json, resource, torch, open_clip
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from harness.backbones import Backbone
torch.manual_seed(0)
clip = open_clip.CLIP(
    embed_dim=16,
    vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
    text_cfg=open_clip.CLIPTextCfg(context_length=77, width=32, heads=2, layers=1),
).eval().requires_grad_(False)
backbone = Backbone("tiny", "none", "-", clip, clip.visual, open_clip.get_tokenizer("ViT-B-32"), None)
templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = backbone.zero_shot_classifier(list(IMAGENET_CLASSNAMES), templates)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"shape": list(weights.shape), "grown_mb": grown / 1024,
                  "norms": weights.norm(dim=1).tolist(), "requires_grad": weights.requires_grad}))
"""


def test_imagenet_sized_classifier_has_bounded_peak_memory():
    out = subprocess.run([sys.executable, "-c", _IMAGENET_CLASSIFIER], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1000, 16]
    assert not result["requires_grad"]
    assert all(abs(n - 1) < 1e-5 for n in result["norms"])
    # one 80,000-prompt batch grows the peak by several GB for this tower; 1,024-prompt batches by ~0.2 GB
    assert result["grown_mb"] < 1024, result["grown_mb"]


def test_batched_weights_equal_one_batch_and_class_order(embedded_backbone, embedded_dataset):
    """Batching by classes changes nothing: every class's templates share one forward."""
    clip, tokenizer = embedded_backbone.clip, embedded_backbone.tokenizer
    names, templates = embedded_dataset.classnames, embedded_dataset.templates
    with torch.no_grad():
        whole = class_text_embeddings(clip, tokenizer, names, templates)
    one_batch = zero_shot_weights(clip, tokenizer, names, templates, progress=False)
    assert torch.equal(one_batch, whole)  # the embedded default: one batch, bit-identical
    per_class = zero_shot_weights(clip, tokenizer, names, templates, prompts_per_batch=1, progress=False)
    assert per_class.shape == whole.shape
    torch.testing.assert_close(per_class, whole, atol=1e-5, rtol=0)
    # a class is encoded with its own name: swapping two names swaps their rows
    swapped = zero_shot_weights(clip, tokenizer, (names[1], names[0], *names[2:]), templates,
                                prompts_per_batch=len(templates) * 3, progress=False)
    torch.testing.assert_close(swapped[:2], whole[[1, 0]], atol=1e-5, rtol=0)
    assert not torch.allclose(whole[0], whole[1], atol=1e-3)


# --- --templates ------------------------------------------------------------------------------------------


def test_templates_by_name_or_file(tmp_path):
    import pytest

    from harness.errors import ConfigError
    from harness.prompts import SIMPLE_TEMPLATES, prompt_templates

    own = ("a {} garment.",)
    assert prompt_templates(None, own) == own
    assert prompt_templates("simple", own) == SIMPLE_TEMPLATES and len(SIMPLE_TEMPLATES) == 5
    openai = prompt_templates("openai", own)
    assert len(openai) == 80 and openai[0] == "a bad photo of a {}."
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\n\na sketch of a {}.\n  a {} on a shelf.  \n", encoding="utf-8")
    assert prompt_templates(str(path), own) == ("a sketch of a {}.", "a {} on a shelf.")
    for text, message in (("a photo.\n", "needs exactly one {}"), ("a {} {}\n", "needs exactly one {}"),
                          ("a {0} {}\n", "needs exactly one {}"), ("# only a comment\n", "no templates")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            prompt_templates(str(path), own)
    with pytest.raises(ConfigError, match="not openai or simple, and no such file"):
        prompt_templates(str(tmp_path / "absent.txt"), own)


def test_templates_change_the_classifier_and_are_recorded(tmp_path):
    from harness.config import HarnessConfig
    from harness.session import Session

    sessions = {name: Session(HarnessConfig(limit=8, templates=name, cache_dir=str(tmp_path)), progress=False)
                for name in (None, "simple")}
    own, simple = (sessions[name].classifier.weight for name in (None, "simple"))
    assert own.shape == simple.shape and not torch.allclose(own, simple)
    described = sessions["simple"].describe()["dataset"]
    assert described["templates"] == {"name": "simple", "count": 5}
    assert sessions[None].describe()["dataset"]["templates"]["name"] == "dataset"
    assert described["split_sizes"] == {"heads": 8, "gate": 8, "test": 8}
