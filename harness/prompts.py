"""Prompt templates for the zero-shot classifier, chosen by name (``--templates``).

- default (no ``--templates``): the dataset's own templates.
- ``openai``: open_clip's 80 OpenAI ImageNet templates.
- ``simple``: a 5-template ensemble, the size the LRA-EE paper uses. The
  paper quotes two of its five ("a photo of a {}", "a clear photo of a {}")
  and does not list the rest; the other three here are ours.
- a file path: one template per line, each with one ``{}`` for the class
  name; blank lines and lines starting with ``#`` are skipped.

Templates are part of the classifier's cache key and recorded with results.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import ConfigError

SIMPLE_TEMPLATES = (
    "a photo of a {}.",
    "a clear photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
)
NAMED = ("openai", "simple")


def prompt_templates(spec: str | None, dataset_templates: tuple[str, ...]) -> tuple[str, ...]:
    """The templates ``spec`` names (see the module docstring); ``None`` gives ``dataset_templates``.

    Raises:
        ConfigError: a file that does not exist, holds no templates, or has a line without exactly one ``{}``.
    """
    if spec is None:
        return dataset_templates
    if spec == "simple":
        return SIMPLE_TEMPLATES
    if spec == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--templates {spec}: not {' or '.join(NAMED)}, and no such file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(line for line in lines if line and not line.startswith("#"))
    bad = [t for t in templates if t.count("{}") != 1 or {"{", "}"} & set(t.replace("{}", ""))]
    if not templates or bad:
        raise ConfigError(f"--templates {spec}: " + (f"template {bad[0]!r} needs exactly one {{}} for the class name"
                                                       if bad else "no templates in the file"))
    return templates
