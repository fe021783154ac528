"""Benchmark datasets as WebDataset shards with a Parquet manifest, streamed to DDP ranks."""

from data_shards.dataset import BuiltDataset, Subset, open_dataset
from data_shards.errors import DataError
from data_shards.loader import make_loader

__all__ = ["BuiltDataset", "DataError", "Subset", "make_loader", "open_dataset"]
