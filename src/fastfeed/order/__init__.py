"""Which sample comes when: the epoch plan, a pure function of seed, epoch, rank and worker
(:mod:`~fastfeed.order.plan`), the loader's streams over it (:mod:`~fastfeed.order.streams`),
and resuming at another world size (:mod:`~fastfeed.order.reshard`)."""
