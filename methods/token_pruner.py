"""A learned token pruner in the spirit of AdaViT/DynamicViT, on the frozen quantized backbone.

After each block of ``prune_after`` a small decision network scores every
patch token still present (LayerNorm -> Linear(width, width/4) -> GELU ->
Linear(width/4, 1)); the CLS token is never scored and never dropped.

Training (the ``heads`` split; the quantized backbone is frozen and no
gradient reaches its weights): keep decisions are Gumbel-sigmoid samples
made hard at 0.5, and they accumulate (a dropped token stays dropped). A
dropped token is *masked*, not removed, so that a batch keeps one shape:
later blocks leave it out of their attention as a key, and its row is zeroed
before every Linear so that per-tensor activation scales come from the
present tokens, as when it is dropped (:func:`masked_block`). The cost of a
draw is the KL divergence from the unpruned quantized model's full-depth
zero-shot logits (the ``heads`` trace) to the pruned ones -- distillation,
not cross-entropy against the labels: the pruner should learn which tokens
the model can do without, not to correct it -- plus ``usage_weight`` times
the squared gap between the sample's kept share of the patch tokens after
pruning block s and ``target_keep ** s``.

Two ways to get a gradient through the hard decisions (``estimator``):

- ``straight-through``: the hard value forward, the relaxed sample's
  gradient backward, through the masked blocks (rounding steps of the
  quantized backbone passed straight through, :func:`_linear`). It
  linearises the effect of a mask in the attention softmax, which grossly
  overstates what a dropped high-attention token would bring back; measured
  on the embedded model in fp32 (1,024 heads images, 3 epochs) it learned to
  keep the background and drop the garment, below a random ranking.
- ``score-function`` (default): REINFORCE on the same hard decisions (a
  token is kept with probability sigmoid(score)); ``samples`` draws per
  image, each against the mean cost of the others. The backbone runs without
  gradient, which is also cheaper.

Inference (the real driver): the tokens are *dropped*. Because a batch must
keep one token count per sample, each pruning block keeps a fixed budget of
``round(keep * N)`` of the N tokens present, ranked by the learned score
(``keep`` is ``target_keep`` unless ``keep_ratio`` says otherwise): the
ranking is learned, the budget is fixed per block, and matched-FLOPs sweeps
vary only the budget of one trained pruner (:meth:`TokenPruner.with_knob`).

A deviation, stated so the comparison with the paper's AdaViT row is read
for what it is: AdaViT also learns to skip attention heads and whole
blocks per image; neither is implemented here. This is DynamicViT-style
token ranking under a fixed per-block budget, the part of AdaViT that
prunes tokens.

Devices: training runs where the backbone is (the random draws stay on the
CPU, so a seed draws the same noise on every device); the trained networks
are kept on the CPU and follow the tokens they score to their device
(:func:`harness.drivers.on_device`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.drivers import on_device
from harness.errors import ConfigError
from harness.options import BLOCKS_BUT_LAST, option
from harness.policy import KEEP_RATIO_GRID, ExitPolicy, FitContext, LayerView, keep_top, register_method
from harness.quantizers._fake import FakeQuantLinear, fused_fake_quantize


@dataclass
class TokenPrunerConfig:
    target_keep: float = option(0.7, above=0, max=1)  # share of the present patch tokens kept per pruning block: usage target and budget
    keep_ratio: float | None = option(None, above=0, max=1)  # inference budget per pruning block if not target_keep (sweeps; no retraining)
    prune_after: tuple[int, ...] = option((3, 6, 9), blocks=True, max=BLOCKS_BUT_LAST)  # prune the tokens leaving these blocks (1-based)
    estimator: str = option("score-function", choices=("score-function", "straight-through"))  # gradient of the hard decisions: "score-function" or "straight-through"
    samples: int = option(2, min=1)  # score-function: decision draws per image; each draw's baseline is the others' mean cost
    epochs: int = option(1, min=1)  # passes over the heads split
    batch_size: int = option(64, min=1)  # images per step
    lr: float = option(3e-3, above=0)  # Adam, decayed to zero on a cosine
    usage_weight: float = option(2.0, min=0)  # weight of the keep-ratio loss (DynamicViT's)
    temperature: float = option(1.0, above=0)  # of the Gumbel-sigmoid (straight-through: the slope of its gradient)


ESTIMATORS = ("score-function", "straight-through")


def keep_count(ratio: float, present: int) -> int:
    """The inference budget: ``round(ratio * present)`` tokens (halves up), at least one.

    Example:
        >>> keep_count(0.7, 49), keep_count(0.7, 34), keep_count(1.0, 49)
        (34, 24, 49)
    """
    return max(1, min(present, math.floor(ratio * present + 0.5 + 1e-9)))


class DecisionNet(nn.Module):
    """Keep score (a logit) of each token: LayerNorm -> Linear(d, d/4) -> GELU -> Linear(d/4, 1)."""

    def __init__(self, width: int, keep_prior: float = 0.5):
        super().__init__()
        hidden = max(1, width // 4)
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # start near the target share: P(keep) = sigmoid(bias) under logistic noise
            self.net[-1].bias.fill_(math.log(keep_prior / (1 - keep_prior)) if 0 < keep_prior < 1 else 0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D] -> keep logits [B, N]."""
        return self.net(tokens).squeeze(-1)

    def flops_per_token(self) -> float:
        return float(sum(2 * m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear)))


