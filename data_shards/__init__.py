"""Benchmark datasets as WebDataset shards with a Parquet manifest, streamed to DDP ranks."""
