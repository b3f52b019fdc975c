"""One module per primitive: autograd Functions and their functional entry points."""
