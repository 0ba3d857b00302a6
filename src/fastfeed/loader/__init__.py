"""``fastfeed.DataLoader``: torch's ``DataLoader`` with fastfeed's streams, workers and batches.
See :mod:`fastfeed.loader.dataloader` (its docstring maps the package's modules)."""
