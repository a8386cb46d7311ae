from .report import clean_report, split_sections
from .tokenizer import MedSTTokenizer

# get_tokenizer (a model folder's, a checkpoint's or a vocab.txt's tokenizer) is medst_fast.get_tokenizer: it
# needs the model folder and checkpoint formats, which sit above this package.
__all__ = ["clean_report", "split_sections", "MedSTTokenizer"]
