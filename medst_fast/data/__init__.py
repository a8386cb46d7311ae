"""Data pipeline: MIMIC-CXR preparation, synthetic MIMIC-CXR, series datasets, generic manifests.

Submodules are imported lazily by their users so that ``import medst_fast.data`` stays cheap (pandas,
PIL and pydicom are only needed by the parts that read those formats).
"""
from .index import SeriesIndex, Study, cut_series

__all__ = ["SeriesIndex", "Study", "cut_series"]
