"""Tools behind ``fastfeed bench``: measurements (:mod:`~fastfeed.bench.measure`), the run
(:mod:`~fastfeed.bench.run`), its report (:mod:`~fastfeed.bench.report`), the demo dataset and
server (:mod:`~fastfeed.bench.demo`) and the peer libraries' readers (:mod:`~fastfeed.bench.peers`).
Not imported by the library; its extra dependencies come with ``fastfeed[bench]``."""
