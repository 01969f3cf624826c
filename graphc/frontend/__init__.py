"""The front end: the lark parser, the syntax tree, and the builder that turns a model into
typed IR, collecting every error with its source location."""
