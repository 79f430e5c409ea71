"""Evaluation: benchmark tasks, scorers, throughput client, tables and plots."""
