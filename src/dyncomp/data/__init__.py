"""GSM8K problems, `<COMP>`-annotated reasoning, answer checking and annotation."""

from dyncomp.data.annotated import AnnotatedExample, load_annotated, save_annotated, split_annotated
from dyncomp.data.gsm8k import Problem, extract_answer, is_correct, load_gsm8k, normalize_number

__all__ = [
    "AnnotatedExample",
    "Problem",
    "extract_answer",
    "is_correct",
    "load_annotated",
    "load_gsm8k",
    "normalize_number",
    "save_annotated",
    "split_annotated",
]
