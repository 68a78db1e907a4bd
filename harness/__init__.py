"""exitbench: early-exit and adaptive-inference methods on quantized CLIP vision encoders."""

__version__ = "0.1.0"
