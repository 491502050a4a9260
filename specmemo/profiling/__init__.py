"""Measurement: prompt sets, baselines, reports and plots."""
