"""Integrations of ferrograd's primitives into other libraries' models
(``ferrograd.integrations.transformers``)."""
