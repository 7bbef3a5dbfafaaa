"""Resumable studies: run training (and evaluation) units as measured subprocesses, read their
results back, and write tables and plots. Shared by scripts/scaling_study.py and
scripts/compare_methods.py."""
