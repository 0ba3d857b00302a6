"""Tools behind ``fastfeed bench``: measurements (:mod:`~fastfeed.bench.measure`), the run and its
report (:mod:`~fastfeed.bench.run`) and the peer libraries' readers (:mod:`~fastfeed.bench.peers`).
Not imported by the library; its extra dependencies come with ``fastfeed[bench]``."""
