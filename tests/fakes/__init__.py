"""Test-only fakes: tiny random model zoos and scorers, loopback API servers with failure injection, one
fake OpenAI-compatible server. Product packages never import these (``tests/test_architecture.py``)."""
