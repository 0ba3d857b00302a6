"""The node-local cache tier (NVMe): one directory per user and node, shared by every worker,
rank and job of that user; bounded, crash-safe, verified. See :mod:`fastfeed.cache.node`."""
