"""Benchmark datasets as WebDataset shards with a Parquet manifest, streamed to DDP ranks."""

from data_shards.builder import BuildOptions, build
from data_shards.dataset import BuiltDataset, Subset, open_dataset
from data_shards.demo import write_demo
from data_shards.errors import DataError
from data_shards.loader import eval_images, make_loader

__all__ = ["BuildOptions", "BuiltDataset", "DataError", "Subset", "build", "eval_images", "make_loader", "open_dataset", "write_demo"]
