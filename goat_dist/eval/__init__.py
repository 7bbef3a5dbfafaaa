"""Evaluation on lm-evaluation-harness: local task definitions, the model wrapper, results.

``goat_dist.eval.cli.main`` is the ``launch/evaluate.py`` / ``goat-eval`` program; the trainer's
periodic accuracy (goat_dist/train/evaluate.py) runs the same tasks through the same engine.
"""
