"""The node-local cache tier (NVMe): one directory per user and node, shared by every worker,
rank and job of that user; bounded, crash-safe, verified.

Its modules, bottom up: :mod:`~fastfeed.cache.config` (``CacheConfig``, the counters),
:mod:`~fastfeed.cache.files` (the directory checks and the trust model for a shared node),
:mod:`~fastfeed.cache.entries` (the entry format: names, CRC32C trailers, writes),
:mod:`~fastfeed.cache.fill` (filling a shard, handing its parts to readers as they land),
:mod:`~fastfeed.cache.reading` (one shard read through the cache), :mod:`~fastfeed.cache.node`
(``ShardCache``: hits, fills, space and eviction; the layout and the coordination), and
:mod:`~fastfeed.cache.admin` (``fastfeed cache info/clear``)."""
