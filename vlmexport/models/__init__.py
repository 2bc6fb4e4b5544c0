"""The model family: one file per architecture, registered by decorator.

    >>> from vlmexport.models import get_architecture
    >>> CogVLM = get_architecture("cogvlm")
    >>> model = CogVLM(CogVLM.tiny_config())
"""

from .base import (  # noqa: F401
    VLM,
    Part,
    VisionConfig,
    VLMConfig,
    architecture_for_hf,
    architectures,
    get_architecture,
    register,
    seeded_init,
)

