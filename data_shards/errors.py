"""The one exception type of the data pipeline: bad input, named by file, key and value."""


class DataError(ValueError):
    """A dataset folder, split file, image, shard or manifest is missing or malformed; the message names it."""
