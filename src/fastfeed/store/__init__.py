"""Object stores: reading (list, head, ranged GET) behind :class:`~fastfeed.store.base.Store`,
and writing (conditional PUT, multipart upload, orphan cleanup) behind
:class:`~fastfeed.store.upload.CkptStore`, the one write path of checkpoints and shards.

* :mod:`~fastfeed.store.base`: the read interface and what every store shares;
* :mod:`~fastfeed.store.local`, :mod:`~fastfeed.store.s3` (aiobotocore) and
  :mod:`~fastfeed.store.obstore` (the optional object_store engine): the stores;
* :mod:`~fastfeed.store.pool`: one store per URL scheme, S3 clients shared per process;
* :mod:`~fastfeed.store.retry`: backoff with full jitter and a deadline for every request;
* :mod:`~fastfeed.store.buffers`: the pool of GET buffers;
* :mod:`~fastfeed.store.upload`: writes.
"""