# -- training forward: the backbone's blocks with dropped tokens masked as keys ----------------------------


def _float_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dequantized weight and bias of a quantized Linear (torch.ao's methods, torchao's tensor subclasses)."""
    weight = module.weight() if callable(module.weight) else module.weight
    bias = module.bias() if callable(module.bias) else module.bias
    if weight.is_quantized or type(weight) not in (torch.Tensor, nn.Parameter):
        weight = weight.dequantize()
    return weight.float(), None if bias is None else bias.detach().float()


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with a gradient to ``x`` even where the module rounds (straight-through).

    The value is the module's own output; the gradient is that of the
    unrounded linear map: rounding has zero gradient almost everywhere, and
    quantized kernels have none, which would cut every decision off the loss.
    """
    if isinstance(module, FakeQuantLinear):
        rounded = fused_fake_quantize(x.detach(), module.a_bits, dim=-1 if module.per_token else None)
        return F.linear(rounded + (x - x.detach()), module.weight, module.bias)
    if isinstance(module, nn.Linear) and type(module.weight) in (torch.Tensor, nn.Parameter):
        return F.linear(x, module.weight, module.bias)
    with torch.no_grad():
        value = module(x.detach())
    surrogate = F.linear(x, *_float_weights(module))
    return value + (surrogate - surrogate.detach())


