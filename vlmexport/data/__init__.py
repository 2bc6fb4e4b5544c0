"""Data below training, quantization and evaluation: the seeded synthetic VQA generator and LLaVA-style JSONL files."""

from .jsonl import ConversationRecord, load_image, read_llava_jsonl, write_llava_jsonl
from .render import COLOURS, SHAPES
from .synthetic import CATEGORIES, KIND_MIX, QA, SPLITS, WORDS, EvalItem, Sample, SyntheticVQA

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "KIND_MIX",
    "QA",
    "SHAPES",
    "SPLITS",
    "WORDS",
    "ConversationRecord",
    "EvalItem",
    "Sample",
    "SyntheticVQA",
    "load_image",
    "read_llava_jsonl",
    "write_llava_jsonl",
]
