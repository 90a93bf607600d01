"""Thin adapters from one wire protocol to the core's ``Session`` interface."""
