"""Thin callbacks over ``cmdtool.training`` for training stacks; import the one you use
(``cmdtool.integrations.lightning`` or ``cmdtool.integrations.transformers``): this package imports neither."""
