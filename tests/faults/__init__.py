"""Fault-injection tests (issue #18): each fault, its exit code, message and files left."""