def _masked_attention(attn: nn.Module, x: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Self-attention where key j counts with weight ``keep[:, j]`` (0: masked out, 1: as usual).

    A multiplicative mask on the exponentiated scores (DynamicViT's form) so
    that the straight-through gradient of a hard 0/1 decision reaches it; for
    hard masks the value equals attention with -inf on the masked keys.
    ``rows`` [B, T, 1] zeroes the masked tokens' rows before each projection.
    """
    b, t, d = x.shape
    heads = attn.num_heads
    if isinstance(attn, nn.MultiheadAttention):
        qkv = F.linear(x * rows, attn.in_proj_weight, attn.in_proj_bias)
    else:
        qkv = _linear(attn.in_proj, x * rows)
    q, k, v = qkv.reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) * (d // heads) ** -0.5
    shift = scores.detach().masked_fill(keep.detach()[:, None, None, :] == 0, -math.inf).amax(-1, keepdim=True)
    weights = (scores - shift).clamp(max=80.0).exp() * keep[:, None, None, :]  # clamps masked keys only: no inf * 0
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return _linear(attn.out_proj, (weights @ v).transpose(1, 2).reshape(b, t, d) * rows)


def masked_block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` on tokens [B, T, D] with key weights ``keep`` [B, T].

    The rows of masked tokens (``keep`` 0) are zeroed before every Linear, so
    that a quantizer with one activation scale per tensor sets it from the
    present tokens only, as it does when they are dropped (a zero row moves
    neither a symmetric max nor torch's zero-including min/max). The masked
    tokens' own outputs are meaningless and must not be used.
    """
    rows = (keep.detach() != 0).to(x.dtype)[..., None]
    x = x + block.ls_1(_masked_attention(block.attn, block.ln_1(x), keep, rows))
    h = _linear(block.mlp.c_proj, block.mlp.gelu(_linear(block.mlp.c_fc, block.ln_2(x) * rows)) * rows)
    return x + block.ls_2(h)


def _check_backbone(backbone) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    if not all(type(block) is ResidualAttentionBlock for block in backbone.blocks):
        raise TypeError("token-pruner trains through open_clip ResidualAttentionBlocks only (open_clip ViT "
                        "backbones; timm blocks are not supported)")
    if getattr(backbone.visual, "pool_type", "tok") != "tok" or getattr(backbone.visual, "attn_pool", None):
        raise TypeError("token-pruner needs a CLS-pooled vision tower")


def gumbel_sigmoid(logits: torch.Tensor, generator: torch.Generator, temperature: float) -> torch.Tensor:
    """A relaxed Bernoulli(sigmoid(logits)) sample; ``> 0.5`` is the hard decision (keep with P = sigmoid(logits))."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits.device)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)  # logistic noise = difference of Gumbels


def pruned_forward(backbone, images: torch.Tensor, nets: nn.ModuleDict, layers: tuple[int, ...],
                   generator: torch.Generator, temperature: float, straight_through: bool = True,
                   draws: int = 1) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Training forward with hard Gumbel-sigmoid keep decisions after the blocks of ``layers``, ``draws``
    times per image (rows draw-major: row = draw * B + image).

    Returns image embeddings [draws * B, E], each row's kept share of the patch
    tokens after each pruning block ([draws * B] each), and the log-probability
    of all the decisions drawn for a row's tokens still present.
    ``straight_through``: the decisions carry the relaxed sample's gradient
    through the masked backbone; otherwise the backbone runs without any
    gradient (only the log-probability has one, for a score-function update).
    The blocks before the first pruning block see no decision and run as
    they are, without gradient, once per image whatever ``draws``.
    """
    with torch.no_grad():
        x = backbone.embed(images)
        for block in backbone.blocks[:layers[0]]:
            x = block(x)
        x = x.repeat(draws, 1, 1)
    keep = torch.ones(x.shape[:2], device=x.device)
    shares, log_prob = [], torch.zeros(len(x), device=x.device)
    for layer in range(layers[0], backbone.num_blocks + 1):
        if layer > layers[0]:
            with torch.set_grad_enabled(straight_through and torch.is_grad_enabled()):
                x = masked_block(backbone.blocks[layer - 1], x, keep)
        if layer in layers:
            logits = nets[str(layer)](x[:, 1:])
            soft = gumbel_sigmoid(logits, generator, temperature)
            hard = (soft > 0.5).float()
            present = keep[:, 1:].detach()
            log_prob = log_prob + (present * torch.where(hard > 0, F.logsigmoid(logits), F.logsigmoid(-logits))).sum(1)
            decision = hard + (soft - soft.detach()) if straight_through else hard  # hard value, soft gradient
            patches = keep[:, 1:] * decision
            keep = torch.cat([keep[:, :1], patches], dim=1)
            shares.append(patches.mean(dim=1))
    with torch.set_grad_enabled(straight_through and torch.is_grad_enabled()):
        return backbone.head(x), shares, log_prob


# -- the policy ----------------------------------------------------------------------------------------------


@register_method("token-pruner", "learned per-block token keep decisions, backbone frozen (AdaViT/DynamicViT style)")
class TokenPruner(ExitPolicy):
    """Drops the lowest-scoring patch tokens after the blocks of ``prune_after``; scores are learned."""

    Config = TokenPrunerConfig
    needs = frozenset({"patch_tokens"})
    prunes_tokens = True
    knob, knob_grid = "keep_ratio", KEEP_RATIO_GRID

    def __init__(self, config: TokenPrunerConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        if self.config.estimator == "score-function" and self.config.samples < 2:
            raise ConfigError(f"samples={self.config.samples}: the score-function estimator needs at least 2 "
                              "(each draw's baseline is the others' mean)")
        self.nets = nn.ModuleDict()
        self.num_patches = 0
        self.report: dict = {}  # training diagnostics: images, steps, seconds, last losses

    @property
    def keep(self) -> float:
        """The inference budget per pruning block."""
        return self.config.target_keep if self.config.keep_ratio is None else self.config.keep_ratio

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> None:
        c = self.config
        if ctx.backbone is None or ctx.image_batches is None:
            raise ValueError("token-pruner: the fit context has no backbone or images to train through")
        layers = c.prune_after
        if not layers or list(layers) != sorted(set(layers)) or not all(1 <= l < ctx.num_blocks for l in layers):
            raise ValueError(f"token-pruner: prune_after {layers} must be ascending blocks in 1..{ctx.num_blocks - 1}")
        backbone = ctx.backbone
        _check_backbone(backbone)
        started = time.perf_counter()
        device = backbone.device
        teacher = ctx.heads.logits  # read a batch at a time, like the images
        classifier = ctx.classifier.copy_to(device)
        self.num_patches = int(backbone.num_patches)
        with torch.random.fork_rng():
            torch.manual_seed(ctx.seed)
            self.nets = nn.ModuleDict({str(l): DecisionNet(ctx.width, c.target_keep) for l in layers}).to(device)
        generator = torch.Generator().manual_seed(ctx.seed)
        optimizer = torch.optim.Adam(self.nets.parameters(), lr=c.lr)
        total = c.epochs * math.ceil(len(teacher) / c.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
        targets = torch.tensor([c.target_keep ** (s + 1) for s in range(len(layers))], device=device)
        straight = c.estimator == "straight-through"
        draws = 1 if straight else c.samples
        self.nets.train()
        steps, distill, usage = 0, torch.zeros(()), torch.zeros(())
        for _ in range(c.epochs):
            order = torch.randperm(len(teacher), generator=generator).numpy()
            batches = ctx.image_batches("heads", c.batch_size, rows=order)  # decoded as needed, in this order
            for start in range(0, len(order), c.batch_size):
                rows = order[start:start + c.batch_size]
                images, _ = next(batches, (torch.empty(0), None))
                if len(images) != len(rows):
                    raise ValueError(f"token-pruner: {len(images)} heads images read where {len(rows)} were traced")
                # draw-major: row = draw * B + image
                batch_teacher = torch.from_numpy(np.asarray(teacher[rows], dtype=np.float32)).repeat(draws, 1)
                embedding, shares, log_prob = pruned_forward(backbone, images.to(device), self.nets, layers,
                                                             generator, c.temperature, straight_through=straight,
                                                             draws=draws)
                logits = classifier(embedding.float())
                distill = F.kl_div(logits.log_softmax(-1), batch_teacher.to(device).log_softmax(-1), log_target=True,
                                   reduction="none").sum(-1)
                usage = ((torch.stack(shares, dim=1) - targets) ** 2).mean(1)
                cost = distill + c.usage_weight * usage
                if straight:
                    loss = cost.mean()
                else:  # REINFORCE: each draw against the mean cost of the other draws of the same image
                    cost = cost.detach().reshape(draws, -1)
                    advantage = cost - (cost.sum(0, keepdim=True) - cost) / (draws - 1)
                    loss = (advantage.reshape(-1) * log_prob).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                steps += 1
        self.nets.eval().requires_grad_(False).cpu()
        self.report = {"train_images": len(teacher), "steps": steps, "train_seconds": time.perf_counter() - started,
                       "last_distill_loss": float(distill.detach().mean()),
                       "last_usage_loss": float(usage.detach().mean())}

    # -- inference -------------------------------------------------------------------------------
    def keep_tokens(self, layer: int, view: LayerView) -> torch.Tensor | None:
        if str(layer) not in self.nets:
            return None
        tokens = view.patch_tokens()
        count = keep_count(self.keep, tokens.shape[1])
        if count == tokens.shape[1]:
            return None
        return keep_top(on_device(self.nets[str(layer)], tokens.device)(tokens.float()), count)

    def schedule(self) -> dict[int, int]:
        """Pruning block -> patch tokens present when its decision runs."""
        present, out = self.num_patches, {}
        for layer in sorted(int(k) for k in self.nets):
            out[layer] = present
            present = keep_count(self.keep, present)
        return out

    def head_flops(self, layer: int) -> float:
        """The decision network on every present patch token (zero where the budget keeps them all: skipped)."""
        present = self.schedule().get(layer)
        if present is None or keep_count(self.keep, present) == present:
            return 0.0
        return present * self.nets[str(layer)].flops_per_token()

    def with_knob(self, value: float) -> "TokenPruner":
        """The same trained scores with another inference budget (``self`` when it is its own)."""
        return self if value == self.keep else super().with_knob(value)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"nets": self.nets.state_dict(), "layers": sorted(int(k) for k in self.nets),
                "width": int(self.nets[next(iter(self.nets))].net[0].normalized_shape[0]) if len(self.nets) else 0,
                "num_patches": self.num_patches, "report": dict(self.report)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a fit; the pruning blocks come from the state."""
        layers = [int(layer) for layer in state["layers"]]
        self.config = dataclasses.replace(self.config, prune_after=tuple(layers))
        self.nets = nn.ModuleDict({str(layer): DecisionNet(int(state["width"])) for layer in layers})
        self.nets.load_state_dict(state["nets"])
        self.nets.eval().requires_grad_(False)
        self.num_patches = int(state["num_patches"])
        self.report = dict(state["report"])
