"""Object stores: reading (list, head, ranged GET) behind :class:`~fastfeed.store.base.Store`,
and writing (conditional PUT, multipart upload, orphan cleanup) behind
:class:`~fastfeed.store.upload.CkptStore`, the one write path of checkpoints and shards.

* :mod:`~fastfeed.store.base`: the read interface, the local and aiobotocore S3 stores, the
  shared per-process clients;
* :mod:`~fastfeed.store.obstore`: the optional object_store engine;
* :mod:`~fastfeed.store.retry`: backoff with full jitter and a deadline for every request;
* :mod:`~fastfeed.store.buffers`: the pool of GET buffers;
* :mod:`~fastfeed.store.upload`: writes.
"""
