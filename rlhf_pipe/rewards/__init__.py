"""Reward scorers: learned reward models, remote reward models over HTTP, rule functions.

Imports stay light (stdlib only at module level), so config.py can use the redaction helpers.
"""
