"""The benchmarks behind ``distill bench``: training-pipeline throughput (:mod:`.data`), the training step
(:mod:`.step`), teachers (:mod:`.teacher`) and deployed inference (:mod:`.infer`), all timed through
:mod:`.timing`. The commands themselves (arguments, tables) are in :mod:`distill.cli.bench`."""
