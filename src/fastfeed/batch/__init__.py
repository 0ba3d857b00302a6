"""Samples into batches: assembling (:mod:`~fastfeed.batch.assemble`), torch's
``default_collate`` into the arena (:mod:`~fastfeed.batch.collate`), the native gather into
page-locked memory (:mod:`~fastfeed.batch.gather`), the ring of pinned buffers
(:mod:`~fastfeed.batch.ring`) and the side-stream copy to the GPU (:mod:`~fastfeed.batch.device`)."""
