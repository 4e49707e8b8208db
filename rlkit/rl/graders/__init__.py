"""Graders: decide whether a model's completion answers a problem correctly."""
