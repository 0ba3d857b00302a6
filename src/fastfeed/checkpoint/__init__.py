"""Checkpoints to object storage: :class:`~fastfeed.checkpoint.checkpointer.Checkpointer`
(asynchronous, atomic, verified), its pickle-free codec (:mod:`~fastfeed.checkpoint.codec`) and
``torch.distributed.checkpoint`` storage (:mod:`~fastfeed.checkpoint.dcp`)."""
