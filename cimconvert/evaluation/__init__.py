"""Evaluation: perplexity and Monte-Carlo over chip noise draws."""

from cimconvert.evaluation.perplexity import perplexity, windows

__all__ = ["perplexity", "windows"]
