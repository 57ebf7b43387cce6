"""Jobs built on the library (never imported by it): recovery, the alignment study, rewriting,
evaluation, stats and model cards."""
