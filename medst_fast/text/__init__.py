from .report import clean_report, split_sections
from .tokenizer import MedSTTokenizer, get_tokenizer

__all__ = ["clean_report", "split_sections", "MedSTTokenizer", "get_tokenizer"]
