"""Backbones: vision transformers that can be run block by block.

``create_backbone("ViT-B-32", pretrained="openai")`` loads any open_clip model
by name; ``pretrained`` is an open_clip tag, ``"none"`` (seeded random init)
or a local checkpoint path (safetensors, or ``torch.load(weights_only=True)``).
The model name ``embedded`` is the small Fashion-MNIST CLIP shipped in
``harness/embedded``; ``timm:ARCH`` is a timm ``VisionTransformer``
classifier (``pretrained``: ``timm``, ``none`` or a checkpoint).

A :class:`Backbone` exposes the three pieces an early-exit driver needs,
:meth:`Backbone.embed`, :attr:`Backbone.blocks` and :meth:`Backbone.head`,
through the :mod:`harness.towers` adapter of its model family.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from harness import embedded
from harness._registry import UnknownNameError, unknown_name_message
from harness.cache import cached_state, source_digest
from harness.errors import ConfigError, UserError
from harness.towers import TokenLayout, Tower, tower

EMBEDDED = embedded.NAME
TIMM_PREFIX = "timm:"  # --model timm:ARCH: a timm VisionTransformer classifier
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not match the model (one-line message)."""


@dataclasses.dataclass
class Backbone:
    """A CLIP model with its vision tower exposed block by block.

    Attributes:
        name: the model name as requested (``embedded``, ``ViT-B-32``, ...).
        pretrained: tag, checkpoint path, or ``none``.
        weights_sha256: hash of the loaded weights (state-dict bytes), for cache keys.
        clip: the open_clip model (text tower, logit scale); None for a timm classifier.
        visual: the vision tower; a quantizer replaces it with a quantized copy.
        tokenizer: open_clip tokenizer for the text tower (None without one).
        preprocess: the model's eval image transform (PIL -> tensor).
        quantizer: name of the quantizer applied to ``visual`` (``fp32`` if none).
    """

    name: str
    pretrained: str
    weights_sha256: str
    clip: nn.Module | None
    visual: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor] | None
    preprocess: Callable
    quantizer: str = "fp32"

    @functools.cached_property
    def tower(self) -> Tower:
        """The adapter that runs :attr:`visual` block by block (:mod:`harness.towers`); built once (the drivers
        ask for blocks at every layer), and :meth:`with_visual` makes a new backbone with its own."""
        return tower(self.visual)

    @property
    def blocks(self) -> nn.ModuleList | nn.Sequential:
        return self.tower.blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def embed_dim(self) -> int:
        return self.tower.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (class and register tokens)."""
        return self.tower.num_prefix_tokens

    @property
    def has_class_token(self) -> bool:
        return self.tower.has_class_token

    @property
    def num_patches(self) -> int:
        return self.tower.num_patches

    @property
    def device(self) -> torch.device:
        return self.tower.device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> tokens [B, prefix + patches, width] entering block 1."""
        return self.tower.embed(images)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block -> image embedding [B, embed_dim] (not normalised)."""
        return self.tower.head(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The full-depth forward, assembled from the three pieces."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def with_visual(self, visual: nn.Module, quantizer: str) -> "Backbone":
        """A copy that shares the text tower but runs ``visual``."""
        return dataclasses.replace(self, visual=visual, quantizer=quantizer)

    @torch.no_grad()
    def zero_shot_classifier(
        self,
        classnames: Sequence[str],
        templates: Sequence[str],
        text_precision: str = "fp32",
        cache_dir: Path | None = None,
    ) -> torch.Tensor:
        """Class embeddings [C, embed_dim] from the template ensemble, cached on disk.

        Args:
            text_precision: ``fp32`` or ``fp16`` for the text tower.
            cache_dir: where to keep the result; ``None`` disables the cache.
        """
        from importlib.metadata import version

        from harness import zeroshot

        if text_precision not in ("fp32", "fp16"):
            raise ConfigError(f"text precision must be fp32 or fp16, not {text_precision!r}")

        def build() -> torch.Tensor:
            text_model = self.clip
            if text_precision == "fp16":
                # copy the text side only: the vision tower is left out of the copy
                text_model = copy.deepcopy(self.clip, memo={id(self.clip.visual): None}).half()
            return zeroshot.zero_shot_weights(text_model, self.tokenizer, classnames, templates).float().cpu()

        if cache_dir is None:
            return build().to(self.device)
        fields = {"weights_sha256": self.weights_sha256, "classnames": list(classnames), "templates": list(templates),
                  "text_precision": text_precision, "code": source_digest([Path(__file__), Path(zeroshot.__file__)]),
                  "versions": [torch.__version__, version("open_clip_torch")]}
        return cached_state(cache_dir, "classifiers", fields, build, "zero-shot classifier").to(self.device)

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.detach().exp())


def cls_attention(block: nn.Module, tokens: torch.Tensor, layout: TokenLayout = TokenLayout()) -> torch.Tensor:
    """CLS-to-patch attention [B, N] that ``block`` computes on ``tokens`` [B, prefix + N, D], mean over heads.

    Each head's softmax runs over all keys (class and register tokens
    included, as in the block); the weights on the prefix tokens are left
    out, so a row sums to less than 1. The block's own projections are used,
    quantization included: ``nn.MultiheadAttention`` (open_clip) keeps them
    as a bare ``in_proj_weight`` (every int8 quantizer here leaves it fp32),
    of which only the CLS query and the keys are computed; an attention
    module with an ``in_proj`` submodule (the fake-quant one) or a ``qkv``
    Linear (timm, with its query/key norms) is called on all tokens, its
    input quantization included.

    Raises:
        ValueError: the model has no class token (``layout``).

    Example:
        >>> weights = cls_attention(backbone.blocks[3], tokens)  # tokens after block 3
        >>> weights.topk(35, dim=1).indices  # the 35 patches block 4's CLS attends to most
    """
    if not layout.class_token:
        raise ValueError("this model has no class token, so it has no CLS attention")
    attn = block.attn
    b, t, d = tokens.shape
    heads = attn.num_heads
    x = block.ln_1(tokens) if hasattr(block, "ln_1") else block.norm1(tokens)
    if isinstance(getattr(attn, "qkv", None), nn.Module):  # timm
        head_dim = attn.head_dim
        qkv = attn.qkv(x).reshape(b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])
        weights = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        return weights[:, :, 0, layout.prefix:].mean(dim=1)
    if isinstance(attn, nn.MultiheadAttention):
        if not (attn.batch_first and attn._qkv_same_embed_dim):
            raise TypeError("cls_attention supports batch-first self-attention with a packed in-projection only")
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        q = nn.functional.linear(x[:, :1], weight[:d], None if bias is None else bias[:d])
        k = nn.functional.linear(x, weight[d:2 * d], None if bias is None else bias[d:2 * d])
    elif isinstance(getattr(attn, "in_proj", None), nn.Module):
        qkv = attn.in_proj(x)
        q, k = qkv[:, :1, :d], qkv[:, :, d:2 * d]
    else:
        raise TypeError(f"cls_attention cannot read the projections of {type(attn).__name__}")
    q = q.reshape(b, 1, heads, d // heads).transpose(1, 2)  # [B, H, 1, hd]
    k = k.reshape(b, t, heads, d // heads).transpose(1, 2)  # [B, H, T, hd]
    weights = (q @ k.transpose(-1, -2) * (d // heads) ** -0.5).softmax(dim=-1)
    return weights[:, :, 0, 1:].mean(dim=1)


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Hide open_clip's info/warning logs (it logs through the root logger) for a moment."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def list_backbones() -> list[str]:
    """The embedded default plus the open_clip configs whose vision tower a :mod:`harness.towers` adapter runs:
    open_clip's own ViT (``open_clip`` family) and timm ``VisionTransformer`` trunks (``open_clip-timm``:
    SigLIP, ...).

    Left out: ResNet, ConvNeXt and other non-ViT towers, timm ViT variants
    with their own block call (EVA's rotary positions, relative positions),
    attention pooling in open_clip's own ViT (CoCa), and Hugging Face text
    towers (their model needs a download; a Hugging Face *tokenizer* alone is
    fine, see :func:`create_backbone`).
    """
    import open_clip
    import timm

    plain_vits = set(timm.list_models(module="vision_transformer"))

    def supported(cfg: dict) -> bool:
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        if "multimodal_cfg" in cfg or "hf_model_name" in text:
            return False
        if "timm_model_name" in vision:
            return vision["timm_model_name"] in plain_vits and vision.get("timm_pool") not in ("abs_attn", "rot_attn")
        return isinstance(vision.get("layers"), int) and not vision.get("attentional_pool")

    return [EMBEDDED] + sorted(name for name, cfg in open_clip.factory._MODEL_CONFIGS.items() if supported(cfg))


def timm_classifiers() -> list[str]:
    """The timm architectures ``--model timm:ARCH`` accepts: those built as a plain ``VisionTransformer`` (timm's
    ViTs and DeiTs; DeiT's distilled variants add a distillation token and head, and are left out)."""
    import timm

    names = timm.list_models(module="vision_transformer") + timm.list_models(module="deit")
    return sorted(name for name in names if "distilled" not in name)


def backbone_family(name: str) -> str:
    """The :mod:`harness.towers` family a model name runs under."""
    import open_clip

    if name.startswith(TIMM_PREFIX):
        return "timm"
    if name == EMBEDDED:
        return "open_clip"
    cfg = open_clip.get_model_config(name) or {}
    return "open_clip-timm" if "timm_model_name" in cfg.get("vision_cfg", {}) else "open_clip"


class StandInTokenizer:
    """Words hashed into a text tower's vocabulary: only for a model with random weights whose own tokenizer
    (a Hugging Face one) cannot be loaded offline. Class prompts still give distinct, deterministic ids."""

    def __init__(self, vocab_size: int, context_length: int):
        self.vocab_size, self.context_length = vocab_size, context_length

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = text.lower().split()[: self.context_length]
            digests = [hashlib.blake2b(word.encode(), digest_size=8).digest() for word in words]
            ids = [1 + int.from_bytes(digest, "big") % (self.vocab_size - 1) for digest in digests]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _tokenizer(name: str, model_name: str, spec: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for ``model_name``; for a random-weights model whose Hugging Face tokenizer cannot
    be loaded here (no ``transformers``, no network), a :class:`StandInTokenizer`, said in one line."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
        text = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
        if spec != "none" or "vocab_size" not in text:
            raise ConfigError(f"backbone {name}: its tokenizer cannot be loaded ({reason}); install transformers "
                              f"and make the tokenizer available (Hugging Face cache or network)") from None
        print(f"note: {name}'s tokenizer cannot be loaded here ({reason}); with random weights the prompts are "
              f"tokenized by a stand-in that hashes words into its {text['vocab_size']}-word vocabulary",
              file=sys.stderr)
        return StandInTokenizer(text["vocab_size"], text.get("context_length", 77))


def state_dict_sha256(module: nn.Module) -> str:
    """Hash of every tensor in a state dict, in key order (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _load_tensors(path: Path) -> Any:
    """The object stored in ``path``, read without running code from the file.

    Not open_clip's ``load_state_dict``: on a TypeError it retries ``torch.load``
    without ``weights_only``, and with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` set
    that retry unpickles anything (a crafted file ran ``os.system``). Passing
    ``weights_only=True`` explicitly is what keeps that variable out: torch lets
    it decide only when the caller does not pass ``weights_only``.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap_state_dict(checkpoint: Any) -> Any:
    """open_clip's unwrapping: a training checkpoint's ``state_dict`` entry, DDP's ``module.`` prefix."""
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    prefix = "module."
    if isinstance(checkpoint, dict) and checkpoint and all(str(k).startswith(prefix) for k in checkpoint):
        checkpoint = {k[len(prefix):]: v for k, v in checkpoint.items()}
    return checkpoint


def _first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """``"KEY has N NaN/Inf values of M"`` for the first tensor holding any, else None."""
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return f"{key} has {int((~torch.isfinite(tensor)).sum())} NaN/Inf values of {tensor.numel()}"
    return None


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of tensors in ``path`` (safetensors, or ``torch.load(weights_only=True)``).

    Raises:
        CheckpointError: empty or unreadable file, pickled objects, not a state
            dict of tensors, or NaN/Inf weights (a model that would run at chance).
    """
    import pickle

    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        state = _unwrap_state_dict(_load_tensors(path))
    except pickle.UnpicklingError:  # torch's own message invites weights_only=False: not here
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds pickled Python objects (or is damaged), which are never "
            f"loaded because they can run code; pass a .safetensors file or a state dict saved with torch.save"
        ) from None
    except Exception as exc:
        # torch and safetensors say what failed, but some messages are a bare key: keep the type
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}" if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} ({reason[:200]}); pass a .safetensors file or a state dict "
            f"saved with torch.save"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} does not hold a state dict of tensors ({type(state).__name__}); "
            f"save model.state_dict() with safetensors or torch.save"
        )
    bad = _first_non_finite(state)
    if bad:
        raise CheckpointError(
            f"checkpoint {path} has non-finite weights ({bad}); the model would run at chance: "
            f"pass a checkpoint saved before training diverged"
        )
    return state


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    return "; ".join(parts)


def _checkpoint_file(spec: str, accepted: str) -> Path:
    """The checkpoint file that ``--pretrained spec`` names, resolved; ``accepted`` is what else the flag takes.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (--pretrained takes {accepted} or a file)")
    return path


def load_local_checkpoint(model: nn.Module, path: Path, model_name: str,
                          convert: Callable[[nn.Module, dict], dict] | None = None) -> None:
    """Load a local checkpoint into ``model`` strictly; ``convert`` maps a family's other key layouts first
    (open_clip's ``convert_state_dict``).

    Raises:
        CheckpointError: one line naming the file and what does not match.
    """
    state = _read_checkpoint(path)
    if convert is not None:
        state = convert(model, state)
    problem = _mismatch(model, state)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not match model {model_name}: {problem}")
    model.load_state_dict(state, strict=True)


def _resolve(name: str, pretrained: str | None) -> tuple[str, str]:
    """Map (model, pretrained) to (open_clip model name, pretrained spec)."""
    if name == EMBEDDED:
        return f"local-dir:{embedded.EMBEDDED_DIR}", pretrained or str(embedded.WEIGHTS_PATH)
    return name, pretrained or "none"


def create_backbone(
    name: str = EMBEDDED,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Backbone:
    """Build a :class:`Backbone`.

    Args:
        name: ``embedded``, an open_clip model name (see :func:`list_backbones`),
            or ``timm:ARCH`` for a timm ``VisionTransformer`` classifier
            (DeiT, ViT; see :func:`timm_classifiers`).
        pretrained: open_clip tag (``timm`` for a timm classifier: its default
            weights), local checkpoint path, or ``none`` for a seeded random
            init. Defaults to the shipped weights for ``embedded`` and to
            ``none`` otherwise.
        device: torch device for the model.
        seed: seed for a random init.

    Raises:
        UnknownNameError: unknown model name (suggests the closest).
        ConfigError: unknown tag (lists the known ones), weights that cannot be fetched.
        CheckpointError: unreadable or mismatched checkpoint.
        FileNotFoundError: a checkpoint path that does not exist.
    """
    import open_clip
    from open_clip.factory import convert_state_dict
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if name.startswith(TIMM_PREFIX):
        return _create_timm_classifier(name, pretrained, device, seed)
    model_name, spec = _resolve(name, pretrained)
    known = list_backbones()
    if name not in known:
        raise UnknownNameError(unknown_name_message("backbone", name, known))
    if spec == "none" and name != EMBEDDED:
        print(f"note: {name} has random weights (--pretrained none); pass a tag or a checkpoint "
              "for meaningful accuracies", file=sys.stderr)

    looks_like_path = Path(spec).suffix in _CHECKPOINT_SUFFIXES or "/" in spec or Path(spec).exists()
    with _quiet_root_logger(), torch.random.fork_rng():  # open_clip logs to the root logger
        torch.manual_seed(seed)
        if spec == "none" or looks_like_path:
            model = open_clip.create_model(model_name, load_weights=False)
            if spec != "none":
                path = _checkpoint_file(spec, "a tag, 'none'")
                load_local_checkpoint(model, path, name, convert=convert_state_dict)
                spec = str(path)
        else:
            tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
            if spec not in tags:
                raise ConfigError(
                    f"Unknown pretrained tag {spec!r} for {name}. Known tags: {', '.join(tags) or 'none'}; "
                    f"or pass a local checkpoint path or 'none'."
                )
            try:
                model = open_clip.create_model(model_name, pretrained=spec)
            except Exception as exc:
                raise ConfigError(
                    f"could not fetch open_clip weights {name}/{spec} ({str(exc).splitlines()[0][:160]}); "
                    f"without network access, download them elsewhere and pass the file with --pretrained PATH"
                ) from None
    tokenizer = _tokenizer(name, model_name, spec)
    try:
        tower(model.visual)
    except TypeError as exc:
        raise ConfigError(f"backbone {name}: {exc}") from None
    model = model.to(device).eval().requires_grad_(False)  # frozen: methods train their own heads
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return Backbone(
        name=name,
        pretrained=spec,
        weights_sha256=state_dict_sha256(model),
        clip=model,
        visual=model.visual,
        tokenizer=tokenizer,
        preprocess=preprocess,
    )


class _ToRGB:
    """PIL image -> RGB (timm's eval transform expects three channels; grayscale datasets give one)."""

    def __call__(self, image: Any) -> Any:
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


def _create_timm_classifier(name: str, pretrained: str | None, device: str | torch.device, seed: int) -> Backbone:
    """A timm ``VisionTransformer`` classifier as a :class:`Backbone` (no text tower: it classifies with its own
    head into its own classes)."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms import Compose

    arch = name.removeprefix(TIMM_PREFIX)
    known = timm_classifiers()
    if arch not in known:
        raise UnknownNameError(unknown_name_message("timm VisionTransformer", arch, known))
    spec = pretrained or "none"
    if spec == "none":
        print(f"note: {name} has random weights (--pretrained none); pass 'timm' or a checkpoint "
              "for meaningful accuracies", file=sys.stderr)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec == "timm":
            try:
                model = timm.create_model(arch, pretrained=True)
            except Exception as exc:
                raise ConfigError(
                    f"could not fetch timm weights for {arch} ({str(exc).splitlines()[0][:160]}); without network "
                    f"access, download them elsewhere and pass the file with --pretrained PATH") from None
        else:
            model = timm.create_model(arch, pretrained=False)
            if spec != "none":
                path = _checkpoint_file(spec, "'timm', 'none'")
                load_local_checkpoint(model, path, name)
                spec = str(path)
    try:
        adapter = tower(model)
    except TypeError as exc:
        raise ConfigError(f"backbone {name}: {exc}") from None
    model = model.to(device).eval().requires_grad_(False)
    data = {**resolve_data_config({}, model=model), "input_size": (3, *adapter.image_size)}  # the model as built
    transform = create_transform(**data, is_training=False)
    return Backbone(name=name, pretrained=spec, weights_sha256=state_dict_sha256(model), clip=None, visual=model,
                    tokenizer=None, preprocess=Compose([_ToRGB(), *transform.transforms]))


def backbone_config(backbone: Backbone) -> dict[str, Any]:
    """What identifies a backbone in results and cache keys."""
    return {
        "model": backbone.name,
        "pretrained": backbone.pretrained,
        "weights_sha256": backbone.weights_sha256,
        "blocks": backbone.num_blocks,
        "width": backbone.width,
        "tokens": backbone.tower.describe(),
    }
