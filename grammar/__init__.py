"""The .nn grammar (graphc.lark), shipped inside the package as data."""
