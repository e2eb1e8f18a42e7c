"""flowers-dist: fine-tune timm image classifiers fast, on one CPU, one GPU or many."""

__version__ = "0.1.0"
