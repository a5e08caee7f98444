"""fluxdemo: FLUX.1-dev with quantized components on an ordinary GPU, and what a LoRA does to an image.

Library entry points: fluxdemo.pipeline.open_model, fluxdemo.pipeline.generate / compare, fluxdemo.lora.
"""

__version__ = "0.1.0"
