"""medst_fast: a fast, faithful implementation of Med-ST (ICML 2024).

``import medst_fast`` needs only torch. Triton, DALI and the C++ extension are optional and each falls back
to the PyTorch path with one log line.
"""
from .version import __version__
from .config import HeadCfg, LossCfg, MedSTConfig, TextCfg, VisionCfg
from .models import MedST, MedSTOutput
from .losses import LossOutput, MedSTLoss
from .kernels import get_backend, set_backend
from .factory import create_model, list_models, add_model_config, get_model_config
from .hub import from_pretrained, save_pretrained

__all__ = [
    "__version__", "MedST", "MedSTConfig", "MedSTOutput", "MedSTLoss", "LossOutput", "VisionCfg", "TextCfg",
    "HeadCfg", "LossCfg", "create_model", "list_models", "add_model_config", "get_model_config",
    "from_pretrained", "save_pretrained", "set_backend", "get_backend", "get_tokenizer",
]


def get_tokenizer(vocab_path, max_length: int = 112):
    """WordPiece tokenizer from a local vocab.txt (needs the optional ``tokenizers`` package)."""
    from .text.tokenizer import MedSTTokenizer

    return MedSTTokenizer(vocab_path, max_length=max_length)
