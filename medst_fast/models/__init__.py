from .medst import MedST, MedSTOutput
from .move_vit import MoVEViT
from .text_bert import TextBert, merge_word_pieces

__all__ = ["MedST", "MedSTOutput", "MoVEViT", "TextBert", "merge_word_pieces"]
