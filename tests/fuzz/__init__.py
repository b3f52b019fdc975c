"""Property-based fuzzing of every public op (hypothesis): make test runs a bounded number of
examples per op, make fuzz the long crash-isolated campaign (campaign.py)."""
