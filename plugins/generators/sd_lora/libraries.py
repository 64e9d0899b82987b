"""The heavy libraries of the sd-lora generator, imported on first use (importing the plugin stays cheap)."""

from __future__ import annotations

from fedmmkt_core.lazy import lazy_import

HINT = 'Install the diffusion extra: pip install "fedmmkt[diffusion]"'
torch = lazy_import("torch", HINT)
diffusers = lazy_import("diffusers", HINT)
peft = lazy_import("peft", HINT)
transformers = lazy_import("transformers", HINT)
tokenizers = lazy_import("tokenizers", HINT)


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and notices meant for notebooks."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
