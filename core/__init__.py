"""Shared foundation: settings, domain types, embeddings, the LLM client and SQL operational records.

Every other package imports from here; nothing here imports from them.
"""
