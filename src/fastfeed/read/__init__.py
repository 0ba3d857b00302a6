"""From objects to samples: the shard list (:mod:`~fastfeed.read.sources`), the prefetcher's
concurrent ranged GETs under a byte budget (:mod:`~fastfeed.read.prefetch`), the tar index
(:mod:`~fastfeed.read.tario`, native) and the sample reader (:mod:`~fastfeed.read.reader`;
:mod:`~fastfeed.read.columnar` for runs of equal-sized samples)."""
