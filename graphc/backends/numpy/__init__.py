"""The numpy backend: each graph runs as generated Python calling numpy, with pooled buffers and
the optimizer's updates grouped and applied in place."""
